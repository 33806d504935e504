"""SadTalker's mel features (spec §1.3), whole or streamed.

Upstream computes them with librosa; here they come from numpy's FFT and a filterbank built once per process from the
Slaney formula, which matches librosa (tests compare) without importing it at run time.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from stages.audio import FEATURE_RATE_HZ

SADTALKER_FPS = 25       # the backend's fixed frame rate
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps: the backend's fixed frame
MEL_FFT = 800  # 50 ms window
MEL_HOP = 200  # 12.5 ms: 80 mel columns a second
MEL_COLUMNS_PER_S = FEATURE_RATE_HZ // MEL_HOP
MEL_BANDS = 80
MEL_FMIN_HZ, MEL_FMAX_HZ = 55.0, 7600.0
MEL_WINDOW_STEPS = 16  # mel columns seen by one video frame
# Frame f's window ends at column 3.2 (f - 2) + 15, centred 120 ms or less past the frame's start; a column is final
# once whole 40 ms frames reach half a window (25 ms) past its centre (`MelStream`): 160 ms past the frame's start.
MEL_LEAD_MS = 160.0
_PREEMPHASIS = 0.97
_CENTRE = MEL_FFT // 2  # centred STFT: zeros on both sides
_MIN_LEVEL_DB, _REF_LEVEL_DB, _MAX_ABS = -100.0, 20.0, 4.0


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's scale: linear (200/3 Hz a mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (np.maximum(mel, 15.0) - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


@cache
def slaney_mel_filterbank(rate_hz: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float) -> np.ndarray:
    """Triangular filters evenly spaced on the Slaney mel scale, each scaled to unit area in Hz ("slaney" norm):
    (n_mels, n_fft // 2 + 1) float32, read-only (shared by every caller of the process)."""
    bins_hz = np.linspace(0.0, rate_hz / 2.0, n_fft // 2 + 1)
    edges_hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(np.array(fmin_hz)),
                                             _hz_to_slaney_mel(np.array(fmax_hz)), n_mels + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - bins_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    bank = weights.astype(np.float32)
    bank.flags.writeable = False
    return bank


@cache
def _periodic_hann(length: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)
    window.flags.writeable = False
    return window


def _preemphasis(samples: np.ndarray, previous: float) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] in float64 (as scipy's lfilter computes it upstream), x[-1] = `previous`."""
    emphasised = samples.astype(np.float64)
    emphasised[1:] -= _PREEMPHASIS * samples[:-1].astype(np.float64)
    if len(emphasised):
        emphasised[0] -= _PREEMPHASIS * previous
    return emphasised


def _mel_columns(padded: np.ndarray, count: int) -> np.ndarray:
    """`count` normalised mel columns from pre-emphasised, centre-padded samples (column k starts at k * hop):
    one batched rFFT, magnitude, mel, dB - 20, scaled and clipped to [-4, 4]. (80, count) float32."""
    if count <= 0:
        return np.zeros((MEL_BANDS, 0), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(padded[: (count - 1) * MEL_HOP + MEL_FFT], MEL_FFT)[::MEL_HOP]
    magnitude = np.abs(np.fft.rfft(frames * _periodic_hann(MEL_FFT), axis=1))
    mel = slaney_mel_filterbank(FEATURE_RATE_HZ, MEL_FFT, MEL_BANDS, MEL_FMIN_HZ, MEL_FMAX_HZ) @ magnitude.T
    level_db = 20.0 * np.log10(np.maximum(10.0 ** (_MIN_LEVEL_DB / 20.0), mel)) - _REF_LEVEL_DB
    scaled = (2.0 * _MAX_ABS) * ((level_db - _MIN_LEVEL_DB) / -_MIN_LEVEL_DB) - _MAX_ABS
    return np.clip(scaled, -_MAX_ABS, _MAX_ABS).astype(np.float32)


def _kept_samples(received: int) -> int:
    """Upstream cuts the audio to whole video frames before anything else."""
    return received // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME


def sadtalker_mel(wav16k: np.ndarray) -> np.ndarray:
    """SadTalker's mel spectrogram of a whole 16 kHz mono float signal: (80, 1 + T*640 // 200) float32 in [-4, 4],
    T = whole video frames in the signal (the rest is cut, as upstream does)."""
    kept = np.asarray(wav16k, np.float32).reshape(-1)[: _kept_samples(np.size(wav16k))]
    padded = np.pad(_preemphasis(kept, 0.0), _CENTRE)
    return _mel_columns(padded, 1 + len(kept) // MEL_HOP)


def first_columns(frames: np.ndarray | int) -> np.ndarray:
    """The first mel column each video frame sees: int(80 (i - 2) / 25), truncated toward zero (upstream's int())."""
    numerator = MEL_COLUMNS_PER_S * (np.asarray(frames) - 2)
    return np.sign(numerator) * (np.abs(numerator) // SADTALKER_FPS)


def mel_windows(mel: np.ndarray, first_frame: int, count: int, first_column: int = 0) -> np.ndarray:
    """The 16-column window of each video frame `first_frame` ... `first_frame + count - 1`: (count, 1, 80, 16) float32.

    Frame i starts at column int(80 (i - 2) / 25), truncated toward zero as Python's int() does (i=0 -> -6, i=1 -> -3),
    and indices past either end repeat the edge column. A frame near the end needs the final `mel` (its clamping
    depends on the last column), so a streaming caller takes windows of the last frames only after `MelStream.end()`.
    A stream that forgets old columns passes the rest as `mel` and the index of its first one as `first_column`.
    """
    starts = first_columns(np.arange(first_frame, first_frame + count))
    columns = np.clip(starts[:, None] + np.arange(MEL_WINDOW_STEPS), 0, first_column + mel.shape[1] - 1)
    if count and columns.min() < first_column:
        raise ValueError(f"column {columns.min()} was forgotten (the mel kept starts at {first_column})")
    return np.ascontiguousarray(mel[:, columns - first_column].transpose(1, 0, 2)[:, None], dtype=np.float32)


class MelStream:
    """Streaming `sadtalker_mel`: push 16 kHz float samples as they arrive, get the mel columns that are final.

    The concatenated output of every `push` and `end()` equals `sadtalker_mel` of the whole signal. Upstream first cuts
    the signal to whole 640-sample frames, and that cut (plus the centred STFT's zero padding after it) can change the
    columns whose 50 ms window reaches past the last whole frame received so far. Those columns are held back until the
    next frame boundary passes them, or until `end()`: a column is released 25 ms (half a window) plus at most 40 ms
    after its centre. `end()` returns the rest and readies the stream for a new signal.
    """

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self._pending = np.zeros(_CENTRE)  # padded, pre-emphasised samples from column `_next`'s start onward
        self._previous = 0.0  # last raw sample, for the pre-emphasis of the next push
        self._received = 0
        self._next = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """float32 samples (any length) -> the newly final columns (80, k) float32, k >= 0."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        if len(samples):
            self._pending = np.concatenate([self._pending, _preemphasis(samples, self._previous)])
            self._previous = float(samples[-1])
            self._received += len(samples)
        certain = _kept_samples(self._received)  # whatever comes next, the cut keeps these
        return self._emit((certain - _CENTRE) // MEL_HOP + 1 if certain >= _CENTRE else 0)

    def end(self) -> np.ndarray:
        """The signal is complete: the remaining columns (80, k) float32."""
        kept = _kept_samples(self._received)
        self._pending = np.concatenate([self._pending[: kept + _CENTRE - self._next * MEL_HOP], np.zeros(_CENTRE)])
        columns = self._emit(1 + kept // MEL_HOP)
        self._start()
        return columns

    def _emit(self, upto: int) -> np.ndarray:
        count = upto - self._next
        columns = _mel_columns(self._pending, count)
        if count > 0:
            self._pending = self._pending[count * MEL_HOP:]
            self._next = upto
        return columns
