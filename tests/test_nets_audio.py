"""SadTalker's audio-side networks and its 3DMM regressor against upstream's outputs (`sadtalker_ref.npz`, random
official-layout weights). The mel features they take are tested without torch in test_mel.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stages.nets.audio2coeff import Audio2Exp, PoseGenerator  # noqa: E402 - after the skip
from stages.nets.face3d import ReconNet, coefficients_70  # noqa: E402
from stages.sadtalker.mel import mel_windows  # noqa: E402
from tests.sadtalker_files import PREFIXES, REFERENCE, random_sections, unprefixed  # noqa: E402

pytestmark = pytest.mark.slow  # SadTalker's networks on the CPU

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
