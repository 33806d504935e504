"""What flows between stages: small frozen records that carry their frame index and their share of the speech.

The speech rides along at its own rate (`speech`: int16, shape (samples, channels)) with the video frame it belongs
to, so audio and video stay aligned whatever the stages batch or drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a sink must know before the first frame arrives."""

    width: int
    height: int
    fps: Fraction
    speech_rate_hz: int
    speech_channels: int


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Whole hops of input audio (one live, many from a file): a mono float32 copy at the feature rate, and the
    speech as it came in. `index` counts hops: the first hop of this chunk."""

    index: int
    pcm: np.ndarray       # (n,) float32 in [-1, 1] at the feature rate
    speech: np.ndarray    # (m, channels) int16 at the speech rate, the same stretch of time


@dataclass(frozen=True, slots=True)
class Motion:
    """What the face does during video frame `index` (`pose` is the backend's own type)."""

    index: int
    pose: Any
    speech: np.ndarray


@dataclass(frozen=True, slots=True)
class FaceCrop:
    """A rendered face crop for frame `index`, still to be pasted into the portrait."""

    index: int
    crop: np.ndarray      # (h, w, 3) uint8 BGR
    speech: np.ndarray
    landmarks: np.ndarray | None = None  # (68, 2) float32 points the crop shows, crop pixels, when asked for


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """A finished frame: `index` is its pts in units of 1/fps.

    `changed` (x0, y0, x1, y1), when set, promises that pixels outside it equal the stream's base picture (the
    portrait): a sink converts only that region instead of the whole frame.
    """

    index: int
    image: np.ndarray     # (H, W, 3) uint8 BGR
    speech: np.ndarray
    changed: tuple[int, int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The last item of a stream; nothing follows it."""
