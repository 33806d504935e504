"""Any portrait image finds the same face: formats, alpha, grey, 16-bit, huge, tilted."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.portrait import DlibDetector, crop_box, fit_frame, prepare_portrait, read_image
from tests.conftest import PORTRAIT


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


@pytest.fixture(scope="module")
def reference(detector: DlibDetector) -> np.ndarray:
    return prepare_portrait(PORTRAIT, max_side_px=1280, crop_size=1024, detector_factory=lambda: detector,
                            cache_dir=None).landmarks


def frame_landmarks(path: Path, detector: DlibDetector, tmp_path: Path, max_side_px: int = 1280):
    portrait = prepare_portrait(path, max_side_px=max_side_px, crop_size=1024, detector_factory=lambda: detector,
                                cache_dir=tmp_path / "cache")
    return portrait, portrait.landmarks + np.array(portrait.roi[:2], np.float32)


def eye_corner_error(points: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(points[[36, 39, 42, 45]] - expected[[36, 39, 42, 45]]).max())


@pytest.mark.parametrize("variant", ["jpg", "webp", "rgba", "grey", "16bit"])
def test_image_variants_find_the_same_face(variant: str, tmp_path: Path, detector: DlibDetector):
    image = cv2.imread(str(PORTRAIT))
    path = tmp_path / f"portrait.{ {'rgba': 'png', 'grey': 'png', '16bit': 'png'}.get(variant, variant) }"
    if variant == "rgba":
        image = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
        image[:40, :, 3] = 0  # a transparent band at the top
    elif variant == "grey":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif variant == "16bit":
        image = image.astype(np.uint16) * 257
    cv2.imwrite(str(path), image)
    portrait, points = frame_landmarks(path, detector, tmp_path)
    _, expected = frame_landmarks(PORTRAIT, detector, tmp_path)
    assert portrait.image.dtype == np.uint8 and portrait.image.shape == (512, 512, 3)
    assert eye_corner_error(points, expected) <= 4


def test_a_huge_portrait_is_scaled_to_the_preset_size(tmp_path: Path, detector: DlibDetector):
    huge = cv2.resize(cv2.imread(str(PORTRAIT)), (3001, 3001), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "huge.png"
    cv2.imwrite(str(path), huge)
    portrait, points = frame_landmarks(path, detector, tmp_path, max_side_px=1280)
    assert portrait.image.shape == (1280, 1280, 3)  # even sides for 4:2:0
    _, expected = frame_landmarks(PORTRAIT, detector, tmp_path)
    assert eye_corner_error(points * 512 / 1280, expected) <= 4


def test_a_tilted_head_is_found(tmp_path: Path, detector: DlibDetector):
    image = cv2.imread(str(PORTRAIT))
    turn = cv2.getRotationMatrix2D((225, 130), 35, 1.0)
    path = tmp_path / "tilted.png"
    cv2.imwrite(str(path), cv2.warpAffine(image, turn, (512, 512), borderMode=cv2.BORDER_REPLICATE))
    _, points = frame_landmarks(path, detector, tmp_path)
    _, upright = frame_landmarks(PORTRAIT, detector, tmp_path)
    expected = upright @ turn[:, :2].T + turn[:, 2]
    assert eye_corner_error(points, expected) <= 6


def test_the_crop_holds_the_face_with_room_for_the_jaw_and_stays_inside(reference: np.ndarray):
    x0, y0, x1, y1 = crop_box(reference, 512, 512)
    assert x1 - x0 == y1 - y0
    low, high = reference.min(axis=0), reference.max(axis=0)
    assert x0 < low[0] and y0 < low[1] and x1 > high[0] and y1 - high[1] > 0.15 * (y1 - y0)
    corner = crop_box(reference + np.array([-150, -40], np.float32), 512, 512)
    assert corner[0] == 0 and corner[1] >= 0


def test_read_image_refuses_what_is_not_a_picture(tmp_path: Path):
    from stream.errors import InputError

    with pytest.raises(InputError, match="is empty"):
        read_image(b"")
    with pytest.raises(InputError, match="as an image"):
        read_image(b"GIF89a not really")


def test_face_detection_is_cached_per_image(tmp_path: Path, detector: DlibDetector):
    made = []

    def factory() -> DlibDetector:
        made.append(1)
        return detector

    first = prepare_portrait(PORTRAIT, max_side_px=1280, crop_size=256, detector_factory=factory, cache_dir=tmp_path)
    again = prepare_portrait(PORTRAIT, max_side_px=1280, crop_size=256, detector_factory=factory, cache_dir=tmp_path)
    assert made == [1]  # the second preparation loads no model
    np.testing.assert_array_equal(first.landmarks, again.landmarks)
    other = cv2.flip(cv2.imread(str(PORTRAIT)), 1)
    prepare_portrait(cv2.imencode(".png", other)[1].tobytes(), max_side_px=1280, crop_size=256,
                     detector_factory=factory, cache_dir=tmp_path)
    assert made == [1, 1]  # other pixels, another detection


def test_odd_sides_are_padded_by_repeating_the_edge_never_cropped():
    image = np.random.default_rng(0).integers(0, 256, (383, 511, 3), np.uint8)
    even = fit_frame(image, max_side_px=1280)
    assert even.shape == (384, 512, 3)
    assert np.array_equal(even[:383, :511], image)
    assert np.array_equal(even[383, :511], image[382]) and np.array_equal(even[:383, 511], image[:, 510])
    assert fit_frame(even, max_side_px=1280).shape == (384, 512, 3)  # even sides stay as they are
