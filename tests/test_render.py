"""The embedded warp renderer on the real astronaut portrait, measured the way the acceptance measures: dlib's 68
points on the rendered crop pasted back into the portrait, lengths in IOD = |p36 - p45|."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.embedded.motion import Expression
from stages.embedded.warp import WarpRenderer
from stages.portrait import crop_box
from tests.quality import FaceMeasurer, mouth_geometry

PORTRAIT = Path(__file__).resolve().parent.parent / "examples" / "astronaut.png"


def face_box(landmarks: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The portrait stage's own crop rule, as (left, top, side)."""
    x0, y0, x1, _ = crop_box(landmarks, shape[1], shape[0])
    return x0, y0, x1 - x0


class Stage:
    """The portrait, one crop of it (optionally resized), its renderer, and dlib to read the results back."""

    def __init__(self, measurer: FaceMeasurer, size: int | None = None) -> None:
        self.portrait = cv2.imread(str(PORTRAIT))
        self.measurer = measurer
        measurer.reset()
        landmarks = measurer.landmarks(self.portrait)
        self.left, self.top, self.side = face_box(landmarks, self.portrait.shape)
        crop = self.portrait[self.top : self.top + self.side, self.left : self.left + self.side]
        self.scale = 1.0 if size is None else size / self.side
        if size is not None:
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if size < self.side else cv2.INTER_CUBIC)
        self.crop = np.ascontiguousarray(crop)
        self.renderer = WarpRenderer(self.crop, ((landmarks - (self.left, self.top)) * self.scale).astype(np.float32))

    def paste(self, rendered: np.ndarray) -> np.ndarray:
        if rendered.shape[0] != self.side:
            rendered = cv2.resize(rendered, (self.side, self.side), interpolation=cv2.INTER_AREA)
        frame = self.portrait.copy()
        frame[self.top : self.top + self.side, self.left : self.left + self.side] = rendered
        return frame

    def read(self, expression: Expression) -> np.ndarray | None:
        """dlib's 68 points on the rendered frame pasted into the portrait (None when no face is found)."""
        self.measurer.reset()
        return self.measurer.landmarks(self.paste(self.renderer.render(expression)))


def eye_aspect_ratio(points: np.ndarray) -> float:
    def one(eye: np.ndarray) -> float:
        vertical = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
        return float(vertical / (2.0 * np.linalg.norm(eye[0] - eye[3])))

    return (one(points[36:42]) + one(points[42:48])) / 2.0


@pytest.fixture(scope="module")
def measurer() -> FaceMeasurer:
    return FaceMeasurer()


@pytest.fixture(scope="module")
def stage(measurer: FaceMeasurer) -> Stage:
    return Stage(measurer)


def aperture_and_width(points: np.ndarray) -> tuple[float, float]:
    geometry = mouth_geometry(points)
    return float(geometry["aperture"][0]), float(geometry["width"][0])


def test_rest_pose_closes_the_smiling_mouth(stage: Stage) -> None:
    stage.measurer.reset()
    portrait_aperture, _ = aperture_and_width(stage.measurer.landmarks(stage.portrait))
    rendered_aperture, _ = aperture_and_width(stage.read(Expression(0)))
    assert portrait_aperture > 0.08  # the photo shows its teeth...
    assert rendered_aperture <= 0.03  # ...the rest pose has the lips touching


@pytest.mark.parametrize("commanded", [0.15, 0.3])
def test_measured_aperture_follows_the_command(stage: Stage, commanded: float) -> None:
    measured, _ = aperture_and_width(stage.read(Expression(0, aperture=commanded)))
    assert abs(measured - commanded) <= 0.05


def test_aperture_sweep_is_monotonic(stage: Stage) -> None:
    measured = [aperture_and_width(stage.read(Expression(0, aperture=a)))[0] for a in (0.0, 0.1, 0.2, 0.3)]
    assert all(later > earlier + 0.04 for earlier, later in zip(measured, measured[1:]))


def test_spread_is_wider_than_round(stage: Stage) -> None:
    for aperture in (0.0, 0.15):
        _, spread = aperture_and_width(stage.read(Expression(0, aperture=aperture, width=0.08)))
        _, rounded = aperture_and_width(stage.read(Expression(0, aperture=aperture, width=-0.08)))
        assert spread - rounded >= 0.1


