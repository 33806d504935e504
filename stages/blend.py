"""Blend stage core: a rendered face crop (h, w, 3 uint8 BGR) -> a new full portrait frame (H, W, 3 uint8 BGR).

Only the face ROI is ever read or written; everything that depends on the avatar alone (alpha maps, mask pyramids,
float copies of the background, the clone centre) is computed once in `Blender.__init__`, so a call costs only
the per-pixel work measured in `spec/cpu-limits.md` §1-2.
"""

from __future__ import annotations

import math
from typing import Protocol

import cv2
import numpy as np

from stages.enhance import Enhancer, Roi
from stream.frames import FaceCrop, VideoFrame
from stream.pipeline import Stage

BLEND_MODES = ("alpha", "feather", "pyramid", "seamless")



class _RoiMethod(Protocol):
    def blend_into(self, crop: np.ndarray, out_roi: np.ndarray) -> None:
        """Write the blend of `crop` over the background into `out_roi`, a view that holds the background."""


class _AlphaPaste:
    """Hard paste where the mask is at least 0.5: the cheapest method (µs), with a visible edge."""

    def __init__(self, mask: np.ndarray) -> None:
        self._hard_mask = (mask >= 0.5).astype(np.uint8)

    def blend_into(self, crop: np.ndarray, out_roi: np.ndarray) -> None:
        cv2.copyTo(crop, self._hard_mask, dst=out_roi)


class _Feather:
    """Alpha blend in uint8 arithmetic: exact where alpha is 0 or 255, within one grey level elsewhere."""

    def __init__(self, mask: np.ndarray) -> None:
        alpha = np.rint(_soften_inward(mask) * 255.0).astype(np.uint8)
        self._alpha3 = cv2.merge([alpha, alpha, alpha])
        self._inverse_alpha3 = 255 - self._alpha3
        # Scratch buffers: the result lands in the caller's fresh frame, so reusing these is safe.
        self._crop_part = np.empty_like(self._alpha3)
        self._background_part = np.empty_like(self._alpha3)

    def blend_into(self, crop: np.ndarray, out_roi: np.ndarray) -> None:
        cv2.multiply(crop, self._alpha3, dst=self._crop_part, scale=1.0 / 255.0)
        cv2.multiply(out_roi, self._inverse_alpha3, dst=self._background_part, scale=1.0 / 255.0)
        cv2.add(self._crop_part, self._background_part, dst=out_roi)


def _soften_inward(mask: np.ndarray) -> np.ndarray:
    """The mask itself if its edge is already soft; a hard edge is rounded off inward, so zeros stay zero.

    Masks from the portrait stage ramp over many pixels and are used as they are. A step (a ramp under ~4 px)
    would show as a seam, so it is eroded by the blur's reach and then blurred: the new ramp ends at the old edge
    and feathering never leaks outside the mask.
    """
    steepest = max(float(np.abs(np.diff(mask, axis=0)).max()), float(np.abs(np.diff(mask, axis=1)).max()))
    if steepest <= 0.25:
        return mask
    height, width = mask.shape
    reach = max(1, round(min(height, width) / 48))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    eroded = cv2.erode(mask, kernel, borderType=cv2.BORDER_REPLICATE)
    smooth = cv2.GaussianBlur(eroded, (0, 0), sigmaX=reach / 3.0, borderType=cv2.BORDER_REPLICATE)
    return np.minimum(mask, smooth)


