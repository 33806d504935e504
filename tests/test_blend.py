"""Blend modes on the astronaut portrait with a 'rendered' crop that differs from it (shifted, recoloured, softened)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.blend import BLEND_MODES, Blender
from tests.conftest import FACE_ROI


@pytest.fixture(scope="module")
def crop(portrait: np.ndarray) -> np.ndarray:
    """The portrait's own face region, moved by (3, -2) px, colour-scaled and slightly blurred, like a render."""
    x0, y0, x1, y1 = FACE_ROI
    shift = np.float32([[1, 0, 3], [0, 1, -2]])
    moved = cv2.warpAffine(portrait, shift, portrait.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    recoloured = moved[y0:y1, x0:x1].astype(np.float32) * np.float32([1.04, 0.98, 1.06]) + 6.0
    return cv2.GaussianBlur(np.clip(recoloured, 0, 255).astype(np.uint8), (0, 0), 0.8)


def roi_of(frame: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = FACE_ROI
    return frame[y0:y1, x0:x1].astype(np.int16)


def outside_roi(frame: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = FACE_ROI
    outside = np.ones(frame.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    return frame[outside]


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_every_mode_leaves_pixels_outside_the_roi_exact(mode, portrait, mask, crop):
    frame = Blender(mode, portrait, FACE_ROI, mask).blend(crop)
    assert frame.shape == portrait.shape and frame.dtype == np.uint8
    np.testing.assert_array_equal(outside_roi(frame), outside_roi(portrait))
    assert np.abs(roi_of(frame) - roi_of(portrait)).max() > 10, "the crop should have changed the face"


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_every_call_returns_a_fresh_frame_that_later_calls_leave_alone(mode, portrait, mask, crop):
    blender = Blender(mode, portrait, FACE_ROI, mask)
    first = blender.blend(crop)
    first_pixels = first.copy()
    second = blender.blend(255 - crop)
    assert second is not first and not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, first_pixels)


@pytest.mark.parametrize("mode", ["alpha", "feather", "pyramid"])
def test_blending_the_portraits_own_pixels_changes_nothing(mode, portrait, mask):
    x0, y0, x1, y1 = FACE_ROI
    frame = Blender(mode, portrait, FACE_ROI, mask).blend(portrait[y0:y1, x0:x1].copy())
    np.testing.assert_array_equal(frame, portrait)


def test_alpha_pastes_the_crop_inside_and_keeps_the_background_where_the_mask_is_zero(portrait, mask, crop):
    frame = roi_of(Blender("alpha", portrait, FACE_ROI, mask).blend(crop))
    np.testing.assert_array_equal(frame[mask == 0], roi_of(portrait)[mask == 0])
    np.testing.assert_array_equal(frame[mask >= 0.5], crop[mask >= 0.5])


def test_feather_equals_the_crop_in_the_mask_interior_and_the_background_where_it_is_zero(portrait, mask, crop):
    frame = roi_of(Blender("feather", portrait, FACE_ROI, mask).blend(crop))
    interior = mask >= 1.0
    np.testing.assert_array_equal(frame[interior], crop[interior])
    np.testing.assert_array_equal(frame[mask == 0], roi_of(portrait)[mask == 0])


def test_feather_fades_a_hard_edged_mask_instead_of_pasting(portrait, mask, crop):
    hard = (mask >= 0.5).astype(np.float32)
    frame = roi_of(Blender("feather", portrait, FACE_ROI, hard).blend(crop))
    background, rendered = roi_of(portrait), crop.astype(np.int16)
    np.testing.assert_array_equal(frame[hard == 0], background[hard == 0])
    edge_band = (hard == 1) & ~cv2.erode(hard, np.ones((3, 3), np.uint8)).astype(bool)
    difference = (rendered - background)[edge_band]
    contrast = np.abs(difference) > 20
    share_of_crop = (frame - background)[edge_band][contrast] / difference[contrast]
    assert 0.0 <= np.median(share_of_crop) < 0.5, "a hard paste would put all of the crop on its edge"


def test_pyramid_stays_within_two_grey_levels_of_the_background_where_the_mask_is_zero(portrait, mask, crop):
    frame = roi_of(Blender("pyramid", portrait, FACE_ROI, mask).blend(crop))
    assert np.abs(frame - roi_of(portrait))[mask == 0].mean() <= 2.0
    assert np.abs(frame - crop)[mask >= 1.0].mean() <= 2.0


def test_seamless_gives_the_same_frame_on_consecutive_calls(portrait, mask, crop):
    # OpenCV writes into seamlessClone's mask (opencv#12053): reusing one mask alternates the result.
    blender = Blender("seamless", portrait, FACE_ROI, mask)
    frames = [blender.blend(crop) for _ in range(3)]
    np.testing.assert_array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(frames[1], frames[2])


def test_seamless_stays_close_to_the_background_where_the_mask_is_zero(portrait, mask, crop):
    frame = roi_of(Blender("seamless", portrait, FACE_ROI, mask).blend(crop))
    assert np.abs(frame - roi_of(portrait))[mask == 0].mean() <= 2.0


def test_seamless_puts_crop_detail_back_where_it_came_from(portrait, mask):
    x0, y0, x1, y1 = FACE_ROI
    crop = portrait[y0:y1, x0:x1].copy()
    mark_x, mark_y = 70, 110  # on the cheek, well inside the mask and away from its centre
    crop[mark_y - 2 : mark_y + 3, mark_x - 2 : mark_x + 3] = 255
    change = np.abs(roi_of(Blender("seamless", portrait, FACE_ROI, mask).blend(crop)) - roi_of(portrait)).sum(axis=2)
    rows, columns = np.nonzero(change > change.max() / 2)
    assert abs(columns.mean() - mark_x) <= 0.5 and abs(rows.mean() - mark_y) <= 0.5


def test_unknown_mode_error_names_the_valid_modes(portrait, mask):
    with pytest.raises(ValueError, match="poisson") as error:
        Blender("poisson", portrait, FACE_ROI, mask)
    assert all(mode in str(error.value) for mode in BLEND_MODES)


@pytest.mark.parametrize(
    ("roi", "mask_shape", "message"),
    [
        ((400, 32, 590, 222), (190, 190), "inside the 512x512 frame"),
        ((318, 32, 128, 222), (190, 190), "inside the 512x512 frame"),
        (FACE_ROI, (190, 189), r"mask must be \(190, 190\)"),
    ],
)
def test_bad_roi_or_mask_shape_is_rejected_up_front(portrait, roi, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        Blender("feather", portrait, roi, np.ones(mask_shape, np.float32))


def test_mask_values_outside_zero_to_one_are_rejected(portrait, mask):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Blender("feather", portrait, FACE_ROI, mask * 255.0)


def test_crop_of_the_wrong_size_is_rejected(portrait, mask, crop):
    with pytest.raises(ValueError, match="crop must be"):
        Blender("alpha", portrait, FACE_ROI, mask).blend(crop[:-1])