def test_blink_closes_the_eyes(stage: Stage) -> None:
    open_eyes = eye_aspect_ratio(stage.read(Expression(0)))
    shut = eye_aspect_ratio(stage.read(Expression(0, blink=1.0)))
    half = eye_aspect_ratio(stage.read(Expression(0, blink=0.5)))
    assert shut < 0.6 * open_eyes
    assert shut < half < open_eyes


def test_head_roll_turns_the_face(stage: Stage) -> None:
    still = stage.read(Expression(0))
    rolled = stage.read(Expression(0, head_roll_deg=3.0))

    def eye_line_deg(points: np.ndarray) -> float:
        dx, dy = points[45] - points[36]
        return float(np.degrees(np.arctan2(dy, dx)))

    assert eye_line_deg(rolled) - eye_line_deg(still) == pytest.approx(3.0, abs=1.0)


def test_landmarks_for_matches_what_dlib_reads(stage: Stage) -> None:
    rest = stage.renderer.landmarks_for(Expression(0)) / stage.scale
    iod = float(np.linalg.norm(rest[45] - rest[36]))
    for expression in (
        Expression(0, aperture=0.25, width=0.05),
        Expression(0, aperture=0.1, width=-0.06, head_roll_deg=-2.0, head_dx=0.05, head_dy=-0.03),
    ):
        predicted = stage.renderer.landmarks_for(expression) / stage.scale + (stage.left, stage.top)
        read = stage.read(expression)
        inner_face = list(range(27, 68))  # nose, eyes, mouth: the jaw outline is where dlib is least sure
        error = np.linalg.norm(predicted[inner_face] - read[inner_face], axis=1).mean() / iod
        assert error < 0.05


def test_dlib_finds_the_face_in_every_frame_of_a_sweep(stage: Stage) -> None:
    sweep = [
        Expression(i, aperture=aperture, width=width, blink=blink, head_roll_deg=roll, head_dx=0.03 * roll)
        for i, (aperture, width, blink, roll) in enumerate(
            [(a, w, b, r) for a in (0.0, 0.2, 0.35) for w in (-0.08, 0.08) for b in (0.0, 1.0) for r in (-2.0, 2.0)]
        )
    ]
    assert all(stage.read(expression) is not None for expression in sweep)


def test_pixels_outside_the_mask_are_the_input(stage: Stage) -> None:
    frozen = stage.renderer.mask == 0
    assert frozen.any()
    for expression in (
        Expression(0),
        Expression(1, aperture=0.35, width=0.08, blink=1.0),
        Expression(2, aperture=0.2, width=-0.08, head_roll_deg=-3.0, head_dx=0.1, head_dy=0.1),
    ):
        rendered = stage.renderer.render(expression)
        assert np.array_equal(rendered[frozen], stage.crop[frozen])


def test_mask_is_soft_covers_the_changes_and_is_zero_on_the_border(stage: Stage) -> None:
    mask = stage.renderer.mask
    assert mask.dtype == np.float32 and mask.shape == stage.crop.shape[:2]
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert ((mask > 0) & (mask < 1)).any()
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    changed = np.zeros(mask.shape, dtype=bool)
    for expression in (Expression(0, aperture=0.35, blink=1.0), Expression(1, width=-0.08, head_roll_deg=3.0)):
        changed |= (stage.renderer.render(expression) != stage.crop).any(axis=2)
    assert changed.any() and (mask[changed] > 0).all()


def test_render_is_deterministic_and_leaves_its_input_alone(stage: Stage) -> None:
    before = stage.crop.copy()
    expression = Expression(0, aperture=0.27, width=0.03, blink=0.4, head_roll_deg=1.5, head_dx=0.02)
    first = stage.renderer.render(expression)
    stage.renderer.render(Expression(1, aperture=0.1, blink=1.0))
    assert np.array_equal(first, stage.renderer.render(expression))
    rebuilt = WarpRenderer(stage.crop, _portrait_points(stage))
    assert np.array_equal(first, rebuilt.render(expression))
    assert np.array_equal(stage.crop, before)


def _portrait_points(stage: Stage) -> np.ndarray:
    stage.measurer.reset()
    points = stage.measurer.landmarks(stage.portrait)
    return ((points - (stage.left, stage.top)) * stage.scale).astype(np.float32)


