"""The embedded backend as a session sees it: visemes and a mesh warp on the portrait's own crop, nothing to load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from stages.audio import FEATURE_RATE_HZ
from stages.backend import SettingChecks
from stages.blend import ComposeStage
from stages.embedded.motion import EmbeddedMotion, IdleMotion
from stages.embedded.warp import WarpRenderer
from stages.portrait import Portrait
from stages.render import RenderStage
from stream.frames import FaceCrop
from stream.presets import Preset


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    """Knobs of the embedded backend ([backends.embedded] in presets.toml)."""

    backend: ClassVar[str] = "embedded"

    seed: int
    still: bool


class EmbeddedBackend:
    """One portrait prepared for the embedded backend: its crop's warp renderer and the paste-back mask."""

    name: ClassVar[str] = "embedded"
    settings_class: ClassVar[type] = EmbeddedSettings
    setting_checks: ClassVar[SettingChecks] = {}
    fixed: ClassVar[dict[str, Any]] = {}

    def __init__(self, portrait: Portrait, preset: Preset, settings: EmbeddedSettings) -> None:
        self.portrait = portrait
        self.preset = preset
        self.settings = settings
        self.renderer = WarpRenderer(portrait.crop, portrait.landmarks)
        self.image, self.roi = portrait.image, portrait.roi
        x0, y0, x1, y1 = portrait.roi
        self.mask = self.renderer.mask
        if portrait.scale != 1.0:
            self.mask = cv2.resize(self.mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)

    @classmethod
    def speech_lead_ms(cls, preset: Preset, settings: EmbeddedSettings) -> float:
        """The frame itself and the motion's look-ahead."""
        return 1000 / float(preset.video.frame_rate) + preset.motion.lookahead_ms

    @classmethod
    def checkpoint_folder(cls, settings: EmbeddedSettings) -> str | None:
        return None

    @classmethod
    def load_shared_networks(cls, settings: EmbeddedSettings) -> None:
        return None

    @classmethod
    def prepare(cls, portrait: Portrait, preset: Preset, settings: EmbeddedSettings, networks: Any) -> EmbeddedBackend:
        return cls(portrait, preset, settings)

    def motion_model(self) -> EmbeddedMotion:
        return EmbeddedMotion(fps=self.preset.video.frame_rate, sample_rate_hz=FEATURE_RATE_HZ,
                              lookahead_ms=self.preset.motion.lookahead_ms, seed=self.settings.seed,
                              head_scale=self._head_scale)

    def render_stage(self, *, with_landmarks: bool) -> RenderStage:
        """The warp renderer knows the 68 points each crop shows."""
        render = self.preset.render
        return RenderStage(self.renderer, render.max_batch, render.max_wait_ms,
                           landmarks=self.renderer.landmarks_for if with_landmarks else None)

    def idle_painter(self, compose: ComposeStage, seed: int, *,
                     with_landmarks: bool) -> Callable[[int, float], np.ndarray]:
        """Blinks and the head's sway at rest, made just in time."""
        motion = IdleMotion(fps=self.preset.video.frame_rate, seed=seed, head_scale=self._head_scale)
        landmarks = self.renderer.landmarks_for if with_landmarks else None

        def paint(index: int, time_s: float) -> np.ndarray:
            pose = motion.at(index, time_s)
            crop = FaceCrop(index, self.renderer.render(pose),
                            None if landmarks is None else landmarks(pose))
            return compose.compose_batch([crop])[0].image

        return paint

    @property
    def _head_scale(self) -> float:
        return 0.0 if self.settings.still else self.preset.motion.head_scale

    def landmark_locator(self) -> None:
        return None

    def portrait_landmarks(self) -> np.ndarray:
        x0, y0 = self.roi[:2]
        return self.portrait.landmarks / self.portrait.scale + np.array([x0, y0], np.float32)
