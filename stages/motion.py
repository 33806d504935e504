"""The motion stage: a backend's motion model turns speech (the 16 kHz copy) into one pose per video frame; the stage
knows no backend."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from stream.frames import AudioChunk, Motion
from stream.pipeline import Stage


class MotionModel(Protocol):
    """A backend's motion: feature-rate speech in, one pose per video frame out (anything with an `index`)."""

    def push(self, pcm: np.ndarray) -> list[Any]: ...

    def finish(self) -> list[Any]: ...

    def interrupt(self) -> None: ...


class MotionStage(Stage):
    """AudioChunks -> Motion: one pose per video frame."""

    name = "motion"

    def __init__(self, model: MotionModel) -> None:
        super().__init__()
        self.model = model

    def on_flush(self) -> None:
        self.model.interrupt()

    def process(self, chunks: list[AudioChunk]) -> list[Motion]:
        """Everything already queued goes in one call: live chunks come one at a time, a file's in a flood."""
        pcm = chunks[0].pcm if len(chunks) == 1 else np.concatenate([chunk.pcm for chunk in chunks])
        return [Motion(pose.index, pose) for pose in self.model.push(pcm)]

    def finish(self) -> list[Motion]:
        return [Motion(pose.index, pose) for pose in self.model.finish()]