@pytest.mark.parametrize("size", [96, 256, 512])
def test_other_crop_sizes_open_and_close(measurer: FaceMeasurer, size: int) -> None:
    resized = Stage(measurer, size)
    closed, _ = aperture_and_width(resized.read(Expression(0)))
    opened, _ = aperture_and_width(resized.read(Expression(0, aperture=0.3)))
    assert closed <= 0.03
    assert abs(opened - 0.3) <= 0.05


def test_a_closed_mouth_portrait_opens_with_painted_teeth(stage: Stage, measurer: FaceMeasurer) -> None:
    """The astronaut's own rest render is a portrait whose lips touch: no teeth to copy, the renderer paints some."""
    closed_portrait = stage.paste(stage.renderer.render(Expression(0)))
    measurer.reset()
    points = measurer.landmarks(closed_portrait)
    left, top, side = face_box(points, closed_portrait.shape)
    crop = np.ascontiguousarray(closed_portrait[top : top + side, left : left + side])
    renderer = WarpRenderer(crop, (points - (left, top)).astype(np.float32))

    def read(expression: Expression) -> np.ndarray:
        frame = closed_portrait.copy()
        frame[top : top + side, left : left + side] = renderer.render(expression)
        measurer.reset()
        return measurer.landmarks(frame)

    assert aperture_and_width(read(Expression(0)))[0] <= 0.03
    assert abs(aperture_and_width(read(Expression(0, aperture=0.3)))[0] - 0.3) <= 0.05
    opened = renderer.render(Expression(0, aperture=0.3))
    lips = renderer.landmarks_for(Expression(0, aperture=0.3))
    below_upper_lip = np.round(lips[62] + (0, 2)).astype(int)
    assert opened[below_upper_lip[1], below_upper_lip[0]].mean() > 120  # a tooth, not the dark cavity


def _teeth_coloured(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pixels far brighter and far less red than the median of the lips (inside the outer lip contour)."""
    colours = image.astype(np.float64)
    luma = colours @ np.array([0.114, 0.587, 0.299])
    redness = (colours[..., 2] - colours[..., 1]) / (luma + 1.0)
    lips = _inside(points[48:60], image.shape) > 0
    return (luma > np.median(luma[lips]) + 20.0) & (redness < 0.5 * np.median(redness[lips]))


def _inside(polygon: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    inside = np.zeros(shape[:2], dtype=np.uint8)
    cv2.fillPoly(inside, [np.round(polygon).astype(np.int32)], 1)
    return inside


def test_closed_lips_show_no_teeth_along_the_seam(stage: Stage) -> None:
    """The photo smiles with its teeth; closed, nothing near white may lie along the line where the lips meet."""
    closed = stage.renderer.render(Expression(0))
    points = stage.renderer.landmarks_for(Expression(0))
    seam = np.zeros(closed.shape[:2], dtype=np.uint8)
    cv2.polylines(seam, [np.round(points[60:65] * 16).astype(np.int32)], False, 1, 1, cv2.LINE_8, 4)
    band = (cv2.distanceTransform(1 - seam, cv2.DIST_L2, 5) <= 2.0) & (_inside(points[48:60], closed.shape) > 0)
    assert band.sum() > 100
    assert not (band & _teeth_coloured(closed, points)).any()


def test_a_slightly_parted_mouth_is_a_dark_slit_and_a_wider_one_shows_teeth(stage: Stage) -> None:
    slit = Expression(0, aperture=0.03)
    parted = stage.renderer.render(slit)
    points = stage.renderer.landmarks_for(slit)
    opening = _inside(points[60:68], parted.shape) > 0
    assert opening.sum() > 20
    assert not (opening & _teeth_coloured(parted, points)).any()
    middle = np.round((points[62] + points[66]) / 2.0).astype(int)
    assert parted[middle[1], middle[0]].mean() < 100  # the dark inside of the mouth

    wide = Expression(0, aperture=0.15)
    opened = stage.renderer.render(wide)
    below_upper_lip = np.round(stage.renderer.landmarks_for(wide)[62] + (0, 1.5)).astype(int)
    assert _teeth_coloured(opened, stage.renderer.landmarks_for(wide))[below_upper_lip[1], below_upper_lip[0]]


def test_rejects_inputs_it_cannot_use(stage: Stage) -> None:
    points = _portrait_points(stage)
    with pytest.raises(ValueError):
        WarpRenderer(stage.crop[..., 0], points)
    with pytest.raises(ValueError):
        WarpRenderer(stage.crop, points[:60])
