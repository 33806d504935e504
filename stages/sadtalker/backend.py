"""The SadTalker backend as a session sees it: its settings and look-ahead here, its torch side (networks, crop,
motion, renderer) imported only when an avatar is prepared."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stages.backend import SettingChecks, needs_extra
from stages.blend import ComposeStage
from stages.portrait import DlibDetector, Portrait
from stages.render import RenderStage
from stages.sadtalker.crop import CROP_MODES
from stages.sadtalker.mel import MEL_LEAD_MS
from stream.clock import ms_of_seconds, seconds_of_frames
from stream.errors import InputError
from stream.presets import Preset

if TYPE_CHECKING:
    from stages.sadtalker.motion import OfflineMotion, SadTalkerMotion
    from stages.sadtalker.render import SadTalkerFace

MOTION_PATHS = ("streaming", "offline")


@dataclass(frozen=True, slots=True)
class SadTalkerSettings:
    """Knobs of the SadTalker backend ([backends.sadtalker]; a preset may tune them in presets.NAME.backends)."""

    backend: ClassVar[str] = "sadtalker"

    checkpoints: str                 # the folder holding SadTalker's files (`--checkpoints DIR`)
    size: int                        # which checkpoint: 256 or 512
    preprocess: str                  # SadTalker's crop mode
    pose_style: int
    expression_scale: float
    still: bool
    blink: bool
    seed: int
    motion: str                      # streaming | offline (upstream's whole-utterance path, for file renders)
    mapping_future_frames: int
    pose_lookahead_frames: int
    pose_lag_frames: int
    device: str
    precision: str
    compile: bool
    threads: int                     # torch CPU threads (0: one per core this process may use)
    render_px: int                   # 0: the checkpoint's size; 128/256/...: render smaller (previews, tests)


SETTING_CHECKS: SettingChecks = {
    "size": (lambda v: v in (256, 512), "256 or 512"),
    "preprocess": (lambda v: v in CROP_MODES, "one of " + ", ".join(CROP_MODES)),
    "pose_style": (lambda v: 0 <= v <= 45, "an integer from 0 to 45"),
    "expression_scale": (lambda v: 0 <= v <= 4, "a number from 0 to 4"),
    "motion": (lambda v: v in MOTION_PATHS, "streaming or offline"),
    "mapping_future_frames": (lambda v: 0 <= v <= 13, "an integer from 0 to 13"),
    "pose_lookahead_frames": (lambda v: 0 <= v <= 31, "an integer from 0 to 31"),
    "pose_lag_frames": (lambda v: 0 <= v <= 12, "an integer from 0 to 12"),
    "device": (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "precision": (lambda v: v in ("auto", "float32", "float16", "bfloat16"), "auto, float32, float16 or bfloat16"),
    "threads": (lambda v: 0 <= v <= 256, "an integer from 0 to 256"),
    "render_px": (lambda v: v == 0 or (v % 128 == 0 and 128 <= v <= 1024), "0 or a multiple of 128 up to 1024"),
}


class SadTalkerBackend:
    """One portrait prepared for SadTalker: its crop's cached source encoding, where the render goes, and the
    networks each session's motion drives."""

    name: ClassVar[str] = "sadtalker"
    settings_class: ClassVar[type] = SadTalkerSettings
    setting_checks: ClassVar[SettingChecks] = SETTING_CHECKS
    fixed: ClassVar[dict[str, Any]] = {"video.fps": 25}   # 25 fps: 640 samples a frame at 16 kHz (spec §1.3)

    def __init__(self, face: SadTalkerFace, preset: Preset, settings: SadTalkerSettings) -> None:
        self.face = face
        self.preset = preset
        self.settings = settings
        self.renderer = face.renderer
        self.image, self.roi, self.mask = face.image, face.roi, face.mask

    @classmethod
    def speech_lead_ms(cls, preset: Preset, settings: SadTalkerSettings) -> float:
        """MappingNet's future frames, the pose's look-ahead and smoother lag, and the mel window."""
        if settings.motion == "offline":
            raise InputError("SadTalker's offline motion waits for the end of each utterance: a live session needs a "
                             "streaming preset (ultra_fast, fast or balanced)")
        future = settings.mapping_future_frames + settings.pose_lookahead_frames + settings.pose_lag_frames
        return ms_of_seconds(seconds_of_frames(future, preset.video.frame_rate)) + MEL_LEAD_MS

    @classmethod
    def checkpoint_folder(cls, settings: SadTalkerSettings) -> str | None:
        return settings.checkpoints or None

    @classmethod
    @needs_extra("sadtalker", "the sadtalker backend")
    def load_shared_networks(cls, settings: SadTalkerSettings) -> Any:
        """Find and load SadTalker's networks for these settings (seconds: share the result between avatars)."""
        from stages.nets.checkpoints import find_checkpoints, load_sadtalker_networks

        if not settings.checkpoints:
            raise InputError("the sadtalker backend needs SadTalker's checkpoint files: --checkpoints DIR")
        return load_sadtalker_networks(find_checkpoints(settings.checkpoints, settings.size, settings.preprocess))

    @classmethod
    @needs_extra("sadtalker", "the sadtalker backend")
    def prepare(cls, portrait: Portrait, preset: Preset, settings: SadTalkerSettings,
                networks: Any) -> SadTalkerBackend:
        from stages.sadtalker.render import GeneratorSettings, prepare_face
        from stream.device import choose_placement, set_cpu_threads

        placement = choose_placement(settings.device, settings.precision)
        if not placement.is_cuda:
            set_cpu_threads(settings.threads)
        networks = networks or cls.load_shared_networks(settings)
        x0, y0 = portrait.roi[:2]
        landmarks = portrait.landmarks / portrait.scale + np.array([x0, y0], np.float32)
        # On a CPU a bigger batch costs more per frame (spec §3.2): batches are for GPUs.
        generator = GeneratorSettings(max_batch=preset.render.max_batch if placement.is_cuda else 1,
                                      compile=settings.compile)
        face = prepare_face(networks, portrait.image, landmarks, crop_mode=settings.preprocess,
                            size=settings.render_px or settings.size, placement=placement, settings=generator)
        face.renderer.measure_batch()
        return cls(face, preset, settings)

    def motion_model(self) -> SadTalkerMotion | OfflineMotion:
        from stages.sadtalker.motion import DrivingSettings

        settings = self.settings
        driving = DrivingSettings(settings.pose_style, settings.expression_scale, settings.still, settings.blink,
                                  settings.seed, settings.mapping_future_frames, settings.pose_lookahead_frames,
                                  settings.pose_lag_frames, self.preset.motion.head_scale)
        return self.face.motion_model(driving, offline=settings.motion == "offline")

    def render_stage(self, *, with_landmarks: bool) -> RenderStage:
        """The generator's crops carry no landmarks: `landmark_locator` finds them in each frame."""
        render = self.preset.render
        return RenderStage(self.renderer, render.max_batch, render.max_wait_ms)

    def idle_painter(self, compose: ComposeStage, seed: int, *,
                     with_landmarks: bool) -> Callable[[int, float], np.ndarray]:
        """The portrait itself: a generated frame takes seconds on a CPU."""
        return lambda index, time_s: self.image

    def landmark_locator(self) -> Callable[[np.ndarray], np.ndarray]:
        """The 68 points found in the portrait's known face box."""
        return self.face.landmark_locator(DlibDetector())

    def portrait_landmarks(self) -> None:
        return None
