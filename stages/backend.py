"""What a session asks of a backend, so that it branches on none: the backend's settings, how far ahead of a frame
the speech must be, and, prepared once per avatar, the face's picture, motion, renderer and idle frames."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import numpy as np

from stream.errors import TalkstreamError

if TYPE_CHECKING:
    from stages.blend import ComposeStage
    from stages.motion import MotionModel
    from stages.portrait import Portrait
    from stages.render import RenderStage
    from stream.presets import Preset

SettingChecks = dict[str, tuple[Callable[[Any], bool], str]]
# What each optional extra installs (with the packages those import): one of them missing is the install's fault.
EXTRA_PACKAGES = {"sadtalker": ("torch", "safetensors", "PIL"),
                  "enhance": ("torch", "torchvision", "gfpgan", "basicsr", "facexlib")}


class Backend(Protocol):
    """A backend: its class says how it is configured and loaded; an instance is one avatar's prepared face."""

    name: ClassVar[str]
    settings_class: ClassVar[type]               # its [backends.NAME] section of presets.toml
    setting_checks: ClassVar[SettingChecks]      # setting -> (valid?, what is valid)
    fixed: ClassVar[dict[str, Any]]              # preset values the backend cannot change (e.g. its frame rate)
    image: np.ndarray                            # (H, W, 3) uint8 BGR: the frame each face crop is pasted into
    roi: tuple[int, int, int, int]               # where the crops go in `image`
    mask: np.ndarray                             # (roi h, roi w) float32 paste-back weights

    @classmethod
    def speech_lead_ms(cls, preset: Preset, settings: Any) -> float:
        """How far past a frame's start the speech must have arrived before the frame can be made."""
        ...

    @classmethod
    def checkpoint_folder(cls, settings: Any) -> str | None:
        """Where the settings say the backend's files are (None: it has none)."""
        ...

    @classmethod
    def load_shared_networks(cls, settings: Any) -> Any:
        """The loaded networks avatars of these settings can share (None: the backend has none)."""
        ...

    @classmethod
    def prepare(cls, portrait: Portrait, preset: Preset, settings: Any, networks: Any) -> Self:
        """Everything per-frame work will only read, built once for the portrait (`networks`: None loads them)."""
        ...

    def motion_model(self) -> MotionModel:
        """The motion model of one session (it keeps that session's state)."""
        ...

    def render_stage(self, *, with_landmarks: bool) -> RenderStage:
        """The render stage of one session; `with_landmarks`: its crops carry the 68 points where the backend knows
        them (a neural enhancer aligns faces by them)."""
        ...

    def idle_painter(self, compose: ComposeStage, seed: int, *,
                     with_landmarks: bool) -> Callable[[int, float], np.ndarray]:
        """(frame index, media time s) -> an idle frame (BGR) for a live session's silences, composed by `compose`
        (`with_landmarks` as for `render_stage`)."""
        ...

    def landmark_locator(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """Frame -> its 68 points, for a neural enhancer where the crops carry none (None: they carry them)."""
        ...

    def portrait_landmarks(self) -> np.ndarray | None:
        """The still portrait's 68 points in `image` pixels, as crops hand them to an enhancer (None: found in each
        frame)."""
        ...


@contextlib.contextmanager
def needs_extra(extra: str, feature: str) -> Iterator[None]:
    """An extra that is not installed is one line naming the pip command, not an ImportError traceback."""
    try:
        yield
    except ImportError as error:
        if (error.name or "").partition(".")[0] not in EXTRA_PACKAGES[extra]:
            raise
        raise TalkstreamError(f"{feature} needs the [{extra}] extra ({error}): pip install -e '.[{extra}]'") from error