class _Pyramid:
    """Multi-band blend in the one-pyramid "difference" form: B + collapse(alpha_i * Lap_i(A - B)).

    Low frequencies (colour, shading) cross the seam over a wide band and fine detail over a narrow one; only the
    difference image gets a Laplacian pyramid, so the call builds one pyramid instead of two (cpu-limits §2).
    All buffers are preallocated: per-call multi-MB temporaries cost page faults on this machine (§0.4).
    """

    def __init__(self, background_roi: np.ndarray, mask: np.ndarray) -> None:
        height, width = mask.shape
        # Stop when the top level is about 16 px: coarser bands would carry colour far beyond the mask.
        depth = max(1, round(math.log2(min(height, width) / 16)))
        sizes = [(height, width)]
        for _ in range(depth):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self._alphas = [cv2.cvtColor(mask.astype(np.float32), cv2.COLOR_GRAY2BGR)]
        for _ in range(depth):
            self._alphas.append(cv2.pyrDown(self._alphas[-1]))
        self._gaussians = [np.empty((h, w, 3), np.float32) for h, w in sizes]
        self._expanded = [np.empty((h, w, 3), np.float32) for h, w in sizes[:-1]]
        self._band = [np.empty((h, w, 3), np.float32) for h, w in sizes[:-1]]
        self._collapsed = [np.empty((h, w, 3), np.float32) for h, w in sizes]
        self._background = background_roi.copy()

    def blend_into(self, crop: np.ndarray, out_roi: np.ndarray) -> None:
        gaussians, expanded, band, collapsed = self._gaussians, self._expanded, self._band, self._collapsed
        cv2.subtract(crop, self._background, dst=gaussians[0], dtype=cv2.CV_32F)
        for level in range(len(gaussians) - 1):
            cv2.pyrDown(gaussians[level], dst=gaussians[level + 1])
        top = len(gaussians) - 1
        cv2.multiply(gaussians[top], self._alphas[top], dst=collapsed[top])
        for level in range(top - 1, -1, -1):
            size = gaussians[level].shape[1::-1]
            cv2.pyrUp(gaussians[level + 1], dst=expanded[level], dstsize=size)
            cv2.subtract(gaussians[level], expanded[level], dst=band[level])
            cv2.multiply(band[level], self._alphas[level], dst=band[level])
            cv2.pyrUp(collapsed[level + 1], dst=collapsed[level], dstsize=size)
            cv2.add(collapsed[level], band[level], dst=collapsed[level])
        cv2.add(self._background, collapsed[0], dst=out_roi, dtype=cv2.CV_8U)


class _Seamless:
    """Poisson (gradient-domain) clone over the mask, via `cv2.seamlessClone` NORMAL_CLONE on the ROI only.

    ~40x slower than feathering (cpu-limits §1): for quality renders, not live 512 crops.
    """

    def __init__(self, background_roi: np.ndarray, mask: np.ndarray) -> None:
        clone_mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        # OpenCV clears the mask's 1-px border before taking its bounding box; do the same so the centre agrees.
        clone_mask[[0, -1], :] = 0
        clone_mask[:, [0, -1]] = 0
        if not clone_mask.any():
            raise ValueError("seamless blending needs mask > 0 somewhere away from the crop's 1-px border")
        x, y, w, h = cv2.boundingRect(clone_mask)
        # seamlessClone centres the mask's bounding box at this point (with its own integer halving), so this
        # centre puts every crop pixel back exactly where it was taken from.
        self._centre = (x + w // 2, y + h // 2)
        self._clone_mask = clone_mask
        self._background = background_roi.copy()

    def blend_into(self, crop: np.ndarray, out_roi: np.ndarray) -> None:
        # A fresh copy every call: seamlessClone writes into its mask argument (opencv#12053), and a reused mask
        # gives alternating results on consecutive frames.
        cv2.seamlessClone(
            crop, self._background, self._clone_mask.copy(), self._centre, cv2.NORMAL_CLONE, blend=out_roi
        )


class Blender:
    """Pastes rendered face crops back into one avatar's portrait with one blend mode.

    Build one per avatar and mode. `background` is the portrait (H, W, 3 uint8 BGR), `roi` = (x0, y0, x1, y1) the
    region the crops replace, `mask` a float (h, w) map in [0, 1] of where a crop differs from the portrait.
    Not thread-safe: scratch buffers are reused, so give each worker thread its own Blender.
    """

    def __init__(self, mode: str, background: np.ndarray, roi: Roi, mask: np.ndarray) -> None:
        if mode not in BLEND_MODES:
            raise ValueError(f"unknown blend mode {mode!r}; valid modes: {', '.join(BLEND_MODES)}")
        _check_background(background)
        self._slices = _roi_slices(roi, background.shape[:2])
        rows, columns = self._slices
        mask = _checked_mask(mask, (rows.stop - rows.start, columns.stop - columns.start))
        self.mode = mode
        self.roi = (columns.start, rows.start, columns.stop, rows.stop)
        self._background = background.copy()
        self._background.flags.writeable = False
        self._crop_shape = (*mask.shape, 3)
        background_roi = self._background[self._slices]
        self._method: _RoiMethod
        match mode:
            case "alpha":
                self._method = _AlphaPaste(mask)
            case "feather":
                self._method = _Feather(mask)
            case "pyramid":
                self._method = _Pyramid(background_roi, mask)
            case "seamless":
                self._method = _Seamless(background_roi, mask)

    def blend(self, crop: np.ndarray) -> np.ndarray:
        """Return a new frame: the portrait with `crop` (h, w, 3 uint8 BGR) blended into the ROI.

        Always a fresh array, because frames wait in queues downstream while the next one is blended.
        """
        if crop.shape != self._crop_shape or crop.dtype != np.uint8:
            raise ValueError(
                f"crop must be {self._crop_shape} uint8 to fit the ROI, got {crop.shape} {crop.dtype}"
            )
        frame = self._background.copy()
        self._method.blend_into(crop, frame[self._slices])
        return frame


def _check_background(background: np.ndarray) -> None:
    if background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8:
        raise ValueError(f"background must be (H, W, 3) uint8 BGR, got {background.shape} {background.dtype}")


def _roi_slices(roi: Roi, frame_size: tuple[int, int]) -> tuple[slice, slice]:
    height, width = frame_size
    x0, y0, x1, y1 = (int(v) for v in roi)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"roi {roi} (x0, y0, x1, y1) must lie inside the {width}x{height} frame and be non-empty")
    return (slice(y0, y1), slice(x0, x1))


