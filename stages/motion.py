"""Embedded motion: speech (16 kHz mono) -> one `Expression` per video frame, with no model weights.

The pipeline (facts in `spec/visemes.md`):
1. `SpectralAnalyser`: every 20 ms hop, a 32 ms Hann window -> band energies and LPC formants F1/F2, computed
   for many hops at once (one batched FFT, batched Toeplitz solves for the LPC, batched companion-matrix roots).
2. `SpeakerNormaliser`: running, decaying histograms give per-session percentiles of level and formants, so
   thresholds follow the voice instead of fixed dB or Hz; each hop becomes a mouth target (aperture, width,
   closure), using only what was heard up to that hop.
3. `EmbeddedMotion`: groups hops into video frames, looks one hop ahead for lip closures, smooths the mouth
   asymmetrically and adds seeded blinks and a small head motion.
Every step is causal in hop order, so a stream pushed in 20 ms chunks yields exactly the frames of one push.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from stream.clock import FrameClock
from stream.frames import AudioChunk, Motion
from stream.pipeline import Stage


@dataclass(frozen=True, slots=True)
class Expression:
    """What the face does during one video frame; lengths are fractions of the eye-corner distance (IOD).

    The renderer turns these targets into landmark moves so that the *measured* geometry of the output
    (dlib's 68 points) follows them: aperture 0 means the lips touch, width 0 means the portrait's own width.
    """

    index: int                 # video frame number in the stream
    aperture: float = 0.0      # inner-lip opening (0 closed; speech peaks ≈ 0.25–0.35)
    width: float = 0.0         # mouth-width change: + spread ("ee"), - round ("oo"); about ±0.08
    blink: float = 0.0         # eyelid closure, 0 open .. 1 shut
    head_roll_deg: float = 0.0 # in-plane head rotation about the neck pivot
    head_dx: float = 0.0       # head shift right, fraction of IOD
    head_dy: float = 0.0       # head shift down (nod), fraction of IOD


@dataclass(frozen=True, slots=True)
class HopFeatures:
    """Acoustic measurements of a run of hops, one array entry per hop (all float64, shape (n,))."""

    band_db: np.ndarray     # 300–3400 Hz mean-square level, dB re full scale (the lip-sync energy band)
    low_ratio: np.ndarray   # share of power below 400 Hz: near 1 in a nasal murmur or voice bar
    high_ratio: np.ndarray  # share of power above 2 kHz: near 0 in a murmur, large in fricatives and /i/
    f1_hz: np.ndarray       # first formant (jaw opening); NaN where LPC finds none
    f2_hz: np.ndarray       # second formant (spread high, round low); NaN where LPC finds none


@dataclass(frozen=True, slots=True)
class FrameTarget:
    """What one video frame asks of the mouth, before smoothing."""

    aperture: float      # IOD
    width: float         # IOD
    lips_closed: bool    # a p/b/m closure: shut now, whatever the smoothing
    silent: bool         # nothing audible in the frame: a pause, or the closure of a /t/ or /k/
    speech: float        # 0..1, loudest hop of the frame


@dataclass(frozen=True, slots=True)
class HopTargets:
    """What one hop asks of the mouth, after speaker normalisation."""

    aperture: float   # IOD, before smoothing
    width: float      # IOD, before smoothing
    closure: bool     # lips should touch (p/b/m murmur, voice bar, or the release right after a silence)
    silent: bool      # nothing audible: a pause or the silent closure of a stop
    loudness: float   # 0..1 relative to the voice's running peak; drives head-motion energy


class SpectralAnalyser:
    """Batched per-hop features from one real FFT per window; no state, so any batching gives equal results."""

    PRE_EMPHASIS = 0.97
    MAX_FORMANT_BANDWIDTH_HZ = 500.0
    FORMANT_RANGE_HZ = (200.0, 4500.0)

    def __init__(self, *, sample_rate_hz: int, window: int, lpc_order: int) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self.lpc_order = lpc_order
        self.taper = np.hanning(window + 2)[1:-1]
        freqs = np.fft.rfftfreq(window, 1.0 / sample_rate_hz)
        # Parseval for a one-sided spectrum of a tapered window -> mean square of the untapered signal.
        self.power_scale = 2.0 / (window * float(np.sum(self.taper**2)))
        self.band_start = int(np.searchsorted(freqs, 300.0))                 # first bin of 300–3400 Hz
        self.band_stop = int(np.searchsorted(freqs, 3400.0, side="right"))  # one past its last bin
        self.low_stop = int(np.searchsorted(freqs, 400.0))                   # bins below 400 Hz
        self.high_start = int(np.searchsorted(freqs, 2000.0, side="right"))  # bins above 2 kHz
        omega = 2.0 * np.pi * freqs / sample_rate_hz
        self.emphasis_gain = np.abs(1.0 - self.PRE_EMPHASIS * np.exp(-1j * omega)) ** 2
        self.subdiagonal = (np.arange(1, lpc_order), np.arange(lpc_order - 1))
        lags = np.arange(lpc_order)
        self.toeplitz_lags = np.abs(lags[:, None] - lags[None, :])

    def analyse(self, windows: np.ndarray) -> HopFeatures:
        """`windows`: (n, window) float samples, one row per hop."""
        spectrum = np.fft.rfft(windows * self.taper, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        # Band sums from one running sum: cumsum adds strictly left to right, so a hop gets the same bits whether
        # it is analysed alone or in a batch (sum() switches to pairwise or row-vectorised order with the shape).
        running = np.cumsum(power, axis=1)
        total = running[:, -1] + 1e-20
        band_power = running[:, self.band_stop - 1] - running[:, self.band_start - 1]
        band_db = 10.0 * np.log10(band_power * self.power_scale + 1e-12)
        low_ratio = running[:, self.low_stop - 1] / total
        high_ratio = (running[:, -1] - running[:, self.high_start - 1]) / total
        f1_hz, f2_hz = self._formants(power)
        return HopFeatures(band_db, low_ratio, high_ratio, f1_hz, f2_hz)

    def _formants(self, power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LPC by autocorrelation of the pre-emphasised spectrum, then the resonances of the pole pairs."""
        order = self.lpc_order
        autocorr = np.fft.irfft(power * self.emphasis_gain, n=self.window, axis=1)[:, : order + 1]
        # A little white-noise floor keeps the normal equations well posed on digital silence and pure tones.
        autocorr[:, 0] = autocorr[:, 0] * (1.0 + 1e-4) + 1e-12
        # The Toeplitz normal equations, solved per hop by LAPACK: a Levinson recursion in numpy costs a Python
        # loop of `order` steps per call, which dominates when hops arrive one at a time.
        predictor = np.linalg.solve(autocorr[:, self.toeplitz_lags], autocorr[:, 1:, None])[:, :, 0]
        companion = np.zeros((len(predictor), order, order))
        companion[:, 0, :] = predictor
        companion[:, self.subdiagonal[0], self.subdiagonal[1]] = 1.0
        roots = np.linalg.eigvals(companion)
        freq = np.angle(roots) * (self.sample_rate_hz / (2.0 * np.pi))
        bandwidth = -np.log(np.abs(roots) + 1e-12) * (self.sample_rate_hz / np.pi)
        lo, hi = self.FORMANT_RANGE_HZ
        usable = (freq > lo) & (freq < hi) & (bandwidth < self.MAX_FORMANT_BANDWIDTH_HZ)
        ranked = np.sort(np.where(usable, freq, np.inf), axis=1)
        first, second = ranked[:, 0], ranked[:, 1]
        return np.where(np.isfinite(first), first, np.nan), np.where(np.isfinite(second), second, np.nan)


class RunningPercentiles:
    """Percentiles of a value over a decaying history, from a fixed-bin histogram: O(bins) a hop, no sorting."""

    def __init__(self, low: float, high: float, step: float, half_life_hops: float) -> None:
        self.edges_low = low
        self.step = step
        self.counts = np.zeros(int(round((high - low) / step)) + 1)
        self.decay = 0.5 ** (1.0 / half_life_hops)

    def seed(self, values: np.ndarray, weight: float) -> None:
        """A prior that real observations outweigh after a few seconds."""
        for value in values:
            self.counts[self._bin(float(value))] += weight / len(values)

    def add(self, value: float) -> None:
        self.counts *= self.decay
        self.counts[self._bin(value)] += 1.0

    def empty(self) -> bool:
        return not self.counts.any()

    def quantile(self, q: float) -> float:
        cumulative = np.cumsum(self.counts)
        index = int(np.searchsorted(cumulative, q * cumulative[-1]))
        return self.edges_low + self.step * min(index, len(self.counts) - 1)

    def _bin(self, value: float) -> int:
        return min(max(int(round((value - self.edges_low) / self.step)), 0), len(self.counts) - 1)


def _clip01(value: float) -> float:
    return min(max(value, 0.0), 1.0)


class SpeakerNormaliser:
    """Turns hop features into mouth targets relative to this voice: level, F1 and F2 percentiles per session."""

    SILENCE_DB = -75.0          # band level below which nothing is speech, whatever the voice
    AUDIBLE_RANGE_DB = 32.0     # below peak - this: silent (pause or stop closure)
    LOUDNESS_RANGE_DB = 26.0    # loudness 0..1 spans peak - this .. peak
    DIP_DB = 12.0               # a murmur-like hop this far under the peak is a lip closure
    MURMUR_DIP_DB = 6.0         # even a clear murmur is this much under the peak (a loud one is a /w/ or /u/)
    APERTURE_PEAK = 0.36        # IOD at full loudness and the most open vowel
    SPREAD_WIDTH = 0.08         # IOD for the most spread vowel (/i/)
    ROUND_WIDTH = 0.07          # IOD for the most rounded vowel (/u/)

    def __init__(self) -> None:
        half_life = 1500.0  # hops (30 s): adapts to a new voice, ignores a sentence of odd vowels
        self.level = RunningPercentiles(-120.0, 20.0, 0.5, half_life)
        self.f1 = RunningPercentiles(150.0, 1300.0, 10.0, half_life)
        self.f2 = RunningPercentiles(500.0, 3500.0, 10.0, half_life)
        # Adult priors (Peterson & Barney, men and women averaged), worth about one second of vowels.
        self.f1.seed(np.linspace(290.0, 760.0, 48), weight=50.0)
        self.f2.seed(np.linspace(1050.0, 2350.0, 48), weight=50.0)
        self.peak_db = 0.0
        self.vowel_heard = False  # until then the running peak is no vowel level, and no dip under it can show
        self.previous_silent = True
        self.width_hold = 0.0

    def targets(self, band_db: float, low_ratio: float, high_ratio: float, f1_hz: float, f2_hz: float) -> HopTargets:
        """One hop, in stream order: updates the running statistics, then maps the hop to mouth targets."""
        audible = band_db > self.SILENCE_DB
        if audible and (self.level.empty() or band_db > self.peak_db - 40.0):
            self.level.add(band_db)
            self.peak_db = self.level.quantile(0.9)
        peak_db = self.peak_db
        silent = (not audible) or band_db < peak_db - self.AUDIBLE_RANGE_DB
        loudness = 0.0 if silent else _clip01((band_db - peak_db + self.LOUDNESS_RANGE_DB) / self.LOUDNESS_RANGE_DB)

        murmur = low_ratio >= 0.85 and high_ratio < 0.015 and band_db < peak_db - self.MURMUR_DIP_DB
        voice_bar = band_db < peak_db - self.DIP_DB and low_ratio >= 0.8 and high_ratio < 0.05
        # A weak, flat-spectrum burst right after a silence is a lip release (/p/ /b/): /t/ /k/ /s/ bursts are
        # hissy (much power above 2 kHz) and an open vowel starting after a pause has little below 400 Hz.
        release = self.previous_silent and band_db < peak_db - self.DIP_DB and high_ratio < 0.18 and low_ratio > 0.22
        # A stream that opens on an /m/ has the murmur itself as its loudest sound: before the first vowel the
        # murmur's spectrum alone closes the lips (onset vowels, /u/ too, keep over 1.5 % of their power above 2 kHz).
        opening_murmur = not self.vowel_heard and low_ratio >= 0.8 and high_ratio < 0.015
        closure = not silent and (murmur or voice_bar or release or opening_murmur)
        self.previous_silent = silent

        vowel_like = not silent and not closure and loudness > 0.55 and not math.isnan(f1_hz) and not math.isnan(f2_hz)
        self.vowel_heard = self.vowel_heard or vowel_like
        if vowel_like:
            self.f1.add(f1_hz)
            self.f2.add(f2_hz)
        if silent or closure or math.isnan(f1_hz) or math.isnan(f2_hz):
            aperture = 0.0 if (silent or closure) else self.APERTURE_PEAK * loudness * 0.5
            width = 0.0 if silent else self.width_hold
            return HopTargets(aperture, width, closure, silent, loudness)

        f1_low, f1_high = self.f1.quantile(0.1), self.f1.quantile(0.9)
        f2_low, f2_high = self.f2.quantile(0.1), self.f2.quantile(0.9)
        jaw = _clip01((f1_hz - f1_low) / max(f1_high - f1_low, 50.0))
        front = _clip01((f2_hz - f2_low) / max(f2_high - f2_low, 100.0))
        aperture = self.APERTURE_PEAK * loudness * (0.3 + 0.7 * jaw)
        spread = _clip01((front - 0.55) / 0.35)
        # Low F2 means rounding only for close and mid vowels: /a/ also has a low F2 but an open jaw.
        rounding = _clip01((0.55 - front) / 0.3) * _clip01((0.85 - jaw) / 0.3)
        width = self.SPREAD_WIDTH * spread - self.ROUND_WIDTH * rounding
        self.width_hold = width
        return HopTargets(aperture, width, False, False, loudness)


class BlinkSchedule:
    """Seeded blinks every 2–6 s: close in 40 ms, stay shut 30 ms, reopen in 70 ms (≈140 ms in all).

    The hold keeps the lids at least 90 % shut for ≈ 50 ms, so some frame centre sees it at 25 fps and above.
    """

    CLOSE_S, HOLD_S, OPEN_S = 0.040, 0.030, 0.070
    INTERVAL_S = (2.0, 6.0)

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.next_start_s = float(rng.uniform(*self.INTERVAL_S))
        self.current_start_s = -math.inf

    def value(self, time_s: float) -> float:
        """Lid closure at `time_s`; times must not decrease between calls."""
        while time_s >= self.next_start_s:
            self.current_start_s = self.next_start_s
            self.next_start_s += float(self.rng.uniform(*self.INTERVAL_S))
        phase = time_s - self.current_start_s
        if phase < self.CLOSE_S:
            return 0.5 - 0.5 * math.cos(math.pi * phase / self.CLOSE_S)
        if phase < self.CLOSE_S + self.HOLD_S:
            return 1.0
        phase -= self.CLOSE_S + self.HOLD_S
        if phase < self.OPEN_S:
            return 0.5 + 0.5 * math.cos(math.pi * phase / self.OPEN_S)
        return 0.0


class HeadSway:
    """Slow sums of seeded sinusoids, scaled by a twice-smoothed speech envelope: alive at rest, livelier in speech.

    Periods of 2.5–8 s and a 0.6 s envelope keep frame-to-frame second differences around 1e-4 IOD.
    """

    ROLL_DEG = (0.35, 1.3)    # amplitude at rest, extra at full speech
    SHIFT_IOD = (0.006, 0.016)
    ENVELOPE_TAU_S = 0.6

    def __init__(self, rng: np.random.Generator, frame_s: float) -> None:
        self.freqs_hz = rng.uniform(0.12, 0.4, size=(3, 2))
        self.phases = rng.uniform(0.0, 2.0 * math.pi, size=(3, 2))
        self.alpha = 1.0 - math.exp(-frame_s / self.ENVELOPE_TAU_S)
        self.stage1 = 0.0
        self.envelope = 0.0

    def pose(self, time_s: float, speech: float) -> tuple[float, float, float]:
        """(roll °, dx IOD, dy IOD) at `time_s` given this frame's speech activity 0..1."""
        self.stage1 += self.alpha * (speech - self.stage1)
        self.envelope += self.alpha * (self.stage1 - self.envelope)
        waves = np.sin(2.0 * math.pi * self.freqs_hz * time_s + self.phases) @ np.array([0.6, 0.4])
        roll = (self.ROLL_DEG[0] + self.ROLL_DEG[1] * self.envelope) * float(waves[0])
        shift = self.SHIFT_IOD[0] + self.SHIFT_IOD[1] * self.envelope
        return roll, shift * float(waves[1]), shift * float(waves[2])


class IdleMotion:
    """The face while nobody speaks in a live session: seeded blinks and the head's slow sway at rest, asked for
    frame by frame at the live clock's media time (never through the speech pipeline)."""

    def __init__(self, *, fps: Fraction | int, seed: int = 0, still: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.blinks = BlinkSchedule(np.random.default_rng(rng.integers(2**63)))
        self.head = HeadSway(np.random.default_rng(rng.integers(2**63)), float(1 / Fraction(fps)))
        self.still = still

    def at(self, index: int, time_s: float) -> Expression:
        """The pose of frame `index` at media time `time_s` (times must not decrease between calls)."""
        roll, dx, dy = (0.0, 0.0, 0.0) if self.still else self.head.pose(time_s, 0.0)
        return Expression(index, 0.0, 0.0, self.blinks.value(time_s), roll, dx, dy)


class EmbeddedMotion:
    """16 kHz mono float32 speech -> Expressions, streaming, bounded memory, fixed look-ahead.

    Frame k covers samples [k, k+1) * sample_rate_hz / fps and is emitted once audio up to its end plus
    `lookahead_ms` has been pushed (or at `finish`). Hop features are computed in batches but consumed in hop
    order by causal state, so the output does not depend on how the audio was chunked.
    """

    WINDOW_MS = 32
    LPC_ORDER = 18
    OPEN_TAU_S = 0.050
    CLOSE_TAU_S = 0.100
    SHAPE_TAU_S = 0.040
    BLOCK_HOPS = 256       # a long push is worked through in blocks of this many hops: bounded memory
    REST_APERTURE = 0.005  # below this a relaxing mouth counts as at rest

    def __init__(self, *, fps: Fraction | int, sample_rate_hz: int = 16000, hop_ms: int = 20, lookahead_ms: int = 40,
                 seed: int = 0, still: bool = False) -> None:
        self.clock = FrameClock(Fraction(fps), sample_rate_hz)
        self.hop = self.clock.samples_of_ms(hop_ms)
        self.window = self.clock.samples_of_ms(self.WINDOW_MS)
        self.lookahead = self.clock.samples_of_ms(lookahead_ms)
        if self.lookahead < self.window // 2:
            raise ValueError(f"lookahead_ms={lookahead_ms} is under half the {self.WINDOW_MS} ms analysis window")
        self.still = still
        self.frame_s = self.clock.frame_ms / 1000.0
        self.analyser = SpectralAnalyser(sample_rate_hz=sample_rate_hz, window=self.window, lpc_order=self.LPC_ORDER)
        self.normaliser = SpeakerNormaliser()
        rng = np.random.default_rng(seed)
        self.blinks = BlinkSchedule(np.random.default_rng(rng.integers(2**63)))
        self.head = HeadSway(np.random.default_rng(rng.integers(2**63)), self.frame_s)
        self.open_alpha = 1.0 - math.exp(-self.frame_s / self.OPEN_TAU_S)
        self.close_alpha = 1.0 - math.exp(-self.frame_s / self.CLOSE_TAU_S)
        self.shape_alpha = 1.0 - math.exp(-self.frame_s / self.SHAPE_TAU_S)
        self.aperture = 0.0
        self.width = 0.0
        self.relaxing = False
        self.silent_run = 0
        self.next_frame = 0
        self.finished = False
        self._start_segment(0)

    def _start_segment(self, origin: int) -> None:
        """Restart the hop grid at absolute sample `origin` (stream start, or where an interrupt cut the audio)."""
        self.origin = origin
        self.received = origin                      # absolute samples pushed so far
        self.pad = self.window // 2 - self.hop // 2  # hop j's window is centred on its 20 ms span
        self.audio = np.zeros(self.pad, dtype=np.float32)
        self.audio_start = origin - self.pad        # absolute sample index of audio[0]
        self.next_hop = 0
        self.hops: list[HopTargets] = []
        self.hops_start = 0                         # hop index of hops[0]

    def push(self, pcm: np.ndarray) -> list[Expression]:
        """Add speech (any length); returns every frame now complete, in order."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        block = self.BLOCK_HOPS * self.hop
        frames: list[Expression] = []
        for begin in range(0, len(samples), block):
            piece = samples[begin : begin + block]
            self.audio = np.concatenate((self.audio, piece))
            self.received += len(piece)
            frames += self._emit(self.received - self.lookahead)
        return frames

    def finish(self) -> list[Expression]:
        """End of stream: emits the rest, so that ceil(total_samples / samples_per_frame) frames came out in all."""
        if self.finished:
            return []
        self.finished = True
        last_frame = self.clock.frames_for(self.received)
        tail = self.clock.start(last_frame) + self.lookahead + self.window - self.received
        self.audio = np.concatenate((self.audio, np.zeros(max(tail, 0), dtype=np.float32)))
        frames: list[Expression] = []
        for stop in range(self.next_frame, last_frame, self.BLOCK_HOPS // 2):
            frames += self._emit_until(min(stop + self.BLOCK_HOPS // 2, last_frame))
        return frames

    def interrupt(self) -> None:
        """Barge-in: drop audio not yet shown; the mouth relaxes from where it is, blinks and head go on."""
        self.relaxing = True
        self._start_segment(self.clock.start(self.next_frame))

    def _emit(self, covered_until: int) -> list[Expression]:
        """Emit frames whose end lies at or before absolute sample `covered_until`."""
        frame = self.next_frame
        while self.clock.start(frame + 1) <= covered_until:
            frame += 1
        return self._emit_until(frame)

    def _emit_until(self, stop_frame: int) -> list[Expression]:
        if stop_frame <= self.next_frame:
            return []
        self._analyse_hops(self._hop_for_window_end(self.clock.start(stop_frame) + self.lookahead))
        out = [self._frame(k) for k in range(self.next_frame, stop_frame)]
        self.next_frame = stop_frame
        self._forget_before(self._hops_of(stop_frame)[0])
        return out

    def _hop_for_window_end(self, end: int) -> int:
        """Number of hops (from 0) whose windows end at or before absolute sample `end`."""
        first_window_end = self.origin - self.pad + self.window
        return max((end - first_window_end) // self.hop + 1, 0)

    def _analyse_hops(self, stop_hop: int) -> None:
        while self.next_hop < stop_hop:
            batch = min(stop_hop - self.next_hop, self.BLOCK_HOPS)
            begin = self.origin - self.pad + self.next_hop * self.hop - self.audio_start
            span = self.audio[begin : begin + (batch - 1) * self.hop + self.window]
            windows = np.lib.stride_tricks.sliding_window_view(span, self.window)[:: self.hop]
            features = self.analyser.analyse(windows)
            for j in range(batch):
                self.hops.append(self.normaliser.targets(
                    float(features.band_db[j]), float(features.low_ratio[j]), float(features.high_ratio[j]),
                    float(features.f1_hz[j]), float(features.f2_hz[j])))
            self.next_hop += batch

    def _hops_of(self, frame: int) -> range:
        """Hops whose centres fall inside the frame; the hop under the frame centre if none do (fps > 50)."""
        first_centre = self.origin + self.hop // 2
        start, end = self.clock.start(frame), self.clock.start(frame + 1)
        first = max(-(-(start - first_centre) // self.hop), 0)
        stop = max(-(-(end - first_centre) // self.hop), 0)
        if stop <= first:
            first = max((start + end) // 2 - self.origin, 0) // self.hop
            stop = first + 1
        return range(first, stop)

    def _forget_before(self, hop: int) -> None:
        """Keep memory bounded: drop hop targets and audio that no future frame will read."""
        drop = min(hop, self.next_hop) - self.hops_start
        if drop > 0:
            del self.hops[:drop]
            self.hops_start += drop
        keep_from = self.origin - self.pad + self.next_hop * self.hop - self.audio_start
        if keep_from > 0:
            self.audio = self.audio[keep_from:]
            self.audio_start += keep_from

    def _frame(self, k: int) -> Expression:
        hop_range = self._hops_of(k)
        hops = [self.hops[j - self.hops_start] for j in hop_range]
        # The look-ahead hop counts only if its window ends inside the look-ahead, whatever has been analysed.
        ahead_fits = hop_range.stop < self._hop_for_window_end(self.clock.start(k + 1) + self.lookahead)
        target = self._mouth_target(hops, self.hops[hop_range.stop - self.hops_start] if ahead_fits else None)

        if self.relaxing and target.speech > 0.3:
            self.relaxing = False
        # One silent frame may be the closure of a /t/ or /k/ (the lips stay apart): it closes smoothly;
        # from the second one on it is a pause, and the mouth goes to rest.
        self.silent_run = self.silent_run + 1 if target.silent else 0
        shut = target.lips_closed or self.silent_run > 1
        if shut and not self.relaxing:
            self.aperture = 0.0
        else:
            alpha = self.open_alpha if target.aperture > self.aperture else self.close_alpha
            self.aperture += alpha * (target.aperture - self.aperture)
        if self.relaxing and self.aperture < self.REST_APERTURE:
            self.relaxing = False
        self.width += self.shape_alpha * (target.width - self.width)

        centre_s = (self.clock.start(k) + self.clock.start(k + 1)) / 2 / self.clock.rate_hz
        blink = self.blinks.value(centre_s)
        roll, dx, dy = self.head.pose(centre_s, target.speech)
        if self.still:
            roll = dx = dy = 0.0
        return Expression(k, self.aperture, self.width, blink, roll, dx, dy)

    @staticmethod
    def _mouth_target(hops: list[HopTargets], ahead: HopTargets | None) -> FrameTarget:
        """One frame's target from its hops and, where the look-ahead holds it, the hop after it."""
        # Half a vote for the next hop cancels most of the smoothing lag of an opening mouth.
        weighted = [(h.aperture, 1.0) for h in hops] + ([(ahead.aperture, 0.5)] if ahead is not None else [])
        aperture = sum(a * w for a, w in weighted) / sum(w for _, w in weighted)
        width = sum(h.width for h in hops) / len(hops)
        ahead_closes = ahead is not None and ahead.closure
        # A mostly silent frame before a lip release is the closure of a /p/ or /b/: shut before the burst.
        lips_closed = any(h.closure for h in hops) or (hops[-1].silent and hops[0].loudness < 0.5 and ahead_closes)
        if ahead_closes:
            aperture *= 0.5  # lips start closing a hop before a p/b/m is heard
        silent = all(h.silent for h in hops) and not lips_closed
        return FrameTarget(aperture, width, lips_closed, silent, max(h.loudness for h in hops))


class SpeechBuffer:
    """The speech waiting for its video frames: frame k takes samples [start(k), start(k + 1)), the last the rest.

    After a flush the timeline restarts: the next frame's speech begins with the first sample added after it.
    """

    def __init__(self, clock: FrameClock, channels: int) -> None:
        self.clock = clock
        self.channels = channels
        self._parts: list[np.ndarray] = []
        self._origin: int | None = 0  # timeline sample of the first buffered sample (None: the next frame's start)

    def add(self, speech: np.ndarray) -> None:
        if len(speech):
            self._parts.append(speech)

    def clear(self) -> None:
        self._parts = []
        self._origin = None

    def take(self, frame: int, *, last: bool) -> np.ndarray:
        start, end = self.clock.start(frame), self.clock.start(frame + 1)
        if self._origin is None:
            self._origin = start
        buffered = np.concatenate(self._parts) if len(self._parts) > 1 else (
            self._parts[0] if self._parts else np.zeros((0, self.channels), np.int16))
        begin = min(max(0, start - self._origin), len(buffered))
        stop = len(buffered) if last else min(max(begin, end - self._origin), len(buffered))
        rest = buffered[stop:]
        self._parts = [rest] if len(rest) else []
        self._origin += stop
        return buffered[begin:stop]


class MotionModel(Protocol):
    """A backend's motion: feature-rate speech in, one pose per video frame out (anything with an `index`)."""

    def push(self, pcm: np.ndarray) -> list[Any]: ...

    def finish(self) -> list[Any]: ...

    def interrupt(self) -> None: ...


class MotionStage(Stage):
    """AudioChunks -> Motion: one pose per video frame, carrying that frame's share of the speech."""

    name = "motion"

    def __init__(self, model: MotionModel, speech: SpeechBuffer) -> None:
        super().__init__()
        self.model = model
        self.speech = speech

    def on_flush(self) -> None:
        self.model.interrupt()
        self.speech.clear()

    def process(self, chunks: list[AudioChunk]) -> list[Motion]:
        """Everything already queued goes in one call: live chunks come one at a time, a file's in a flood."""
        for chunk in chunks:
            self.speech.add(chunk.speech)
        pcm = chunks[0].pcm if len(chunks) == 1 else np.concatenate([chunk.pcm for chunk in chunks])
        return [Motion(e.index, e, self.speech.take(e.index, last=False)) for e in self.model.push(pcm)]

    def finish(self) -> list[Motion]:
        expressions = self.model.finish()
        return [Motion(e.index, e, self.speech.take(e.index, last=e is expressions[-1])) for e in expressions]
