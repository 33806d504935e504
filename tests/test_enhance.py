"""The light enhancer on the astronaut portrait's face FACE_ROI, and the enhancer factory."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.enhance import ENHANCERS, LightEnhancer, make_enhancer
from tests.conftest import FACE_ROI


@pytest.fixture(scope="module")
def enhanced(portrait, mask) -> np.ndarray:
    frame = portrait.copy()
    LightEnhancer(FACE_ROI, mask).enhance(frame)
    return frame


def roi_of(frame: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = FACE_ROI
    return frame[y0:y1, x0:x1]


def laplacian_variance(frame: np.ndarray, where: np.ndarray) -> float:
    luma = cv2.cvtColor(roi_of(frame), cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(luma, cv2.CV_64F)[where].var())


def test_light_enhancement_sharpens_the_face(portrait, mask, enhanced):
    face = mask >= 1.0
    assert laplacian_variance(enhanced, face) > 1.5 * laplacian_variance(portrait, face)


def test_light_enhancement_leaves_pixels_outside_the_roi_and_the_mask_untouched(portrait, mask, enhanced):
    x0, y0, x1, y1 = FACE_ROI
    outside = np.ones(portrait.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(enhanced[outside], portrait[outside])
    np.testing.assert_array_equal(roi_of(enhanced)[mask == 0], roi_of(portrait)[mask == 0])


def test_light_enhancement_changes_luma_not_colour(portrait, enhanced):
    before = cv2.cvtColor(roi_of(portrait), cv2.COLOR_BGR2YCrCb).astype(np.int16)
    after = cv2.cvtColor(roi_of(enhanced), cv2.COLOR_BGR2YCrCb).astype(np.int16)
    change = np.abs(after - before).reshape(-1, 3).mean(axis=0)
    assert change[0] > 1.0
    assert change[1] < 0.25 * change[0] and change[2] < 0.25 * change[0]


def test_light_enhancement_fades_out_towards_the_mask_edge(portrait, mask, enhanced):
    change = np.abs(roi_of(enhanced).astype(np.int16) - roi_of(portrait)).mean(axis=2)
    faint_edge = (mask > 0) & (mask < 0.1)
    assert change[faint_edge].mean() < 0.2 * change[mask >= 1.0].mean()


def test_enhancer_with_zero_strengths_leaves_the_frame_as_it_was(portrait, mask):
    frame = portrait.copy()
    enhancer = make_enhancer("light", FACE_ROI, mask, amount=0.0, clahe_strength=0.0)
    assert enhancer is not None
    enhancer.enhance(frame)
    np.testing.assert_array_equal(frame, portrait)


def test_factory_names_none_and_light(mask):
    assert ENHANCERS[:2] == ("none", "light")
    assert make_enhancer("none", FACE_ROI, mask) is None
    assert isinstance(make_enhancer("light", FACE_ROI, mask), LightEnhancer)


def test_unknown_enhancer_error_names_the_valid_ones(mask):
    with pytest.raises(ValueError, match="sharpen") as error:
        make_enhancer("sharpen", FACE_ROI, mask)
    assert all(name in str(error.value) for name in ENHANCERS)


def test_a_neural_enhancer_needs_its_loaded_network(mask):
    with pytest.raises(ValueError, match="needs its loaded network"):
        make_enhancer("gfpgan", FACE_ROI, mask)


def test_mask_that_does_not_match_the_roi_is_rejected(mask):
    with pytest.raises(ValueError, match="mask must be"):
        LightEnhancer(FACE_ROI, mask[:, :-1])


def test_frame_that_does_not_hold_the_roi_is_rejected(portrait, mask):
    with pytest.raises(ValueError, match="does not hold"):
        LightEnhancer(FACE_ROI, mask).enhance(portrait[:200].copy())
