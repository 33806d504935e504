"""The render stage: a backend's renderer turns poses into face crops in latency-bounded batches; the stage knows no
backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from stream.frames import FaceCrop, Motion
from stream.pipeline import Stage


class BatchRenderer(Protocol):
    """What the render stage drives: a backend's poses in, face crops (BGR uint8) out, one per pose, and for each
    pose what to draw again at the frame's resolution when the crop is scaled up (see `FaceCrop.touch`)."""

    def render_batch(self, poses: Sequence[Any]) -> list[np.ndarray]: ...

    def touch_for(self, pose: Any) -> Callable[[np.ndarray, float, float], None] | None: ...


class RenderStage(Stage):
    """Motion -> FaceCrop, in latency-bounded batches: the first frame after silence goes alone, a backlog together."""

    name = "render"

    def __init__(self, renderer: BatchRenderer, max_batch: int, max_wait_ms: float,
                 landmarks: Callable[[Any], np.ndarray] | None = None) -> None:
        """`landmarks`, when given, tells the 68 points a pose shows (crop pixels); each crop carries them."""
        super().__init__()
        self.renderer = renderer
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.landmarks = landmarks

    def process(self, batch: list[Motion]) -> list[FaceCrop]:
        crops = self.renderer.render_batch([motion.pose for motion in batch])
        points = self.landmarks
        return [FaceCrop(motion.index, crop, None if points is None else points(motion.pose),
                         self.renderer.touch_for(motion.pose))
                for motion, crop in zip(batch, crops, strict=True)]
