"""What flows between stages: small frozen records that carry their frame index.

The speech itself never rides through the stages (they work on a 16 kHz copy): a session holds it in a
`SpeechBuffer` and hands each finished frame its own slice (`VideoFrame.speech`: int16, shape (samples, channels)),
by the frame's index, so audio and video stay aligned whatever the stages batch or drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from stream.clock import FrameClock


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
    """Whole hops of input audio (one live, many from a file) as a mono float32 copy at the feature rate.
    `index` counts hops: the first hop of this chunk."""

    index: int
    pcm: np.ndarray       # (n,) float32 in [-1, 1] at the feature rate


@dataclass(frozen=True, slots=True)
class Motion:
    """What the face does during video frame `index` (`pose` is the backend's own type)."""

    index: int
    pose: Any


@dataclass(frozen=True, slots=True)
class FaceCrop:
    """A rendered face crop for frame `index`, still to be pasted into the portrait."""

    index: int
    crop: np.ndarray      # (h, w, 3) uint8 BGR
    landmarks: np.ndarray | None = None  # (68, 2) float32 points the crop shows, crop pixels, when asked for
    # What the renderer draws again once the crop is scaled up into the frame, at the frame's resolution (fine edges
    # a crop-sized drawing would lose): called with the frame's ROI (a view) and the crop-to-ROI scale (x, y).
    touch: Callable[[np.ndarray, float, float], None] | None = None


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """A finished frame: `index` is its pts in units of 1/fps; `speech` its share of the speech (none until the
    session hands it over).

    `changed` (x0, y0, x1, y1), when set, promises that pixels outside it equal the stream's base picture (the
    portrait): a sink converts only that region instead of the whole frame.
    """

    index: int
    image: np.ndarray     # (H, W, 3) uint8 BGR
    speech: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.int16))
    changed: tuple[int, int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The last item of a stream; nothing follows it."""


class SpeechBuffer:
    """The speech waiting for its video frames: frame k takes samples [start(k), start(k + 1)) of the stream.

    After `clear()` (a flush) the timeline restarts: the next frame's speech begins with the first sample added after
    it, whatever that frame's index.
    """

    def __init__(self, clock: FrameClock, channels: int) -> None:
        self.clock = clock
        self.channels = channels
        self._parts: list[np.ndarray] = []
        self._origin: int | None = 0  # timeline sample of the first buffered sample (None: the next frame's start)

    def add(self, speech: np.ndarray) -> None:
        if len(speech):
            self._parts.append(speech.reshape(-1, self.channels))

    def clear(self) -> None:
        self._parts = []
        self._origin = None

    def take(self, frame: int) -> np.ndarray:
        """Frame `frame`'s speech: whatever of its stretch has been added (the last frame's may be short)."""
        start, end = self.clock.start(frame), self.clock.start(frame + 1)
        if self._origin is None:
            self._origin = start
        buffered = np.concatenate(self._parts) if len(self._parts) > 1 else (
            self._parts[0] if self._parts else np.zeros((0, self.channels), np.int16))
        begin = min(max(0, start - self._origin), len(buffered))
        stop = min(max(begin, end - self._origin), len(buffered))
        rest = buffered[stop:]
        self._parts = [rest] if len(rest) else []
        self._origin += stop
        return buffered[begin:stop]
