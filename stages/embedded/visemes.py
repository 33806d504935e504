"""Speech -> mouth targets for the embedded backend, with no model weights (facts in `spec/visemes.md`).

1. `SpectralAnalyser`: every 20 ms hop, a 32 ms Hann window -> band energies and LPC formants F1/F2, computed
   for many hops at once (one batched FFT, batched Toeplitz solves for the LPC, batched companion-matrix roots).
2. `SpeakerNormaliser`: running, decaying histograms give per-session percentiles of level and formants, so
   thresholds follow the voice instead of fixed dB or Hz; each hop becomes a mouth target (aperture, width,
   closure), using only what was heard up to that hop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class HopFeatures:
    """Acoustic measurements of a run of hops, one array entry per hop (all float64, shape (n,))."""

    band_db: np.ndarray     # 300–3400 Hz mean-square level, dB re full scale (the lip-sync energy band)
    low_ratio: np.ndarray   # share of power below 400 Hz: near 1 in a nasal murmur or voice bar
    high_ratio: np.ndarray  # share of power above 2 kHz: near 0 in a murmur, large in fricatives and /i/
    f1_hz: np.ndarray       # first formant (jaw opening); NaN where LPC finds none
    f2_hz: np.ndarray       # second formant (spread high, round low); NaN where LPC finds none


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
    ROUND_WIDTH = 0.075         # IOD for the most rounded vowel (/u/)

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
