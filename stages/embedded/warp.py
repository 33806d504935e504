"""Embedded renderer: one `Expression` -> the face crop warped to it, with no model weights.

Per avatar, once: a fixed triangle mesh over the 68 landmarks, anchor points around the face and a fixed frame of
points inset from the crop border; the portrait's mouth closed by an exact per-pixel piecewise-affine warp (the
rest pose of aperture 0 is lips touching, whatever the photo shows; its teeth painted over with lip first); unit
landmark moves for opening, spreading and rounding; the exact inverse of the mesh warp tabulated over a grid of
mouth commands (on a node lattice of about 64 a side); mouth textures from the portrait's lips and teeth; a head
weight that is 1 on the face and 0 well inside the crop.

Per frame: the tabulated inverse shifts are interpolated for the command, the head similarity is composed on top,
the node shifts are upsampled and `cv2.remap` samples the closed-mouth crop; the mouth interior is then painted
inside the moved inner lips, and a blink slides each upper lid down over its eye. About 0.7 ms for a 190 px crop on
one core.

Coordinates are crop pixels (x right, y down); expression lengths are fractions of IOD = |p36 - p45|.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from scipy.spatial import Delaunay

from stages.embedded.motion import Expression
from stages.embedded.mouth import (
    LOWER_INNER,
    UPPER_INNER,
    UPPER_INNER_CHAIN,
    MouthPalette,
    catmull_rom_matrix,
    curve_y,
    smoothstep,
)

UPPER_LIDS = (37, 38, 43, 44)
LOWER_LIDS = (41, 40, 47, 46)  # paired with UPPER_LIDS
MOUTH_POINTS = tuple(range(3, 14)) + tuple(range(48, 68))
EYE_POINTS = UPPER_LIDS + LOWER_LIDS

# Where the lids meet on a blink, as a fraction of the way from the upper to the lower lid: a shut eye's lash line
# sits low, so the upper lid does most of the travel.
LID_MEET = 0.8
# The skin above the upper lid's edge that becomes the closing lid, as a fraction of the eye's opening.
LID_SKIN = 0.6
LID_TRAVEL = 1.0   # how far a shut lid's edge travels, in eye openings: onto the lower lid
LASH_LINE = 0.65  # the upper lashes and their shadow, as a fraction of the eye's opening: they move, never stretch
CLEAN_SKIN = 1.0  # the share of the lid's skin, from the crease down, that is free of lashes
LASH_SHADE = 0.35  # how much darker a shut eye's lash line is than the open eye's
LEFT_EYE_UPPER, LEFT_EYE_LOWER = (36, 37, 38, 39), (36, 41, 40, 39)
RIGHT_EYE_UPPER, RIGHT_EYE_LOWER = (42, 43, 44, 45), (42, 47, 46, 45)

# Unit moves (per 1.0 IOD of command) in the face frame: (along the eye line to image right, towards the chin).
# Opening: the lower lip travels with the jaw; the chin follows ~0.6 of the lower lip, the cheeks less; the upper
# lip rises a little. Inner-lip pairs separate by exactly 1.0 per unit.
OPEN_MOVES = {
    61: (0.0, -0.15), 62: (0.0, -0.15), 63: (0.0, -0.15),
    65: (0.0, 0.85), 66: (0.0, 0.85), 67: (0.0, 0.85),
    60: (0.0, 0.3), 64: (0.0, 0.3), 48: (0.0, 0.25), 54: (0.0, 0.25),
    49: (0.0, -0.08), 50: (0.0, -0.12), 51: (0.0, -0.12), 52: (0.0, -0.12), 53: (0.0, -0.08),
    55: (0.0, 0.6), 56: (0.0, 0.82), 57: (0.0, 0.85), 58: (0.0, 0.82), 59: (0.0, 0.6),
    3: (0.0, 0.05), 4: (0.0, 0.15), 5: (0.0, 0.28), 6: (0.0, 0.4), 7: (0.0, 0.49), 8: (0.0, 0.52),
    9: (0.0, 0.49), 10: (0.0, 0.4), 11: (0.0, 0.28), 12: (0.0, 0.15), 13: (0.0, 0.05),
}

# Spreading ("ee"): corners out (p48-p54 grows by 1.0 per unit), lips thinner against the teeth, corners a bit up.
SPREAD_MOVES = {
    48: (-0.5, -0.08), 54: (0.5, -0.08), 60: (-0.46, -0.05), 64: (0.46, -0.05),
    49: (-0.3, 0.0), 53: (0.3, 0.0), 59: (-0.3, 0.0), 55: (0.3, 0.0),
    50: (-0.12, 0.08), 51: (0.0, 0.1), 52: (0.12, 0.08), 58: (-0.12, -0.08), 57: (0.0, -0.1), 56: (0.12, -0.08),
    61: (-0.2, 0.0), 63: (0.2, 0.0), 67: (-0.2, 0.0), 65: (0.2, 0.0),
    2: (-0.04, 0.0), 3: (-0.04, 0.0), 13: (0.04, 0.0), 14: (0.04, 0.0),
}

# Rounding ("oo"), per unit of width *decrease*: the corners drawn in (the inner ones further, so the opening becomes
# a small oval), both lips pushed forward, which from the front reads as fuller lips: the upper lip's outline rises,
# the lower one's drops. A smiling portrait's corners also come down to the lips' middle (see `_round_basis`).
ROUND_MOVES = {
    48: (0.6, 0.0), 54: (-0.6, 0.0), 60: (0.65, 0.0), 64: (-0.65, 0.0),
    49: (0.35, -0.2), 53: (-0.35, -0.2), 59: (0.35, 0.2), 55: (-0.35, 0.2),
    50: (0.15, -0.3), 51: (0.0, -0.3), 52: (-0.15, -0.3), 58: (0.15, 0.3), 57: (0.0, 0.3), 56: (-0.15, 0.3),
    61: (0.35, 0.0), 63: (-0.35, 0.0), 67: (0.35, 0.0), 65: (-0.35, 0.0),
}
# How much of a smile's lift of the corners a full rounding (0.16 IOD of drawn width; an /u/ draws about 0.11) takes
# away.
ROUND_UNSMILE = 0.6
ROUND_FULL_IOD = 0.16
ROUND_OPENING_IOD = 0.1      # the drawn opening from which a rounding unsmiles in full
ROUNDED_TEETH_HIDDEN = 0.8   # the share of the teeth fully rounded lips hide

# Commanded -> drawn geometry, calibrated so that dlib's 68 points on the output read the commanded values (a
# sweep on the astronaut; tests/test_render.py checks it). dlib reads a slit of dark cavity as a wider opening
# than drawn and a wide one as narrower; it reads about 0.6 of a drawn change of the corners' distance.
APERTURE_COMMANDED = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
APERTURE_DRAWN = (0.0, 0.05, 0.085, 0.14, 0.195, 0.25, 0.3, 0.39, 0.43, 0.5)
WIDTH_GAIN = 1.6

# Drawn values at which the inverse warp is tabulated per avatar; others interpolate, beyond the ends they clamp.
APERTURE_LEVELS = np.linspace(0.0, 0.55, 12)
WIDTH_LEVELS = np.linspace(-0.2, 0.2, 9)
CLOSED_GAP_IOD = 0.004  # the rest pose keeps the inner lips this far apart so no triangle starts with zero area
MAX_NODES_PER_SIDE = 64

# A head pose as plain floats (cos roll, sin roll, shift x, shift y in pixels): per frame only a few numbers.
HeadPose = tuple[float, float, float, float]


class WarpRenderer:
    """Per-avatar set-up once (mesh, inverse-map candidates, mouth textures, rest pose); per frame only the warp."""

    def __init__(self, crop: np.ndarray, landmarks: np.ndarray) -> None:
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop must be (h, w, 3) uint8 BGR, got {crop.shape} {crop.dtype}")
        points = np.asarray(landmarks, dtype=np.float64)
        if points.shape != (68, 2):
            raise ValueError(f"landmarks must be (68, 2), got {points.shape}")
        height, width = crop.shape[:2]
        self._shape = (height, width)
        self._iod = float(np.linalg.norm(points[45] - points[36]))
        if self._iod < 8.0:
            raise ValueError(f"eye-corner distance {self._iod:.1f} px is too small to animate")
        self._right = (points[45] - points[36]) / self._iod
        self._down = np.array([-self._right[1], self._right[0]])

        closed = self._closed_pose(points)
        frame_inset = max(3, round(0.06 * min(height, width)))
        anchors = _anchor_points(points, self._iod, self._shape, 2 * frame_inset)
        self._control = np.vstack([closed, anchors, _frame_points(self._shape, frame_inset)])
        self._mesh = Delaunay(self._control).simplices.astype(np.int64)
        count = len(self._control)
        self._open_basis = self._basis(OPEN_MOVES, count)
        self._spread_basis = self._basis(SPREAD_MOVES, count)
        self._round_basis = self._basis(ROUND_MOVES, count)
        self._unsmile_basis = self._unsmile(closed, count)
        self._blink_basis = self._lid_basis(closed, count)

        self._step = max(1, math.ceil(max(height, width) / MAX_NODES_PER_SIDE))
        self._nodes = (math.ceil(height / self._step), math.ceil(width / self._step))
        node_y, node_x = np.mgrid[0 : self._nodes[0], 0 : self._nodes[1]].astype(np.float64)
        self._node_xy = np.dstack([(node_x + 0.5) * self._step - 0.5, (node_y + 0.5) * self._step - 0.5])
        self._pixel_xy = np.dstack(np.meshgrid(np.arange(width), np.arange(height))).astype(np.float32)
        self._box_pixels: dict[tuple[int, int, int, int], np.ndarray] = {}

        mouth = self._touching(MOUTH_POINTS)
        eyes = self._touching(EYE_POINTS)
        self._mouth_shifts = self._shift_table(mouth, [APERTURE_LEVELS, WIDTH_LEVELS], _mouth_command, self._node_xy)
        self._lid_curve = catmull_rom_matrix(4, 8)
        self._lid_box = self._lid_region(points)
        self._head_weight = _head_weight(points, self._iod, self._shape)
        self._head_nodes = cv2.resize(self._head_weight, self._nodes[::-1], interpolation=cv2.INTER_AREA)
        self._head_block = _bbox(self._head_nodes > 0, margin=1, limit=self._nodes)
        top, bottom, left, right = self._head_block
        head_weight = self._head_nodes[top:bottom, left:right]
        head_nodes = self._node_xy[top:bottom, left:right].astype(np.float32)
        # (weighted x, weighted y, weight) per node: the head's inverse similarity is one `cv2.transform` of them.
        self._head_terms = cv2.merge([head_weight * head_nodes[..., 0], head_weight * head_nodes[..., 1], head_weight])
        rows, cols = np.mgrid[top:bottom, left:right].astype(np.float32)
        self._head_node_index = np.dstack([cols, rows])
        self._pivot = closed[8] + 0.25 * self._iod * self._down

        self._curve = catmull_rom_matrix(5, 6)
        # The inner-lip curves straight from points 60..67: rows of the upper curve, then of the lower one.
        self._lip_curves = np.vstack([
            self._curve @ np.eye(8)[[0, 1, 2, 3, 4]], self._curve @ np.eye(8)[[0, 7, 6, 5, 4]]
        ])
        self._palette = MouthPalette(crop, points, self._iod)
        self._base = self._close_mouth(crop, points, mouth)
        frozen, self.mask = self._masks(np.union1d(mouth, eyes))
        # Only pixels inside some remap box can differ from the base: their frozen ones, as flat indices into an
        # (h, w, 3) crop, are all a frame needs to reset (a short list, cheaper than a masked copy of the box).
        remapped = np.zeros(self._shape, dtype=bool)
        for top, bottom, left, right in (
            self._pixel_box(self._mouth_shifts.block), self._pixel_box(self._head_block), self._lid_box
        ):
            remapped[top:bottom, left:right] = True
        self._frozen_index = np.flatnonzero(frozen & remapped[:, :, None])

    # ------------------------------------------------------------------------------------------ per frame

    def landmarks_for(self, expression: Expression) -> np.ndarray:
        """The 68 points the output shows for `expression`, in crop pixels (float32)."""
        return self._moved_landmarks(expression).astype(np.float32)

    def render_batch(self, expressions: Sequence[Expression]) -> list[np.ndarray]:
        return [self.render(expression) for expression in expressions]

    def touch_for(self, expression: Expression) -> Callable[[np.ndarray, float, float], None] | None:
        """The open mouth's inside drawn again at the frame's resolution once the crop is scaled up into it (teeth
        and lip edges stay sharp at any output size); None when the mouth is shut."""
        aperture, width = _clamped_mouth(expression)
        if not aperture:
            return None
        lips = self._moved_points(slice(60, 68), aperture, width, 0.0, _head_pose(expression, self._iod))
        rounding = min(max(-width / ROUND_FULL_IOD, 0.0), 1.0)

        def touch(roi: np.ndarray, scale_x: float, scale_y: float) -> None:
            if max(scale_x, scale_y) > 1.05:  # a crop drawn at the frame's size already has its edges
                self._paint_mouth(roi, lips * (scale_x, scale_y), rounding, 0.5 * (scale_x + scale_y))

        return touch

    def render(self, expression: Expression) -> np.ndarray:
        """A new (h, w, 3) uint8 BGR crop showing `expression`; pixels where `mask` is 0 equal the input crop."""
        out = self._base.copy()
        shift = np.zeros((*self._nodes, 2), dtype=np.float32)
        boxes = []
        aperture, width = _clamped_mouth(expression)
        if aperture or width:
            boxes.append(self._pixel_box(self._mouth_shifts.add_to(shift, (aperture, width))))
        head = _head_pose(expression, self._iod)
        if head is not None:
            shift = self._compose_head(shift, head)
            boxes.append(self._pixel_box(self._head_block))
        blink = min(max(expression.blink, 0.0), 1.0)
        if boxes:
            box = (
                min(box[0] for box in boxes), max(box[1] for box in boxes),
                min(box[2] for box in boxes), max(box[3] for box in boxes),
            )
            self._remap(out, shift, box)
            # Only the inner lips (points 60..67) are needed to paint the mouth, which never opens without a mouth
            # box.
            self._paint_mouth(out, self._moved_points(slice(60, 68), aperture, width, 0.0, head),
                              min(max(-width / ROUND_FULL_IOD, 0.0), 1.0))
        if blink:
            eyes = self._moved_points(slice(36, 48), 0.0, 0.0, 0.0, head)
            for upper, lower in ((LEFT_EYE_UPPER, LEFT_EYE_LOWER), (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER)):
                self._paint_lid(out, eyes[[i - 36 for i in upper]], eyes[[i - 36 for i in lower]], blink)
        # Outside the remapped box (which holds the painted mouth) the output is still the base.
        out.reshape(-1)[self._frozen_index] = self._base.reshape(-1)[self._frozen_index]
        return out

    def _pixel_box(self, node_block: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        top, bottom, left, right = node_block
        return (
            top * self._step, min(bottom * self._step, self._shape[0]),
            left * self._step, min(right * self._step, self._shape[1]),
        )

    # ------------------------------------------------------------------------------------------ set-up pieces

    def _closed_pose(self, points: np.ndarray) -> np.ndarray:
        """The landmarks with the inner lips touching: the portrait's opening undone by the opening moves."""
        rest_aperture = _aperture(points) / self._iod
        closed = points - rest_aperture * self._basis(OPEN_MOVES, len(points))
        half_gap = 0.5 * CLOSED_GAP_IOD * self._iod * self._down
        for upper, lower in zip(UPPER_INNER, LOWER_INNER, strict=True):
            middle = (closed[upper] + closed[lower]) / 2.0
            closed[upper], closed[lower] = middle - half_gap, middle + half_gap
        return closed

    def _unsmile(self, closed: np.ndarray, count: int) -> np.ndarray:
        """Per unit of rounding an open mouth, the corners' move down to the height of the lips' middle: an "oo" does
        not smile (closed lips may: a smile's corners pulled in reads as a pout). Nothing for corners not raised."""
        middle = (closed[62] + closed[66]) / 2.0
        basis = np.zeros((count, 2))
        for corner in (48, 54, 60, 64):
            lift = float(np.dot(middle - closed[corner], self._down))  # > 0: the corner sits above the middle
            if lift > 0.0:
                basis[corner] = (ROUND_UNSMILE / ROUND_FULL_IOD) * lift * self._down
        return basis

    def _basis(self, moves: dict[int, tuple[float, float]], count: int) -> np.ndarray:
        """Pixel displacement of each of `count` control points per 1.0 IOD of command."""
        basis = np.zeros((count, 2))
        for index, (along, towards_chin) in moves.items():
            basis[index] = (along * self._right + towards_chin * self._down) * self._iod
        return basis

    @staticmethod
    def _lid_basis(closed: np.ndarray, count: int) -> np.ndarray:
        """Pixel displacement per unit blink: each upper-lid point meets its lower-lid partner at LID_MEET."""
        basis = np.zeros((count, 2))
        for upper, lower in zip(UPPER_LIDS, LOWER_LIDS, strict=True):
            gap = closed[lower] - closed[upper]
            basis[upper] = LID_MEET * gap
            basis[lower] = (LID_MEET - 1.0) * gap
        return basis

    def _touching(self, points: tuple[int, ...]) -> np.ndarray:
        """Indices of the triangles with a corner among `points`."""
        return np.flatnonzero(np.isin(self._mesh, points).any(axis=1))

    def _shift_table(
        self,
        triangles: np.ndarray,
        levels: list[np.ndarray],
        command: Callable[..., Expression],
        lattice: np.ndarray,
    ) -> _ShiftTable:
        """Exact inverse shifts of a lattice (nodes or pixels) at every point of a grid of drawn values.

        The inverse of a piecewise-affine map is not linear in the command, but it is smooth in it wherever the
        face is not folding; at the spacing used the interpolation error stays well under a pixel outside the
        mouth opening, which the painted interior covers anyway.
        """
        grid = np.array(list(itertools.product(*levels)))
        poses = np.array([self._moved_control(command(*values)) for values in grid])
        inverse = _MeshInverse(self._mesh, triangles, poses, lattice)
        top, bottom, left, right = inverse.block
        shifts = np.array([
            (inverse.sources(pose, self._control) - lattice)[top:bottom, left:right] for pose in poses
        ], dtype=np.float32)
        return _ShiftTable(levels, shifts.reshape(*(len(axis) for axis in levels), *shifts.shape[1:]), inverse.block)

    def _close_mouth(self, crop: np.ndarray, points: np.ndarray, mouth: np.ndarray) -> np.ndarray:
        """The crop warped exactly (per pixel) from the portrait's mouth to the closed rest pose, seam drawn.

        The lips' inner edges are sampled from where the lips really end, and an open portrait's teeth and cavity
        are painted over with lip first, so no sliver of them is left between the closed lips.
        """
        source = self._control.copy()
        source[:68] = self._palette.lip_edges(crop, points)
        opened = _aperture(points) > 0.03 * self._iod
        if opened:
            crop = self._palette.without_opening(crop, points)
        rows = np.arange(self._shape[0], dtype=np.float64)
        cols = np.arange(self._shape[1], dtype=np.float64)
        pixels = np.dstack(np.meshgrid(cols, rows))
        closing = _MeshInverse(self._mesh, mouth, np.array([self._control, source]), pixels)
        sample = closing.sources(self._control, source).astype(np.float32)
        base = cv2.remap(crop, sample[..., 0], sample[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if opened:
            self._palette.draw_seam(base, self._curve @ self._control[list(UPPER_INNER_CHAIN)])
        return base

    def _masks(self, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the output may differ from the input (the complement is frozen), and a soft mask covering it."""
        height, width = self._shape
        may_change = np.zeros(self._shape, dtype=np.uint8)
        for triangle in np.round(self._control[self._mesh[moving]] * 16).astype(np.int32):
            cv2.fillConvexPoly(may_change, triangle, 1, lineType=cv2.LINE_8, shift=4)
        may_change[self._head_weight > 0] = 1
        # Upsampling the node lattice spreads a shift by up to one node spacing, remap by a pixel more.
        grow = self._step + 2
        changing = cv2.dilate(may_change, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        distance = cv2.distanceTransform(1 - changing, cv2.DIST_L2, 3)
        y, x = np.mgrid[0:height, 0:width]
        to_border = np.minimum(np.minimum(x, width - 1 - x), np.minimum(y, height - 1 - y)).astype(np.float32)
        still_border = max(2.0, 0.03 * min(height, width))
        fade = max(1.0, float(np.min(to_border[changing > 0])) - still_border)
        soft = 1.0 - smoothstep(0.0, fade, distance)
        soft[to_border < still_border] = 0.0
        soft[changing > 0] = 1.0
        frozen = np.repeat((soft <= 0.0)[:, :, None], 3, axis=2)
        return frozen, soft.astype(np.float32)

    # ------------------------------------------------------------------------------------------ per-frame pieces

    def _moved_control(self, expression: Expression) -> np.ndarray:
        """All control points after the expression moves (clamped to the tabulated range), before the head."""
        aperture, width = _clamped_mouth(expression)
        blink = min(max(expression.blink, 0.0), 1.0)
        moved = self._control.copy()
        if aperture:
            moved += aperture * self._open_basis
        if width > 0:
            moved += width * self._spread_basis
        elif width < 0:
            moved -= width * self._round_basis
            moved -= width * _opening(aperture) * self._unsmile_basis
        if blink:
            moved += blink * self._blink_basis
        return moved

    def _moved_landmarks(self, expression: Expression) -> np.ndarray:
        """The 68 points after the expression and the head similarity (weighted as the pixels are)."""
        aperture, width = _clamped_mouth(expression)
        blink = min(max(expression.blink, 0.0), 1.0)
        return self._moved_points(slice(0, 68), aperture, width, blink, _head_pose(expression, self._iod))

    def _moved_points(
        self,
        rows: slice,
        aperture: float,
        width: float,
        blink: float,
        head: HeadPose | None,
    ) -> np.ndarray:
        """Control points `rows` after the drawn mouth values, the blink and the head similarity (weighted as the
        pixels are); the same arithmetic as `_moved_control`, in plain floats: for the few points a frame needs
        that costs far less than numpy calls."""
        moves = [(aperture, self._open_basis)] if aperture else []
        if width > 0:
            moves.append((width, self._spread_basis))
        elif width < 0:
            moves.append((-width, self._round_basis))
            moves.append((-width * _opening(aperture), self._unsmile_basis))
        if blink:
            moves.append((blink, self._blink_basis))
        points = self._control[rows].tolist()
        for amount, basis in moves:
            points = [(x + amount * dx, y + amount * dy) for (x, y), (dx, dy) in zip(points, basis[rows].tolist())]
        moved = np.array(points)
        if head is None:
            return moved
        cos, sin, shift_x, shift_y = head
        minus_sin = -sin
        pivot_x, pivot_y = self._pivot.tolist()
        similar = [
            (
                ((x - pivot_x) * cos + (y - pivot_y) * minus_sin) + pivot_x + shift_x,
                ((x - pivot_x) * -minus_sin + (y - pivot_y) * cos) + pivot_y + shift_y,
            )
            for x, y in points
        ]
        weights = _sample_field(self._head_weight, moved).tolist()
        return np.array([
            (x + weight * (new_x - x), y + weight * (new_y - y))
            for (x, y), (new_x, new_y), weight in zip(points, similar, weights, strict=True)
        ])

    def _compose_head(self, shift: np.ndarray, head: HeadPose) -> np.ndarray:
        """Node shifts for the head similarity applied after the expression (pixels; head block only).

        A node shows the expression-warped face at the point the head motion brought to it: the exact inverse
        similarity where the head weight is 1, faded towards no motion with the weight. The inverse similarity
        minus the identity is affine in the node position, so with the weighted positions precomputed it costs
        a few multiply-adds.
        """
        cos, sin, shift_x, shift_y = head
        pivot_x, pivot_y = self._pivot.tolist()
        moved_x, moved_y = pivot_x + shift_x, pivot_y + shift_y
        # The inverse rotation minus the identity, and the offset that keeps the moved pivot where it was.
        back = cv2.transform(self._head_terms, np.array([
            [cos - 1.0, sin, pivot_x - (cos * moved_x + sin * moved_y)],
            [-sin, cos - 1.0, pivot_y - (-sin * moved_x + cos * moved_y)],
        ]))
        top, bottom, left, right = self._head_block
        where = back * np.float32(1.0 / self._step)
        where += self._head_node_index
        composed = np.zeros_like(shift)
        cv2.remap(
            shift, where, None, cv2.INTER_LINEAR, dst=composed[top:bottom, left:right],
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        composed[top:bottom, left:right] += back
        return composed

    def _remap(self, out: np.ndarray, shift: np.ndarray, box: tuple[int, int, int, int]) -> None:
        """Resample the base over the pixel `box` (y0, y1, x0, x1): node shifts upsampled."""
        y0, y1, x0, x1 = box
        step = self._step
        top, left = y0 // step, x0 // step
        bottom, right = -(-y1 // step), -(-x1 // step)
        nodes = shift[top:bottom, left:right]
        upsampled = cv2.resize(nodes, ((right - left) * step, (bottom - top) * step), interpolation=cv2.INTER_LINEAR)
        where = upsampled[y0 - top * step : y1 - top * step, x0 - left * step : x1 - left * step]
        # A contiguous copy of the box's pixel positions adds twice as fast as a slice of the whole grid; only a
        # few boxes ever occur (unions of the mouth, head and eye boxes).
        pixels = self._box_pixels.get(box)
        if pixels is None:
            pixels = self._box_pixels.setdefault(box, self._pixel_xy[y0:y1, x0:x1].copy())
        where += pixels
        # Fixed-point maps (1/32 px) make the remap about twice as fast as float maps and keep whole pixels exact.
        # map2=None (both coordinates in `where`) is OpenCV's documented call; its stub asks for an array
        packed, fraction = cv2.convertMaps(where, None, cv2.CV_16SC2)  # type: ignore[call-overload]
        cv2.remap(
            self._base, packed, fraction, cv2.INTER_CUBIC, dst=out[y0:y1, x0:x1], borderMode=cv2.BORDER_REPLICATE
        )

    def _lid_region(self, points: np.ndarray) -> tuple[int, int, int, int]:
        """The pixel box (y0, y1, x0, x1) a blink may repaint: both eyes, the lid skin above them, any head pose."""
        eyes = points[36:48]
        reach = 0.25 * self._iod
        low, high = eyes.min(axis=0) - reach, eyes.max(axis=0) + reach
        return (max(math.floor(low[1]), 0), min(math.ceil(high[1]) + 1, self._shape[0]),
                max(math.floor(low[0]), 0), min(math.ceil(high[0]) + 1, self._shape[1]))

    def _paint_lid(self, out: np.ndarray, upper: np.ndarray, lower: np.ndarray, blink: float) -> None:
        """Slide the upper lid down over the eye: the skin above the lid's edge stretches down to the edge's new place
        and covers what it passes (iris and white are hidden, not squeezed); its lashes come along with the edge.
        `upper`, `lower`: the eye's corners and lid points (corner, two lid points, corner) where the frame shows
        them."""
        top_curve, bottom_curve = self._lid_curve @ upper, self._lid_curve @ lower
        x0 = max(math.floor(min(upper[0, 0], upper[-1, 0])), 0)
        x1 = min(math.ceil(max(upper[0, 0], upper[-1, 0])) + 1, self._shape[1])
        if x1 - x0 < 2:
            return
        columns = np.arange(x0, x1, dtype=np.float32)
        edge_then = curve_y(top_curve, columns)
        opening = np.maximum(curve_y(bottom_curve, columns) - edge_then, 0.0)
        edge_now = edge_then + np.float32(blink * LID_TRAVEL) * opening
        tallest = np.float32(opening.max())
        crease = edge_then - np.float32(LID_SKIN) * tallest
        lashes = np.float32(max(1.0, LASH_LINE * float(tallest)))
        y0 = max(math.floor(float(crease.min())) - 1, 0)
        y1 = min(math.ceil(float(edge_now.max())) + 2, self._shape[0])
        if y1 - y0 < 2:
            return
        rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        # The lid's skin (crease to lashes) stretches over the way the edge travelled; the lash line keeps its
        # thickness and travels with the edge.
        skin_then, skin_now = edge_then - lashes, edge_now - lashes
        # Only the upper part of the skin is stretched: just above the lashes it is streaked with them.
        stretch = np.float32(CLEAN_SKIN) * (skin_then - crease) / np.maximum(skin_now - crease, np.float32(1e-3))
        travel = edge_now - edge_then
        source_y = np.where(rows < crease, rows,
                            np.where(rows < skin_now, crease + (rows - crease) * stretch, rows - travel))
        source_x = np.broadcast_to(columns[None, :], source_y.shape)
        region = out[y0:y1, x0:x1]
        lid = cv2.remap(region, source_x - x0, (source_y - y0).astype(np.float32), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        # Covered above the edge, the eye below it, over one pixel of soft edge.
        cover = np.clip(edge_now - rows + 0.5, 0.0, 1.0).astype(np.float32)
        # Lashes gather as the lid comes down: the lash line darkens, most at the edge.
        shade = np.clip((rows - skin_now) / lashes, 0.0, 1.0) * cover * np.float32(LASH_SHADE * blink)
        cv2.blendLinear(lid, region, cover - shade, 1.0 - cover, dst=region)

    def _paint_mouth(self, out: np.ndarray, lips: np.ndarray, rounding: float, scale: float = 1.0) -> None:
        """Paint cavity, teeth and tongue inside the moved inner-lip polygon (lips = points 60..67, in `out`'s
        pixels, `scale` times the crop's); rounded lips (`rounding` 0..1) hide most of the teeth."""
        # Plain floats: a handful of numbers is far cheaper in Python than in numpy calls.
        points = lips.tolist()
        gap = sum(math.dist(points[upper], points[lower]) for upper, lower in ((1, 7), (2, 6), (3, 5))) / 3.0
        if gap < 0.02 * self._iod * scale:
            return
        curves = self._lip_curves @ lips
        count = len(self._curve)
        upper, lower = curves[:count], curves[count:]
        polygon = np.concatenate([upper, curves[-2:count:-1]])
        # The ufuncs' own reductions skip the Python wrappers of ndarray.min/max (the curves share their ends).
        (low_x, low_y), (high_x, high_y) = np.minimum.reduce(curves).tolist(), np.maximum.reduce(curves).tolist()
        x0, y0 = max(math.floor(low_x) - 2, 0), max(math.floor(low_y) - 2, 0)
        x1, y1 = min(math.ceil(high_x) + 3, out.shape[1]), min(math.ceil(high_y) + 3, out.shape[0])
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        coverage = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        corner = np.array((x0, y0), dtype=np.float64)
        cv2.fillPoly(coverage, [np.rint((polygon - corner) * 8).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=3)
        alpha = np.multiply(cv2.GaussianBlur(coverage, (3, 3), 0.6), np.float32(1.0 / 255.0), dtype=np.float32)
        interior = self._palette.interior(upper, lower, (x0, y0, x1, y1), 1.0 - ROUNDED_TEETH_HIDDEN * rounding, scale)
        region = out[y0:y1, x0:x1]
        cv2.blendLinear(interior, region, alpha, 1.0 - alpha, dst=region)


class _MeshInverse:
    """Exact inverse of a triangle mesh's piecewise-affine map at fixed lattice points, for any pose in a range.

    Set-up finds, for every lattice point, the triangles whose swept area (the hull of their corners over the
    range's extreme poses) can cover it. Per frame each (point, candidate) pair gets barycentric coordinates in the
    moved triangle; the candidate whose smallest coordinate is largest contains the point, and the same
    coordinates in the rest triangle say where to sample. Points no moving triangle covers lie in still triangles
    and stay where they are. Degenerate (collapsed) triangles never win, so closed lids and lips show their
    neighbours.
    """

    def __init__(self, mesh: np.ndarray, triangles: np.ndarray, poses: np.ndarray, lattice_xy: np.ndarray) -> None:
        self._corners = mesh[triangles]
        self._lattice = lattice_xy
        rows, cols = lattice_xy.shape[:2]
        origin = lattice_xy[0, 0]
        spacing = (lattice_xy[-1, -1] - origin) / np.maximum(np.array([cols, rows]) - 1, 1)
        point_lists, triangle_lists = [], []
        for local, corners in enumerate(self._corners):
            hull = (poses[:, corners].reshape(-1, 2) - origin) / spacing
            low = np.maximum(np.floor(hull.min(axis=0)).astype(int) - 1, 0)
            high = np.minimum(np.ceil(hull.max(axis=0)).astype(int) + 2, (cols, rows))
            if np.any(high <= low):
                continue
            canvas = np.zeros((high[1] - low[1], high[0] - low[0]), dtype=np.uint8)
            outline = np.round(cv2.convexHull((hull - low).astype(np.float32)) * 16).astype(np.int32)
            cv2.fillConvexPoly(canvas, outline, 1, lineType=cv2.LINE_8, shift=4)
            cv2.polylines(canvas, [outline], True, 1, thickness=3, lineType=cv2.LINE_8, shift=4)
            y, x = np.nonzero(canvas)
            point_lists.append((y + low[1]) * cols + (x + low[0]))
            triangle_lists.append(np.full(len(y), local))
        points = np.concatenate(point_lists) if point_lists else np.empty(0, dtype=np.int64)
        owners = np.concatenate(triangle_lists) if triangle_lists else np.empty(0, dtype=np.int64)
        order = np.argsort(points, kind="stable")
        self._pair_point, self._pair_triangle = points[order], owners[order]
        self._pair_xy = lattice_xy.reshape(-1, 2)[self._pair_point]
        self._starts = np.flatnonzero(np.diff(self._pair_point, prepend=-1))
        self._counts = np.diff(np.append(self._starts, len(self._pair_point)))
        # The block holds every point a shift can reach, plus a still point each side so that upsampling a node
        # block fades to nothing inside it.
        if len(points):
            point_rows, point_cols = np.divmod(self._pair_point, cols)
            self.block = (
                max(int(point_rows.min()) - 1, 0), min(int(point_rows.max()) + 2, rows),
                max(int(point_cols.min()) - 1, 0), min(int(point_cols.max()) + 2, cols),
            )
        else:
            self.block = (0, 0, 0, 0)

    def sources(self, moved: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """(rows, cols, 2) positions in the rest pose that each lattice point shows when the mesh is at `moved`."""
        result = self._lattice.copy()
        if not len(self._pair_point):
            return result
        corners = moved[self._corners]
        origin = corners[:, 0]
        first, second = corners[:, 1] - origin, corners[:, 2] - origin
        determinant = first[:, 0] * second[:, 1] - first[:, 1] * second[:, 0]
        usable = np.abs(determinant) > 1e-9
        inverse = np.where(usable, 1.0 / np.where(usable, determinant, 1.0), 0.0)
        # Barycentric coordinates as affine functions of the point: l1 = a1 x + b1 y + c1, l2 likewise.
        a1, b1 = second[:, 1] * inverse, -second[:, 0] * inverse
        a2, b2 = -first[:, 1] * inverse, first[:, 0] * inverse
        c1 = -(a1 * origin[:, 0] + b1 * origin[:, 1])
        c2 = -(a2 * origin[:, 0] + b2 * origin[:, 1])
        coefficients = np.column_stack([a1, b1, c1, a2, b2, c2])[self._pair_triangle]
        x, y = self._pair_xy[:, 0], self._pair_xy[:, 1]
        l1 = coefficients[:, 0] * x + coefficients[:, 1] * y + coefficients[:, 2]
        l2 = coefficients[:, 3] * x + coefficients[:, 4] * y + coefficients[:, 5]
        l0 = 1.0 - l1 - l2
        score = np.minimum(np.minimum(l0, l1), l2)
        score[~usable[self._pair_triangle]] = -np.inf
        best = np.repeat(np.maximum.reduceat(score, self._starts), self._counts)
        winner = np.flatnonzero((score >= best) & (best > -1e-3))
        weights = np.clip(np.column_stack([l0[winner], l1[winner], l2[winner]]), 0.0, None)
        weights /= weights.sum(axis=1, keepdims=True)
        source = np.einsum("nk,nkd->nd", weights, rest[self._corners[self._pair_triangle[winner]]])
        result.reshape(-1, 2)[self._pair_point[winner]] = source
        return result


class _ShiftTable:
    """Lattice shifts tabulated on a grid of drawn values over one lattice block; multilinear in between."""

    def __init__(self, levels: list[np.ndarray], shifts: np.ndarray, block: tuple[int, int, int, int]) -> None:
        self._levels = levels
        self._level_lists = [axis.tolist() for axis in levels]
        self._shifts = shifts  # (*levels, rows, cols, 2) float32
        self.block = block

    def add_to(
        self, shift: np.ndarray, command: tuple[float, ...]
    ) -> tuple[int, int, int, int]:
        """Add the interpolated shifts for `command` into `shift`; return the block of the lattice they cover."""
        corners: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
        for axis, value in zip(self._level_lists, command, strict=True):
            # np.interp(value, axis, range(len(axis))) in plain floats: a scalar costs far less this way.
            upper_index = min(max(bisect.bisect_right(axis, value), 1), len(axis) - 1)
            lower = upper_index - 1
            fraction = min(max((value - axis[lower]) / (axis[upper_index] - axis[lower]), 0.0), 1.0)
            corners = [
                (index + (lower + upper,), weight * (fraction if upper else 1.0 - fraction))
                for index, weight in corners
                for upper in (0, 1)
            ]
        top, bottom, left, right = self.block
        target = shift[top:bottom, left:right]
        weighted = np.empty_like(target)
        for index, weight in corners:
            if weight > 1e-6:
                target += np.multiply(self._shifts[index], np.float32(weight), out=weighted)
        return self.block


def _aperture(points: np.ndarray) -> float:
    """Mean inner-lip gap in pixels, as the acceptance measures it."""
    gaps = points[list(LOWER_INNER)] - points[list(UPPER_INNER)]
    return float(np.linalg.norm(gaps, axis=1).mean())


def _anchor_points(points: np.ndarray, iod: float, shape: tuple[int, int], margin: float) -> np.ndarray:
    """Points around the face (its outline pushed outwards) so that lip and jaw motion stays local."""
    height, width = shape
    outline = points[list(range(17)) + list(range(26, 16, -1))]
    centre = points.mean(axis=0)
    direction = outline - centre
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    # Further below the chin than elsewhere: the jaw drops towards the neck.
    chin_ward = (points[8] - points[27]) / np.linalg.norm(points[8] - points[27])
    below = np.clip(direction @ chin_ward, 0.0, 1.0)
    anchors = outline + direction * (0.45 + 0.3 * below)[:, None] * iod
    anchors[:, 0] = np.clip(anchors[:, 0], margin, width - 1 - margin)
    anchors[:, 1] = np.clip(anchors[:, 1], margin, height - 1 - margin)
    kept: list[np.ndarray] = []
    for anchor in anchors:
        clear_of_face = np.min(np.linalg.norm(points - anchor, axis=1)) > 0.15 * iod
        clear_of_kept = all(np.linalg.norm(anchor - other) > 0.25 * iod for other in kept)
        if clear_of_face and clear_of_kept:
            kept.append(anchor)
    return np.array(kept).reshape(-1, 2)


def _frame_points(shape: tuple[int, int], inset: int, per_side: int = 8) -> np.ndarray:
    """A fixed square of points `inset` pixels inside the crop: outside it nothing ever moves."""
    height, width = shape
    xs = np.linspace(inset, width - 1 - inset, per_side + 1)
    ys = np.linspace(inset, height - 1 - inset, per_side + 1)
    top = np.column_stack([xs, np.full_like(xs, inset)])
    bottom = np.column_stack([xs, np.full_like(xs, height - 1 - inset)])
    left = np.column_stack([np.full_like(ys[1:-1], inset), ys[1:-1]])
    right = np.column_stack([np.full_like(ys[1:-1], width - 1 - inset), ys[1:-1]])
    return np.vstack([top, bottom, left, right])


def _mouth_command(aperture: float, width: float) -> Expression:
    """The command that draws this aperture and width change (the calibration inverted)."""
    commanded = float(np.interp(aperture, APERTURE_DRAWN, APERTURE_COMMANDED))
    return Expression(0, aperture=commanded, width=width / WIDTH_GAIN)


def _opening(aperture: float) -> float:
    """How open the lips are for the rounding's unsmiling (0 closed .. 1 from an "oo"'s usual opening up)."""
    return min(aperture / ROUND_OPENING_IOD, 1.0)


def _clamped_mouth(expression: Expression) -> tuple[float, float]:
    """Drawn aperture and width change (IOD) for a command, within the tabulated range."""
    aperture = float(np.interp(max(expression.aperture, 0.0), APERTURE_COMMANDED, APERTURE_DRAWN))
    width = min(max(expression.width * WIDTH_GAIN, float(WIDTH_LEVELS[0])), float(WIDTH_LEVELS[-1]))
    return aperture, width


def _head_pose(expression: Expression, iod: float) -> HeadPose | None:
    """The head's rotation and pixel shift; positive roll turns the top of the head to image right."""
    if not (expression.head_roll_deg or expression.head_dx or expression.head_dy):
        return None
    angle = math.radians(expression.head_roll_deg)
    return math.cos(angle), math.sin(angle), expression.head_dx * iod, expression.head_dy * iod


def _head_weight(points: np.ndarray, iod: float, shape: tuple[int, int]) -> np.ndarray:
    """How much of the head motion each pixel takes: 1 over the face and forehead, 0 near the crop border."""
    height, width = shape
    low = np.array([points[:, 0].min(), points[17:27, 1].min() - 0.6 * iod])
    high = points.max(axis=0) + np.array([0.0, 0.3 * iod])  # the jaw drops when the mouth opens
    centre, axes = (low + high) / 2.0, (high - low) / 2.0
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot((x - centre[0]) / axes[0], (y - centre[1]) / axes[1])
    inner = float(np.max(np.hypot((points[:, 0] - centre[0]) / axes[0], (points[:, 1] - centre[1]) / axes[1])))
    weight = 1.0 - smoothstep(inner * 1.05, inner * 1.6, radius)
    side = min(height, width)
    to_border = np.minimum(np.minimum(x, width - 1 - x), np.minimum(y, height - 1 - y))
    weight *= smoothstep(0.07 * side, 0.15 * side, to_border)
    weight[weight < 1e-3] = 0.0
    return weight.astype(np.float32)


def _sample_field(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of a float32 (h, w) field at (n, 2) pixel positions."""
    xy = points.astype(np.float32).reshape(1, -1, 2)
    return cv2.remap(field, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0].astype(np.float64)


def _bbox(region: np.ndarray, margin: int, limit: tuple[int, int]) -> tuple[int, int, int, int]:
    """Half-open (top, bottom, left, right) box of the True cells, grown by `margin` and clipped to `limit`."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return (
        max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, limit[0]),
        max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, limit[1]),
    )
