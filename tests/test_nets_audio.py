"""SadTalker's audio-side networks, its 3DMM regressor and its mel features against upstream's outputs
(`sadtalker_ref.npz`, random official-layout weights) and against independent computations (librosa, plain lists)."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.signal
import torch

from stages.nets.audio2coeff import Audio2Exp, PoseGenerator
from stages.nets.face3d import ReconNet, coefficients_70
from stages.sadtalker.mel import MelStream, mel_windows, sadtalker_mel, slaney_mel_filterbank
from tests.sadtalker_files import PREFIXES, REFERENCE, random_sections, unprefixed

UNBUILT_POSE_PARTS = ("netG.encoder.", "netD_motion.")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sections() -> dict[str, dict[str, np.ndarray]]:
    return random_sections("CDE")


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as stored:
        return {key: stored[key] for key in stored.files}


def state_of(sections: dict, letter: str) -> dict[str, torch.Tensor]:
    state = unprefixed(sections[letter], PREFIXES[letter])
    if letter == "D":
        state = {key: value for key, value in state.items() if not key.startswith(UNBUILT_POSE_PARTS)}
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def loaded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def audio2exp(sections) -> Audio2Exp:
    return loaded(Audio2Exp(), state_of(sections, "C"))


@pytest.fixture(scope="module")
def pose(sections) -> PoseGenerator:
    return loaded(PoseGenerator(), state_of(sections, "D"))


@pytest.fixture(scope="module")
def recon(sections) -> ReconNet:
    return loaded(ReconNet(), state_of(sections, "E"))


def assert_parity(ours: np.ndarray, upstream: np.ndarray) -> None:
    assert ours.shape == upstream.shape
    error = np.abs(ours - upstream).max()
    assert error <= 1e-4 * np.abs(upstream).max(), f"max error {error:.3g}"


# --- networks ------------------------------------------------------------------------------------------------------

def test_audio2exp_reproduces_upstream_expression(audio2exp, reference):
    with torch.inference_mode():
        exp = audio2exp(*(torch.from_numpy(reference[key]) for key in ("mel_win", "ref", "ratio")))
    assert_parity(exp.numpy(), reference["exp"])


def test_audio2exp_frames_are_independent_of_their_batch(audio2exp, reference):
    windows, ref, ratio = (torch.from_numpy(reference[key]) for key in ("mel_win", "ref", "ratio"))
    with torch.inference_mode():
        together = audio2exp(windows, ref, ratio)
        one_by_one = torch.cat([audio2exp(windows[i:i + 1], ref[:, i:i + 1], ratio[:, i:i + 1]) for i in range(10)],
                               dim=1)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def test_recon_net_reproduces_upstream_coefficients(recon, reference):
    with torch.inference_mode():
        coeffs = recon(torch.from_numpy(reference["img224"]))
    assert_parity(coeffs.numpy(), reference["coeffs"])


def test_coefficients_70_keeps_expression_angles_and_translation(reference):
    coeffs = reference["coeffs"]
    # id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | txy 2 | tz 1
    expected = np.concatenate([coeffs[:, 80:144], coeffs[:, 224:227], coeffs[:, 254:257]], axis=1)
    np.testing.assert_array_equal(coefficients_70(torch.from_numpy(coeffs)).numpy(), expected)


def test_pose_generator_takes_the_checkpoint_minus_its_training_parts(sections):
    full = unprefixed(sections["D"], PREFIXES["D"])
    built = state_of(sections, "D")
    assert set(PoseGenerator().state_dict()) == set(built)
    assert len(full) - len(built) > 0
    with pytest.raises(RuntimeError, match="Unexpected key"):
        PoseGenerator().load_state_dict({key: torch.from_numpy(value) for key, value in full.items()}, strict=True)


@pytest.mark.parametrize("letter, build", [("C", Audio2Exp), ("D", PoseGenerator), ("E", ReconNet)])
def test_a_wrong_key_or_shape_is_refused(sections, letter, build):
    state = state_of(sections, letter)
    key = next(name for name in state if name.endswith("weight"))
    renamed = dict(state)
    renamed[key.replace("weight", "weights")] = renamed.pop(key)
    with pytest.raises(RuntimeError, match="Missing key"):
        build().load_state_dict(renamed, strict=True)
    reshaped = dict(state, **{key: torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        build().load_state_dict(reshaped, strict=True)


@pytest.fixture(scope="module")
def pose_inputs(reference) -> dict[str, torch.Tensor]:
    """Two overlapping 32-frame chunks of the reference speech, noise and the reference face's pose."""
    windows = torch.from_numpy(mel_windows(reference["mel"], 0, 50))
    noise = torch.Generator().manual_seed(7)
    ref_pose = coefficients_70(torch.from_numpy(reference["coeffs"]))[:, 64:]
    return {"windows": torch.stack([windows[1:33], windows[17:49]]), "z": torch.randn(2, 64, generator=noise),
            "ref": ref_pose.repeat(2, 1), "style": torch.tensor([0, 12])}


