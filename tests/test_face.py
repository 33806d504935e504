"""The embedded face's finishing: teeth drawn again at the frame's resolution, a greyscale photo's grey mouth, lids
that cover the eye, and the head's amplitude as a preset knob."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.embedded.motion import Expression
from stages.session import Avatar
from stream.errors import PresetError
from stream.frames import FaceCrop
from tests.conftest import PORTRAIT


def composed(avatar: Avatar, expression: Expression, *, touch: bool = True) -> np.ndarray:
    """One frame as a session makes it: the renderer's crop, composed into the portrait (with its touch)."""
    renderer = avatar.backend.renderer
    crop = FaceCrop(0, renderer.render(expression), touch=renderer.touch_for(expression) if touch else None)
    return avatar.compose_stage().compose_batch([crop])[0].image


def mouth_box(avatar: Avatar, margin: int = 6) -> tuple[slice, slice]:
    points = avatar.backend.portrait_landmarks()[48:68]
    (x0, y0), (x1, y1) = points.min(axis=0).astype(int) - margin, points.max(axis=0).astype(int) + margin
    return slice(y0, y1), slice(x0, x1)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    """The example at 1024x1024: the face crop (256 px) is scaled up about 1.45x into the frame."""
    path = tmp_path_factory.mktemp("large") / "large.png"
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(PORTRAIT)), (1024, 1024), interpolation=cv2.INTER_CUBIC))
    return Avatar.prepare(path, preset="balanced")


def test_an_open_mouth_is_drawn_again_at_the_frames_resolution(large: Avatar) -> None:
    open_mouth = Expression(0, aperture=0.3)
    assert large.backend.renderer.touch_for(Expression(0)) is None        # a shut mouth has nothing to redraw
    box = mouth_box(large)
    sharp = cv2.cvtColor(composed(large, open_mouth)[box], cv2.COLOR_BGR2GRAY)
    scaled = cv2.cvtColor(composed(large, open_mouth, touch=False)[box], cv2.COLOR_BGR2GRAY)

    def edges(image: np.ndarray) -> float:
        return float(np.percentile(np.abs(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F)), 99))

    assert edges(sharp) > 1.3 * edges(scaled)      # the teeth's and lips' edges, not a scaled-up crop's blur
    assert np.abs(sharp.astype(int) - scaled.astype(int)).mean() < 12    # the same mouth, drawn finer


def test_a_greyscale_photo_keeps_a_grey_mouth(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2GRAY))
    avatar = Avatar.prepare(path, preset="balanced")
    for expression in (Expression(0), Expression(0, aperture=0.35), Expression(0, aperture=0.15, width=-0.08)):
        mouth = composed(avatar, expression)[mouth_box(avatar)].astype(int)
        assert np.abs(mouth[..., 0] - mouth[..., 2]).max() <= 2 and np.abs(mouth[..., 1] - mouth[..., 2]).max() <= 2


def test_a_shut_lid_covers_the_eye_and_an_open_one_is_the_photos() -> None:
    avatar = Avatar.prepare(PORTRAIT, preset="balanced")
    points = avatar.backend.portrait_landmarks()
    eye = points[[37, 38, 40, 41]].mean(axis=0).astype(int)     # the middle of the left eye: iris and pupil
    patch = (slice(eye[1] - 2, eye[1] + 3), slice(eye[0] - 2, eye[0] + 3))
    open_eye, shut = composed(avatar, Expression(0)), composed(avatar, Expression(0, blink=1.0))
    skin = open_eye[points[19].astype(int)[1] + 4, points[19].astype(int)[0]].astype(float)   # under the brow
    assert np.linalg.norm(shut[patch].mean(axis=(0, 1)) - skin) < 0.5 * np.linalg.norm(
        open_eye[patch].mean(axis=(0, 1)) - skin)           # the lid's skin where the iris was
    assert np.array_equal(composed(avatar, Expression(0, blink=0.0)), open_eye)


def test_the_heads_amplitude_is_a_preset_knob() -> None:
    avatar = Avatar.prepare(PORTRAIT, preset="ultra_fast", overrides=["motion.head_scale=0"])
    assert avatar.preset.motion.head_scale == 0.0
    with pytest.raises(PresetError, match="head_scale"):
        Avatar.prepare(PORTRAIT, preset="ultra_fast", overrides=["motion.head_scale=5"])