def _checked_mask(mask: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """The mask as contiguous float32 (h, w), after checking it matches the ROI and lies in [0, 1]."""
    if mask.shape != crop_size:
        raise ValueError(f"mask must be {crop_size} (ROI height, width), got {mask.shape}")
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    if not np.isfinite(mask).all() or mask.min() < 0.0 or mask.max() > 1.0:
        raise ValueError("mask values must be finite and in [0, 1]")
    if mask.max() == 0.0:
        raise ValueError("mask is zero everywhere: nothing of the crop would be blended")
    return mask


class ComposeStage(Stage):
    """FaceCrop -> VideoFrame: back to frame scale, pasted into the portrait, then enhanced.

    The enhancer runs on this stage's thread, over the whole batch the stage drained: a hop of its own would cost
    more than the light enhancer itself, and a neural enhancer restores the batch's faces together.
    """

    name = "compose"

    def __init__(self, blender: Blender, enhancer: Enhancer | None) -> None:
        super().__init__()
        self.blender = blender
        self.enhancer = enhancer

    def process(self, batch: list[FaceCrop]) -> list[VideoFrame]:
        return self.compose_batch(batch)

    def compose(self, item: FaceCrop) -> np.ndarray:
        crop = item.crop
        x0, y0, x1, y1 = self.blender.roi
        if crop.shape[1] != x1 - x0 or crop.shape[0] != y1 - y0:
            crop = cv2.resize(crop, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        frame = self.blender.blend(crop)
        if item.touch is not None:
            item.touch(frame[y0:y1, x0:x1], (x1 - x0) / item.crop.shape[1], (y1 - y0) / item.crop.shape[0])
        return frame

    def compose_batch(self, batch: list[FaceCrop]) -> list[VideoFrame]:
        images = [self.compose(item) for item in batch]
        if self.enhancer is not None:
            self.enhancer.enhance_batch(images, [self._in_frame(item) for item in batch])
        return [VideoFrame(item.index, image, changed=self.blender.roi) for item, image in zip(batch, images)]

    def _in_frame(self, item: FaceCrop) -> np.ndarray | None:
        """The crop's landmarks in frame pixels (the crop is scaled to the ROI, then placed at its corner)."""
        if item.landmarks is None:
            return None
        x0, y0, x1, y1 = self.blender.roi
        scale = np.array([(x1 - x0) / item.crop.shape[1], (y1 - y0) / item.crop.shape[0]], np.float32)
        return item.landmarks * scale + np.array([x0, y0], np.float32)