def test_pose_batch_equals_its_chunks_run_one_by_one(pose, pose_inputs):
    inputs = pose_inputs
    with torch.inference_mode():
        batch = pose.decode(inputs["z"], inputs["windows"], inputs["ref"], inputs["style"])
        alone = torch.cat([pose.decode(inputs["z"][b:b + 1], inputs["windows"][b:b + 1], inputs["ref"][b:b + 1],
                                       inputs["style"][b:b + 1]) for b in range(2)])
        embedded = pose.decode(inputs["z"], pose.embed_audio(inputs["windows"]), inputs["ref"], inputs["style"])
    assert batch.shape == (2, 32, 6)
    assert pose.embed_audio(inputs["windows"]).shape == (2, 32, 512)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, embedded, atol=1e-6, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different audio, noise and style: different motion


def test_pose_style_is_a_learned_offset_that_changes_motion(pose, pose_inputs):
    inputs = {key: value[:1] for key, value in pose_inputs.items()}
    with torch.inference_mode():
        first, again, other = (pose.decode(inputs["z"], inputs["windows"], inputs["ref"], torch.tensor([style]))
                               for style in (0, 0, 45))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3


# --- mel features --------------------------------------------------------------------------------------------------

def librosa_mel(wav: np.ndarray) -> np.ndarray:
    """Upstream's recipe (spec §1.3) written with librosa and scipy, independently of stages.sadtalker.mel."""
    frames = len(wav) // 640
    emphasised = scipy.signal.lfilter([1, -0.97], [1], wav[: frames * 640])
    spectrum = np.abs(librosa.stft(emphasised, n_fft=800, hop_length=200, win_length=800))
    mel = np.dot(librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600), spectrum)
    level = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((level + 100) / 100) - 4, -4, 4)


@pytest.fixture(scope="session")
def librosa_reference(reference) -> dict[str, np.ndarray]:
    """librosa's results, computed once (its first call takes seconds)."""
    cut = reference["wav"][:31111]  # not whole frames: the cut to 48 * 640 samples matters
    return {"mel": librosa_mel(reference["wav"]), "mel_cut": librosa_mel(cut),
            "bank": librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600),
            "bank_other": librosa.filters.mel(sr=22050, n_fft=1024, n_mels=40, fmin=0, fmax=None)}


def test_mel_reproduces_upstream(reference):
    assert_parity(sadtalker_mel(reference["wav"]), reference["mel"])


def test_mel_matches_librosa(reference, librosa_reference):
    np.testing.assert_allclose(sadtalker_mel(reference["wav"]), librosa_reference["mel"], rtol=0, atol=1e-5)
    cut = sadtalker_mel(reference["wav"][:31111])
    assert cut.shape == (80, 1 + 48 * 640 // 200)
    np.testing.assert_allclose(cut, librosa_reference["mel_cut"], rtol=0, atol=1e-5)


def test_slaney_filterbank_matches_librosa(librosa_reference):
    bank = slaney_mel_filterbank(16000, 800, 80, 55.0, 7600.0)
    assert bank.shape == (80, 401) and bank.dtype == np.float32
    np.testing.assert_allclose(bank, librosa_reference["bank"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(slaney_mel_filterbank(22050, 1024, 40, 0.0, 11025.0), librosa_reference["bank_other"],
                               rtol=1e-5, atol=1e-9)
    assert not bank.flags.writeable


def test_frame_windows_start_where_upstreams_int_truncation_puts_them():
    columns = 60
    mel = np.tile(np.arange(columns, dtype=np.float32), (80, 1))  # each column holds its own index
    windows = mel_windows(mel, 0, 20)
    expected = [[min(max(int(80 * (i - 2) / 25) + step, 0), columns - 1) for step in range(16)] for i in range(20)]
    assert windows.shape == (20, 1, 80, 16)
    np.testing.assert_array_equal(windows[:, 0, 0, :], np.array(expected, np.float32))
    assert expected[0][:7] == [0] * 7 and expected[0][7] == 1  # i=0 starts at -6
    assert expected[1][:4] == [0] * 4 and expected[1][4] == 1  # i=1 starts at -3
    assert windows[19, 0, 0, -1] == columns - 1  # the end repeats the last column
    np.testing.assert_array_equal(mel_windows(mel, 7, 5), windows[7:12])


def test_mel_stream_in_uneven_pushes_equals_the_offline_result(reference):
    wav = np.concatenate([reference["wav"], reference["wav"][:333]])  # ends mid-frame: the cut matters
    stream, pieces, position, sizes = MelStream(), [], 0, (320, 17, 5000)
    while position < len(wav):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(stream.push(wav[position:position + size]))
        position += size
    before_end = sum(piece.shape[1] for piece in pieces)
    pieces.append(stream.end())
    offline = sadtalker_mel(wav)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), offline, rtol=0, atol=1e-6)
    assert offline.shape[1] - before_end <= 3  # only the columns the cut could change wait for end()
    assert stream.push(wav[:640]).shape == (80, 2)  # end() readied the stream for a new signal
