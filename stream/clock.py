"""The one place that converts between samples, frames and milliseconds.

Time is an integer count of a rational time base (PyAV's convention); nothing else divides by fps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

RTP_VIDEO_CLOCK_HZ = 90_000   # RTP's clock for every video payload (RFC 3551): live video pts count it
NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
MS_PER_S = 1000


def seconds_of_ns(nanoseconds: int | float) -> float:
    return nanoseconds / NS_PER_S


def ms_of_ns(nanoseconds: int | float) -> float:
    return nanoseconds / NS_PER_MS


def ns_of_ms(ms: float) -> int:
    return round(ms * NS_PER_MS)


def ms_of_seconds(seconds: float) -> float:
    return seconds * MS_PER_S


def seconds_of_ms(ms: float) -> float:
    return ms / MS_PER_S


def seconds_of_frames(frames: int, fps: Fraction) -> float:
    return float(frames / fps)


def samples_of_ms(ms: float, rate_hz: int) -> int:
    return round(ms * rate_hz / MS_PER_S)


def ns_of_samples(samples: int, rate_hz: int) -> int:
    """Where sample `samples` starts, in ns (floor: exact for whole samples per ms)."""
    return samples * NS_PER_S // rate_hz


def samples_of_ns(nanoseconds: int, rate_hz: int) -> int:
    """The first sample that starts at or after `nanoseconds`."""
    return -(-nanoseconds * rate_hz // NS_PER_S)


def resampled_length(samples: int, from_hz: int, to_hz: int) -> int:
    """How many samples at `to_hz` cover `samples` at `from_hz` (rounded up: nothing is cut off)."""
    return math.ceil(samples * to_hz / from_hz)


@dataclass(frozen=True, slots=True)
class FrameClock:
    """Video frames laid over an audio stream: frame k covers samples [start(k), start(k + 1))."""

    fps: Fraction
    rate_hz: int

    @property
    def frame_ms(self) -> float:
        return float(MS_PER_S / self.fps)

    def start(self, frame: int) -> int:
        """First sample of `frame` (floor, so consecutive frames tile the stream exactly)."""
        return math.floor(frame * self.rate_hz / self.fps)

    def frames_for(self, samples: int) -> int:
        """How many frames cover `samples` samples: the last, partial one included."""
        return math.ceil(samples * self.fps / self.rate_hz)

    def samples_of_ms(self, ms: float) -> int:
        return samples_of_ms(ms, self.rate_hz)
