"""SadTalker's preprocessing geometry: the face crop its renderer sees, and the 224 px alignment for its 3DMM network.

Upstream (spec §1.1, §1.2) finds the face with RetinaFace + FAN; here the 68 landmarks come from `stages.portrait`, and
only the geometry is reproduced, including the upstream quirks that change numbers:

* the tight face rectangle takes its bottom edge clamped to the image *width* (upstream typo): it shortens the crop of
  a face taller than the image is wide, e.g. a close-up selfie in portrait orientation, so it is kept;
* the rectangle's corners are picked as upstream picks them (the two left corners for the left edge, ...), which is the
  axis-aligned bound for heads tilted less than 45 degrees;
* `aspect_wh` (upstream's `crop_info[0]`) is the tight rectangle's size before it is clipped to the crop box, also in
  the `ext` modes, as upstream computes it.

Two deliberate differences: the landmarks are carried into the S x S crop by the crop's own transform instead of being
detected again on it (cheaper, and no second detector), and the paste box is given in the original image's pixels
also when a huge face (quad >= 2048 px) made upstream shrink the image first (upstream pastes shrunk coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stages.portrait import five_points

CROP_MODES = ("crop", "extcrop", "resize", "full", "extfull")
# Upstream's `xsize`: it only decides when a huge face makes the image shrink first (quad >= 4 * 512 px).
QUAD_REFERENCE_SIZE_PX = 512
ALIGNED_SIZE_PX = 224
RESCALE_FACTOR = 102.0
# Deep3DFaceRecon's standard face, 5-point reduction of `similarity_Lm3D_all.mat` (spec §1.2): left eye, right eye,
# nose tip, left and right mouth corner; x, y (up), z.
STANDARD_LANDMARKS_3D = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    np.float32,
)
STANDARD_LANDMARKS_3D.setflags(write=False)


@dataclass(frozen=True, slots=True)
class FaceQuad:
    """Upstream's FFHQ-style face square and the boxes derived from it, in the (rarely) shrunk image."""

    corners: np.ndarray                        # (4, 2) float64: c-x-y, c-x+y, c+x+y, c+x-y, shrunk-image pixels
    side: float                                # qsize: the square's side, shrunk-image pixels
    shrink: int                                # 1, or the integer factor a huge face shrinks the image by
    resized_wh: tuple[int, int]                # rsize: the image size every box below refers to
    crop_box: tuple[int, int, int, int]        # clx, cly, crx, cry: the square's bounds + border, inside the image
    quad_rect: tuple[float, float, float, float]  # lx, ly, rx, ry: tight rectangle, relative to crop_box


@dataclass(frozen=True, slots=True)
class SadTalkerCrop:
    """The renderer's source image for one preprocess mode, and where it came from in the original image."""

    mode: str
    source: np.ndarray       # (S, S, 3) uint8 RGB: what upstream writes to its crop PNG and reads back
    source_rgb: np.ndarray   # (S, S, 3) float32 RGB in [0, 1] = source / 255, the renderer's input
    region: tuple[int, int, int, int]  # x0, y0, x1, y1 in original-image pixels that `source` was resized from
    paste_box: tuple[int, int, int, int] | None  # full/extfull: where rendered frames go back (original pixels)
    aspect_wh: tuple[int, int]  # upstream's crop_info[0]: rendered S x S frames are resized to restore this aspect
    landmarks: np.ndarray    # (68, 2) float32, the input landmarks in `source` pixels
    quad: FaceQuad | None    # None for "resize"

    def restored_wh(self) -> tuple[int, int]:
        """The frame size upstream resizes rendered frames to before writing them: (S, int(S * h / w))."""
        size = self.source.shape[1]
        width, height = self.aspect_wh
        return size, int(size * height / width)


