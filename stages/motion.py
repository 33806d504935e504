"""The motion stage: a backend's motion model turns speech into one pose per video frame, each carrying its share
of the speech; the stage knows no backend."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from stream.clock import FrameClock
from stream.frames import AudioChunk, Motion
from stream.pipeline import Stage


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
