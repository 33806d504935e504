"""The one place that converts between samples, frames and milliseconds.

Time is an integer count of a rational time base (PyAV's convention); nothing else divides by fps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

RTP_VIDEO_CLOCK_HZ = 90_000   # RTP's clock for every video payload (RFC 3551): live video pts count it


def seconds_of_ns(nanoseconds: int | float) -> float:
    return nanoseconds / 1e9


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
        return float(1000 / self.fps)

    def start(self, frame: int) -> int:
        """First sample of `frame` (floor, so consecutive frames tile the stream exactly)."""
        return math.floor(frame * self.rate_hz / self.fps)

    def frames_for(self, samples: int) -> int:
        """How many frames cover `samples` samples: the last, partial one included."""
        return math.ceil(samples * self.fps / self.rate_hz)

    def samples_of_ms(self, ms: float) -> int:
        return round(ms * self.rate_hz / 1000)
