"""SadTalker's mel features (spec §1.3) against upstream's outputs (`sadtalker_ref.npz`) and against independent
computations (librosa, plain lists). No torch: the runtime computes them with numpy."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.signal

from stages.sadtalker.mel import MelStream, mel_windows, sadtalker_mel, slaney_mel_filterbank
from tests.sadtalker_files import REFERENCE


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as stored:
        return {key: stored[key] for key in ("wav", "mel")}


def assert_parity(ours: np.ndarray, upstream: np.ndarray) -> None:
    assert ours.shape == upstream.shape
    error = np.abs(ours - upstream).max()
    assert error <= 1e-4 * np.abs(upstream).max(), f"max error {error:.3g}"


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