def ffhq_quad(landmarks68: np.ndarray, width: int, height: int) -> FaceQuad:
    """Upstream's `align_face` on an image of `width` x `height`: an oriented square around eyes and mouth."""
    points = np.asarray(landmarks68, np.float64)
    eye_left = points[36:42].mean(axis=0)
    eye_right = points[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (points[48] + points[54]) * 0.5 - eye_avg

    # x runs along the eyes, tilted by the eye-mouth direction turned a quarter; y is x turned a quarter.
    x_axis = eye_to_eye - eye_to_mouth[::-1] * (-1.0, 1.0)
    x_axis = x_axis / np.hypot(*x_axis) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y_axis = x_axis[::-1] * (-1.0, 1.0)
    centre = eye_avg + eye_to_mouth * 0.1
    corners = np.stack([centre - x_axis - y_axis, centre - x_axis + y_axis,
                        centre + x_axis + y_axis, centre + x_axis - y_axis])
    side = float(np.hypot(*x_axis) * 2)

    shrink = int(np.floor(side / QUAD_REFERENCE_SIZE_PX * 0.5))
    if shrink > 1:
        resized_wh = (int(np.rint(width / shrink)), int(np.rint(height / shrink)))
        corners = corners / shrink
        side = side / shrink
    else:
        shrink = 1
        resized_wh = (width, height)
    resized_width, resized_height = resized_wh

    border = max(int(np.rint(side * 0.1)), 3)
    low = np.floor(corners.min(axis=0)).astype(int)
    high = np.ceil(corners.max(axis=0)).astype(int)
    crop_box = (max(int(low[0]) - border, 0), max(int(low[1]) - border, 0),
                min(int(high[0]) + border, resized_width), min(int(high[1]) + border, resized_height))

    # Upstream shifts the quad only when the box is smaller than the image; otherwise the box starts at 0, 0 anyway.
    shifted = corners - np.array(crop_box[:2], np.float64) + 0.5
    quad_rect = (
        float(max(min(shifted[0, 0], shifted[1, 0]), 0.0)),
        float(max(min(shifted[0, 1], shifted[3, 1]), 0.0)),
        float(min(max(shifted[2, 0], shifted[3, 0]), float(resized_width))),
        float(min(max(shifted[1, 1], shifted[2, 1]), float(resized_width))),  # sic: upstream clamps y with the width
    )
    return FaceQuad(corners, side, shrink, resized_wh, crop_box, quad_rect)


def sadtalker_crop(image_bgr: np.ndarray, landmarks68: np.ndarray, mode: str, size: int) -> SadTalkerCrop:
    """Cut the face region of `mode` (spec §1.1's table) and resize it to `size` x `size` as upstream does.

    `landmarks68` are (68, 2) in `image_bgr`'s pixels. The resize ignores the aspect ratio (cv2 bilinear), as upstream.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"unknown SadTalker preprocess mode {mode!r}; expected one of {', '.join(CROP_MODES)}")
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    points = np.asarray(landmarks68, np.float64)

    if mode == "resize":
        quad = None
        shrunk = rgb
        box = (0, 0, width, height)
        aspect_wh = (width, height)
    else:
        quad = ffhq_quad(points, width, height)
        shrunk = rgb if quad.shrink == 1 else cv2.resize(rgb, quad.resized_wh)
        clx, cly, crx, cry = quad.crop_box
        lx, ly, rx, ry = (int(v) for v in quad.quad_rect)  # upstream truncates; all are >= 0
        aspect_wh = (rx - lx, ry - ly)
        if mode in ("extcrop", "extfull"):
            box = quad.crop_box
        else:
            # Upstream slices the crop box with numpy, which clips the rectangle where it passes the box.
            crop_width, crop_height = crx - clx, cry - cly
            box = (clx + min(lx, crop_width), cly + min(ly, crop_height),
                   clx + min(rx, crop_width), cly + min(ry, crop_height))
        scale_x, scale_y = quad.resized_wh[0] / width, quad.resized_wh[1] / height
        # Pixel centres map as cv2.resize maps them.
        points = (points + 0.5) * (scale_x, scale_y) - 0.5

    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the {mode} region {box} is empty: the face lies outside the image")
    source = cv2.resize(np.ascontiguousarray(shrunk[y0:y1, x0:x1]), (size, size))
    local = (points - (x0, y0) + 0.5) * (size / (x1 - x0), size / (y1 - y0)) - 0.5

    region = box if quad is None or quad.shrink == 1 else _unshrink(box, quad.resized_wh, width, height)
    paste_box = region if mode in ("full", "extfull") else None
    return SadTalkerCrop(mode, source, source.astype(np.float32) / np.float32(255), region, paste_box, aspect_wh,
                         local.astype(np.float32), quad)


def _unshrink(box: tuple[int, int, int, int], resized_wh: tuple[int, int], width: int,
              height: int) -> tuple[int, int, int, int]:
    """A box in the shrunk image, in original-image pixels."""
    fx, fy = width / resized_wh[0], height / resized_wh[1]
    return round(box[0] * fx), round(box[1] * fy), min(round(box[2] * fx), width), min(round(box[3] * fy), height)


def pos_similarity(points2d: np.ndarray, points3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Translation (2,) and scale of the affine camera that best projects `points3d` onto `points2d`.

    Linear least squares over 2N equations for two projection rows and two offsets (8 unknowns); the scale is the
    mean norm of the two rows, so it is exact for a rotated, scaled, shifted orthographic view of `points3d`.
    """
    model = np.asarray(points3d, np.float64)
    count = model.shape[0]
    system = np.zeros((2 * count, 8))
    system[0::2, 0:3] = model
    system[0::2, 3] = 1
    system[1::2, 4:7] = model
    system[1::2, 7] = 1
    solution = np.linalg.lstsq(system, np.asarray(points2d, np.float64).reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(solution[0:3]) + np.linalg.norm(solution[4:7])) / 2
    return solution[[3, 7]], float(scale)


@dataclass(frozen=True, slots=True)
class _Placement:
    """How `align_to_224` scales the image and where it cuts, in upstream's arithmetic."""

    scale: float
    translation: np.ndarray  # (2,) POS translation, y-up image frame
    scaled_wh: tuple[int, int]
    left: int
    up: int


def _placement(landmarks68: np.ndarray, height: int, width: int) -> _Placement:
    points = np.array(landmarks68, np.float64)
    points[:, 1] = height - 1 - points[:, 1]  # Deep3DFaceRecon's y axis points up
    translation, pos_scale = pos_similarity(five_points(points), STANDARD_LANDMARKS_3D)
    scale = RESCALE_FACTOR / pos_scale
    scaled_width, scaled_height = int(width * scale), int(height * scale)
    half = ALIGNED_SIZE_PX / 2
    # int() truncates towards zero, as upstream's astype(np.int32): not a floor for negative offsets.
    left = int(scaled_width / 2 - half + (translation[0] - width / 2) * scale)
    up = int(scaled_height / 2 - half + (height / 2 - translation[1]) * scale)
    return _Placement(scale, translation, (scaled_width, scaled_height), left, up)


def align_to_224(image_rgb: np.ndarray, landmarks68: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deep3DFaceRecon's `align_img`: scale the face to the standard size and cut the 224 x 224 network input.

    `image_rgb` (H, W, 3) uint8, `landmarks68` (68, 2) in its pixels (y down). Returns the (224, 224, 3) uint8 RGB
    crop (zeros where it passes the image border) and float32 trans_params (w0, h0, s, t0, t1) as upstream stores
    them, t in upstream's y-up frame.
    """
    height, width = image_rgb.shape[:2]
    place = _placement(landmarks68, height, width)
    resized = _resize_bicubic(np.ascontiguousarray(image_rgb), place.scaled_wh)
    aligned = _cut_zero_filled(resized, place.left, place.up, ALIGNED_SIZE_PX)
    trans_params = np.array([width, height, place.scale, *place.translation], np.float32)
    return aligned, trans_params


def aligned_points(points: np.ndarray, landmarks68: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Where image `points` (N, 2, y down) land in `align_to_224(image, landmarks68)`'s output."""
    height, width = image_hw
    place = _placement(landmarks68, height, width)
    # Pixel centres map as the resize maps them.
    factors = (place.scaled_wh[0] / width, place.scaled_wh[1] / height)
    return (np.asarray(points, np.float64) + 0.5) * factors - 0.5 - (place.left, place.up)


def _resize_bicubic(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Pillow's bicubic (a = -0.5, antialiased when shrinking), as upstream; OpenCV's cubic when Pillow is absent."""
    try:
        from PIL import Image
    except ImportError:
        # Pillow comes with torchvision (the sadtalker extra); without it the pixels differ by a few levels.
        shrinking = size_wh[0] < image.shape[1]
        return cv2.resize(image, size_wh, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return np.asarray(Image.fromarray(image).resize(size_wh, Image.Resampling.BICUBIC))


def _cut_zero_filled(image: np.ndarray, left: int, up: int, size: int) -> np.ndarray:
    """image[up:up+size, left:left+size] with zeros outside the image, as PIL's crop fills."""
    out = np.zeros((size, size, *image.shape[2:]), image.dtype)
    height, width = image.shape[:2]
    x0, y0 = max(left, 0), max(up, 0)
    x1, y1 = min(left + size, width), min(up + size, height)
    if x1 > x0 and y1 > y0:
        out[y0 - up:y1 - up, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return out
