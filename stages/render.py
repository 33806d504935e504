"""Embedded renderer: one `Expression` -> the face crop warped to it, with no model weights.

Per avatar, once: a fixed triangle mesh over the 68 landmarks, anchor points around the face and a fixed frame of
points inset from the crop border; the portrait's mouth closed by an exact piecewise-affine warp (the rest pose of
aperture 0 is lips touching, whatever the photo shows); unit landmark moves for opening, spreading, rounding and
blinking; per-avatar mouth colours and the portrait's own teeth; for every lattice node, the triangles that can
cover it over the whole expression range.

Per frame: the control points move (expression, then the head similarity weighted from 1 on the face to 0 at the
frame), the exact inverse of the piecewise-affine map is evaluated on a coarse node lattice (about 64 a side),
upsampled, and `cv2.remap` samples the closed-mouth crop; the mouth interior is painted inside the moved inner lips.

Coordinates are crop pixels (x right, y down); expression lengths are fractions of IOD = |p36 - p45|.
"""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
from scipy.spatial import Delaunay

from stages.motion import Expression

UPPER_INNER = (61, 62, 63)
LOWER_INNER = (67, 66, 65)  # paired with UPPER_INNER, as the aperture measure pairs them
UPPER_INNER_CHAIN = (60, 61, 62, 63, 64)
LOWER_INNER_CHAIN = (60, 67, 66, 65, 64)
UPPER_LIDS = (37, 38, 43, 44)
LOWER_LIDS = (41, 40, 47, 46)  # paired with UPPER_LIDS
MOUTH_POINTS = tuple(range(3, 14)) + tuple(range(48, 68))
EYE_POINTS = UPPER_LIDS + LOWER_LIDS

# Where the lids meet on a blink, as a fraction of the way from the upper to the lower lid: a shut eye's lash line
# sits low, so the upper lid does most of the travel.
LID_MEET = 0.8

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
# Rounding ("oo"), per unit of width *decrease*: corners in, lips pushed forward, which reads as fuller and rounder.
ROUND_MOVES = {
    48: (0.5, 0.0), 54: (-0.5, 0.0), 60: (0.45, 0.0), 64: (-0.45, 0.0),
    49: (0.32, -0.15), 53: (-0.32, -0.15), 59: (0.32, 0.15), 55: (-0.32, 0.15),
    50: (0.15, -0.25), 51: (0.0, -0.25), 52: (-0.15, -0.25), 58: (0.15, 0.25), 57: (0.0, 0.25), 56: (-0.15, 0.25),
    61: (0.25, 0.0), 63: (-0.25, 0.0), 67: (0.25, 0.0), 65: (-0.25, 0.0),
}

# Commanded aperture -> drawn inner-lip opening (calibrated with dlib on the astronaut: see tests/test_render.py).
APERTURE_GAIN = 1.0
# Commands at which the inverse warp is tabulated per avatar; others interpolate, beyond the ends they clamp.
APERTURE_LEVELS = np.linspace(0.0, 0.5, 11)
WIDTH_LEVELS = np.linspace(-0.15, 0.15, 7)
BLINK_LEVELS = np.linspace(0.0, 1.0, 6)
CLOSED_GAP_IOD = 0.004  # the rest pose keeps the inner lips this far apart so no triangle starts with zero area
MAX_NODES_PER_SIDE = 64


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
        self._blink_basis = self._lid_basis(closed, count)

        self._step = max(1, math.ceil(max(height, width) / MAX_NODES_PER_SIDE))
        self._nodes = (math.ceil(height / self._step), math.ceil(width / self._step))
        node_y, node_x = np.mgrid[0 : self._nodes[0], 0 : self._nodes[1]].astype(np.float64)
        self._node_xy = np.dstack([(node_x + 0.5) * self._step - 0.5, (node_y + 0.5) * self._step - 0.5])
        self._pixel_x, self._pixel_y = (
            grid.astype(np.float32) for grid in np.meshgrid(np.arange(width), np.arange(height))
        )

        mouth = self._touching(MOUTH_POINTS)
        eyes = self._touching(EYE_POINTS)
        self._mouth_shifts = self._shift_table(mouth, [APERTURE_LEVELS, WIDTH_LEVELS], _mouth_command)
        self._eye_shifts = self._shift_table(eyes, [BLINK_LEVELS], _blink_command)
        self._head_weight = _head_weight(points, self._iod, self._shape)
        self._head_nodes = cv2.resize(self._head_weight, self._nodes[::-1], interpolation=cv2.INTER_AREA)
        self._head_block = _bbox(self._head_nodes > 0, margin=1, limit=self._nodes)
        self._pivot = closed[8] + 0.25 * self._iod * self._down

        self._palette = _MouthPalette(crop, points, self._iod)
        self._base = self._close_mouth(crop, points, mouth)
        self._frozen, self.mask = self._masks(np.union1d(mouth, eyes))
        self._curve = _catmull_rom_matrix(5, 6)

    # ------------------------------------------------------------------------------------------ per frame

    def landmarks_for(self, expression: Expression) -> np.ndarray:
        """The 68 points the output shows for `expression`, in crop pixels (float32)."""
        return self._moved_landmarks(expression).astype(np.float32)

    def render(self, expression: Expression) -> np.ndarray:
        """A new (h, w, 3) uint8 BGR crop showing `expression`; pixels where `mask` is 0 equal the input crop."""
        out = self._base.copy()
        shift, block = self._expression_shift(expression)
        head = _head_pose(expression, self._iod)
        if head is not None:
            shift, block = self._compose_head(shift, head), self._head_block
        if block is not None:
            self._remap(out, shift, block)
        self._paint_mouth(out, self._moved_landmarks(expression)[60:68])
        np.copyto(out, self._base, where=self._frozen)
        return out

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

    def _shift_table(self, triangles: np.ndarray, levels: list[np.ndarray], command) -> _ShiftTable:
        """Exact inverse shifts of the node lattice at every point of a grid of commands, for interpolation.

        The inverse of a piecewise-affine map is not linear in the command, but it is smooth in it wherever the
        face is not folding; at the spacing used the interpolation error stays well under a pixel outside the
        mouth opening, which the painted interior covers anyway.
        """
        grid = np.array(list(itertools.product(*levels)))
        poses = np.array([self._moved_control(command(*values)) for values in grid])
        inverse = _MeshInverse(self._mesh, triangles, poses, self._node_xy)
        top, bottom, left, right = inverse.block
        shifts = np.array([
            (inverse.sources(pose, self._control) - self._node_xy)[top:bottom, left:right] for pose in poses
        ], dtype=np.float32)
        return _ShiftTable(levels, shifts.reshape(*(len(axis) for axis in levels), *shifts.shape[1:]), inverse.block)

    def _close_mouth(self, crop: np.ndarray, points: np.ndarray, mouth: np.ndarray) -> np.ndarray:
        """The crop warped exactly (per pixel) from the portrait's mouth to the closed rest pose, seam drawn.

        The lips' inner edges are sampled from where the lips really end: on a smile dlib puts the upper inner-lip
        points on the teeth, which would leave white specks along the closed lips.
        """
        source = self._control.copy()
        source[:68] = self._palette.lip_edges(crop, points)
        rows = np.arange(self._shape[0], dtype=np.float64)
        cols = np.arange(self._shape[1], dtype=np.float64)
        pixels = np.dstack(np.meshgrid(cols, rows))
        closing = _MeshInverse(self._mesh, mouth, np.array([self._control, source]), pixels)
        sample = closing.sources(self._control, source).astype(np.float32)
        base = cv2.remap(crop, sample[..., 0], sample[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if _aperture(points) > 0.03 * self._iod:
            seam = self._curve_points(self._control[list(UPPER_INNER_CHAIN)])
            self._palette.draw_seam(base, seam)
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
        may_change = cv2.dilate(may_change, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        distance = cv2.distanceTransform(1 - may_change, cv2.DIST_L2, 3)
        y, x = np.mgrid[0:height, 0:width]
        to_border = np.minimum(np.minimum(x, width - 1 - x), np.minimum(y, height - 1 - y)).astype(np.float32)
        fade = max(1.0, float(np.min(to_border[may_change > 0])) - 2.0)
        soft = 1.0 - _smoothstep(0.0, fade, distance)
        soft[to_border < 2] = 0.0
        soft[may_change > 0] = 1.0
        frozen = np.repeat((soft <= 0.0)[:, :, None], 3, axis=2)
        return frozen, soft.astype(np.float32)

    def _curve_points(self, chain: np.ndarray) -> np.ndarray:
        return _catmull_rom_matrix(len(chain), 6) @ chain

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
        if blink:
            moved += blink * self._blink_basis
        return moved

    def _moved_landmarks(self, expression: Expression) -> np.ndarray:
        """The 68 points after the expression and the head similarity (weighted as the pixels are)."""
        moved = self._moved_control(expression)[:68]
        head = _head_pose(expression, self._iod)
        if head is None:
            return moved
        rotation, translation = head
        weight = _sample_field(self._head_weight, moved)
        similar = (moved - self._pivot) @ rotation.T + self._pivot + translation
        return moved + weight[:, None] * (similar - moved)

    def _expression_shift(self, expression: Expression) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """Node shifts (source minus node, pixels) of the mouth and eyes, and the node block they span."""
        shift = np.zeros((*self._nodes, 2), dtype=np.float32)
        blocks = []
        aperture, width = _clamped_mouth(expression)
        if aperture or width:
            blocks.append(self._mouth_shifts.add_to(shift, (aperture, width)))
        blink = min(max(expression.blink, 0.0), 1.0)
        if blink:
            blocks.append(self._eye_shifts.add_to(shift, (blink,)))
        if not blocks:
            return shift, None
        stacked = np.array(blocks)
        return shift, (stacked[:, 0].min(), stacked[:, 1].max(), stacked[:, 2].min(), stacked[:, 3].max())

    def _compose_head(self, shift: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Node shifts for the head similarity applied after the expression (pixels; head block only).

        A node shows the expression-warped face at the point the head motion brought to it: the exact inverse
        similarity where the head weight is 1, faded towards no motion with the weight.
        """
        rotation, translation = head
        top, bottom, left, right = self._head_block
        nodes = self._node_xy[top:bottom, left:right]
        relative_x = nodes[..., 0] - (self._pivot[0] + translation[0])
        relative_y = nodes[..., 1] - (self._pivot[1] + translation[1])
        # The inverse rotation is the transpose.
        back_x = rotation[0, 0] * relative_x + rotation[1, 0] * relative_y + self._pivot[0] - nodes[..., 0]
        back_y = rotation[0, 1] * relative_x + rotation[1, 1] * relative_y + self._pivot[1] - nodes[..., 1]
        weight = self._head_nodes[top:bottom, left:right]
        origin = nodes + np.dstack([weight * back_x, weight * back_y])
        composed = np.zeros_like(shift)
        node_coords = ((origin + 0.5) / self._step - 0.5).astype(np.float32)
        expression = cv2.remap(
            shift, node_coords[..., 0], node_coords[..., 1], cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        composed[top:bottom, left:right] = origin - nodes + expression
        return composed

    def _remap(self, out: np.ndarray, shift: np.ndarray, block: tuple[int, int, int, int]) -> None:
        """Upsample the node shifts of `block` (node rows/cols, half-open) and resample the base there."""
        top, bottom, left, right = block
        step = self._step
        nodes = np.ascontiguousarray(shift[top:bottom, left:right], dtype=np.float32)
        upsampled = cv2.resize(nodes, ((right - left) * step, (bottom - top) * step), interpolation=cv2.INTER_LINEAR)
        y0, x0 = top * step, left * step
        y1, x1 = min(bottom * step, self._shape[0]), min(right * step, self._shape[1])
        upsampled = upsampled[: y1 - y0, : x1 - x0]
        map_x = self._pixel_x[y0:y1, x0:x1] + upsampled[..., 0]
        map_y = self._pixel_y[y0:y1, x0:x1] + upsampled[..., 1]
        # Fixed-point maps (1/32 px) make the remap about twice as fast as float maps and keep whole pixels exact.
        packed, fraction = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
        cv2.remap(
            self._base, packed, fraction, cv2.INTER_LINEAR, dst=out[y0:y1, x0:x1], borderMode=cv2.BORDER_REPLICATE
        )

    def _paint_mouth(self, out: np.ndarray, lips: np.ndarray) -> None:
        """Paint cavity, teeth and tongue inside the moved inner-lip polygon (lips = points 60..67)."""
        gap = float(np.linalg.norm(lips[[1, 2, 3]] - lips[[7, 6, 5]], axis=1).mean())
        if gap < 0.02 * self._iod:
            return
        upper = self._curve @ lips[[0, 1, 2, 3, 4]]
        lower = self._curve @ lips[[0, 7, 6, 5, 4]]
        polygon = np.vstack([upper, lower[::-1][1:-1]])
        low = np.floor(polygon.min(axis=0)).astype(int) - 2
        high = np.ceil(polygon.max(axis=0)).astype(int) + 3
        x0, y0 = max(low[0], 0), max(low[1], 0)
        x1, y1 = min(high[0], self._shape[1]), min(high[1], self._shape[0])
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        coverage = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(
            coverage, [np.round((polygon - (x0, y0)) * 8).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=3
        )
        alpha = cv2.GaussianBlur(coverage, (3, 3), 0.6).astype(np.float32) * np.float32(1.0 / 255.0)
        interior = self._palette.interior(upper, lower, (x0, y0, x1, y1), gap)
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
        if len(points):
            point_rows, point_cols = np.divmod(self._pair_point, cols)
            self.block = (
                int(point_rows.min()), int(point_rows.max()) + 1, int(point_cols.min()), int(point_cols.max()) + 1
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
    """Node shifts tabulated on a grid of commands over one node block; multilinear interpolation in between."""

    def __init__(self, levels: list[np.ndarray], shifts: np.ndarray, block: tuple[int, int, int, int]) -> None:
        self._levels = levels
        self._shifts = shifts  # (*levels, rows, cols, 2) float32
        self.block = block

    def add_to(self, shift: np.ndarray, command: tuple[float, ...]) -> tuple[int, int, int, int]:
        """Add the interpolated shifts for `command` into the node array `shift`; return the block they cover."""
        corners: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
        for axis, value in zip(self._levels, command, strict=True):
            position = float(np.interp(value, axis, np.arange(len(axis))))
            lower = min(int(position), len(axis) - 2)
            fraction = position - lower
            corners = [
                (index + (lower + offset,), weight * (fraction if offset else 1.0 - fraction))
                for index, weight in corners
                for offset in (0, 1)
            ]
        top, bottom, left, right = self.block
        target = shift[top:bottom, left:right]
        for index, weight in corners:
            if weight > 1e-6:
                target += np.float32(weight) * self._shifts[index]
        return self.block


class _MouthPalette:
    """Colours of the mouth interior for one avatar: the portrait's own teeth if it shows them, cavity from its lips."""

    def __init__(self, crop: np.ndarray, points: np.ndarray, iod: float) -> None:
        self._iod = iod
        curve = _catmull_rom_matrix(5, 6)
        upper = curve @ points[list(UPPER_INNER_CHAIN)]
        lower = curve @ points[list(LOWER_INNER_CHAIN)]
        self._lip = _lip_colour(crop, points)
        self._lip_luma = _luma(self._lip)
        # Teeth: columns across the portrait's opening, sampled in the middle of the gap, away from the lips' edges.
        samples = 24
        along = np.linspace(0.0, 1.0, samples)
        top, bottom = _resample_polyline(upper, along), _resample_polyline(lower, along)
        gap = np.linalg.norm(bottom - top, axis=1)
        probe = top[None] + np.linspace(0.3, 0.7, 5)[:, None, None] * (bottom - top)[None]
        profile = _sample(crop, probe).mean(axis=0)
        luma = _luma(profile)
        valid = gap >= max(2.0, 0.04 * iod)
        self.shows_teeth = bool(
            valid.mean() > 0.3 and float(np.median(luma[valid])) > self._lip_luma + 25.0
        ) if valid.any() else False
        if self.shows_teeth:
            good = valid & (luma > self._lip_luma + 10.0)
            indices = np.flatnonzero(good) if good.any() else np.flatnonzero(valid)
            nearest = indices[np.abs(np.arange(samples)[:, None] - indices[None, :]).argmin(axis=1)]
            profile = profile[nearest]
            self._teeth_luma = float(np.median(luma[indices]))
            self._teeth_height = float(np.clip(np.median(gap[valid]) / iod, 0.07, 0.12)) * iod
        else:
            profile = np.tile(np.array([[188.0, 204.0, 214.0]]), (samples, 1)) * min(1.0, 0.4 + self._lip_luma / 200.0)
            self._teeth_luma = _luma(profile[0])
            self._teeth_height = 0.1 * iod
        self._teeth = profile.astype(np.float32)
        self._teeth_half_width = max(1.0, float(np.linalg.norm(points[64] - points[60])) / 2.0)
        # A mouth's inside is the lips' red in shadow: deeper is darker and browner.
        self._rim = (self._lip * np.array([0.22, 0.22, 0.38])).astype(np.float32)
        self._back = (self._lip * np.array([0.05, 0.05, 0.1])).astype(np.float32)
        self._tongue = (self._lip * np.array([0.55, 0.55, 0.8])).astype(np.float32)

    def lip_edges(self, crop: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The landmarks with each inner-lip point moved onto the lip's real edge when the portrait shows teeth."""
        edges = points.copy()
        inset = 0.5
        for upper, lower in zip(UPPER_INNER, LOWER_INNER, strict=True):
            gap = points[lower] - points[upper]
            length = float(np.linalg.norm(gap))
            direction = gap / length if length > 1e-6 else np.array([0.0, 1.0])
            if not self.shows_teeth:
                continue
            for index, outwards in ((upper, -direction), (lower, direction)):
                reach = np.arange(0.0, 0.1 * self._iod, 0.5)
                ray = points[index] + reach[:, None] * outwards
                luma = _luma(_sample(crop, ray[None])[0])
                threshold = 0.5 * (self._teeth_luma + self._lip_luma)
                darker = np.flatnonzero(luma < threshold)
                travel = reach[darker[0]] if len(darker) else 0.0
                edges[index] = points[index] + (travel + inset) * outwards
        return edges

    def draw_seam(self, image: np.ndarray, seam: np.ndarray) -> None:
        """A soft darker line where the closed lips meet."""
        low = np.floor(seam.min(axis=0)).astype(int) - 3
        high = np.ceil(seam.max(axis=0)).astype(int) + 4
        x0, y0 = max(low[0], 0), max(low[1], 0)
        x1, y1 = min(high[0], image.shape[1]), min(high[1], image.shape[0])
        line = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.polylines(line, [np.round((seam - (x0, y0)) * 8).astype(np.int32)], False, 255, 1, cv2.LINE_AA, 3)
        alpha = cv2.GaussianBlur(line, (3, 3), 0.7).astype(np.float32) * np.float32(0.55 / 255.0)
        region = image[y0:y1, x0:x1].astype(np.float32)
        region += alpha[:, :, None] * (self._lip.astype(np.float32) * 0.45 - region)
        image[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)

    def interior(self, upper: np.ndarray, lower: np.ndarray, box: tuple[int, int, int, int], gap: float) -> np.ndarray:
        """(h, w, 3) uint8 colours of the mouth interior over `box` (x0, y0, x1, y1), per column of the opening.

        Layers, back to front: the cavity (rim colour darkening towards the back), the tongue low in the mouth,
        the upper teeth hanging from the upper lip at their own height, a dim hint of the lower teeth.
        """
        x0, y0, x1, y1 = box
        columns = np.arange(x0, x1, dtype=np.float32)
        top = _curve_y(upper, columns)
        bottom = _curve_y(lower, columns)
        opening = np.maximum(bottom - top, np.float32(0.5))
        centre_x = 0.5 * (upper[0, 0] + upper[-1, 0])
        half_width = max(0.5 * abs(upper[-1, 0] - upper[0, 0]), 1.0)
        across = np.minimum(np.abs((columns - centre_x) / half_width), 1.0)
        cross = 1.0 - across * across
        rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        depth = rows - top
        fraction = np.minimum(np.maximum(depth / opening, 0.0), 1.0)
        back = (1.0 - fraction) * fraction * (4.0 * np.sqrt(cross))
        tongue = np.minimum(np.maximum(fraction - 0.6, 0.0), 0.25) * (2.8 * min(1.0, gap / (0.25 * self._iod)) * cross)
        colour = self._rim + back[:, :, None] * (self._back - self._rim) + tongue[:, :, None] * (self._tongue - self._rim)
        teeth_across = np.minimum(np.abs(columns - centre_x) / self._teeth_half_width, 1.0)
        index = np.round((np.sign(columns - centre_x) * teeth_across + 1.0) * 0.5 * (len(self._teeth) - 1))
        teeth = self._teeth[index.astype(np.intp)] * (1.0 - 0.55 * teeth_across**3)[:, None]
        teeth_height = np.minimum(self._teeth_height, 0.6 * opening)
        upper_teeth = np.minimum(np.maximum(teeth_height + 0.5 - depth, 0.0), 1.0)
        colour += upper_teeth[:, :, None] * (teeth - colour)
        lower_height = np.minimum(0.035 * self._iod, 0.25 * opening)
        above_lip = bottom - rows
        lower_teeth = np.minimum(np.maximum(lower_height + 0.5 - above_lip, 0.0), 1.0) * (0.6 * cross)
        lower_teeth *= np.minimum(np.maximum(above_lip + 1.0, 0.0), 1.0)
        colour += lower_teeth[:, :, None] * (0.7 * teeth - colour)
        return colour.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- helpers


def _aperture(points: np.ndarray) -> float:
    """Mean inner-lip gap in pixels, as the acceptance measures it."""
    return float(np.mean([np.linalg.norm(points[u] - points[l]) for u, l in zip(UPPER_INNER, LOWER_INNER, strict=True)]))


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
    return Expression(0, aperture=aperture / APERTURE_GAIN, width=width)


def _blink_command(blink: float) -> Expression:
    return Expression(0, blink=blink)


def _clamped_mouth(expression: Expression) -> tuple[float, float]:
    """Drawn aperture and width change (IOD) for a command, within the tabulated range."""
    aperture = min(max(expression.aperture, 0.0) * APERTURE_GAIN, float(APERTURE_LEVELS[-1]))
    width = min(max(expression.width, float(WIDTH_LEVELS[0])), float(WIDTH_LEVELS[-1]))
    return aperture, width


def _head_pose(expression: Expression, iod: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Rotation matrix and pixel shift of the head; positive roll turns the top of the head to image right."""
    if not (expression.head_roll_deg or expression.head_dx or expression.head_dy):
        return None
    angle = math.radians(expression.head_roll_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return rotation, np.array([expression.head_dx, expression.head_dy]) * iod


def _head_weight(points: np.ndarray, iod: float, shape: tuple[int, int]) -> np.ndarray:
    """How much of the head motion each pixel takes: 1 over the face and forehead, 0 near the crop border."""
    height, width = shape
    low = np.array([points[:, 0].min(), points[17:27, 1].min() - 0.6 * iod])
    high = points.max(axis=0) + np.array([0.0, 0.3 * iod])  # the jaw drops when the mouth opens
    centre, axes = (low + high) / 2.0, (high - low) / 2.0
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot((x - centre[0]) / axes[0], (y - centre[1]) / axes[1])
    inner = float(np.max(np.hypot((points[:, 0] - centre[0]) / axes[0], (points[:, 1] - centre[1]) / axes[1])))
    weight = 1.0 - _smoothstep(inner * 1.05, inner * 1.6, radius)
    side = min(height, width)
    to_border = np.minimum(np.minimum(x, width - 1 - x), np.minimum(y, height - 1 - y))
    weight *= _smoothstep(0.07 * side, 0.15 * side, to_border)
    weight[weight < 1e-3] = 0.0
    return weight.astype(np.float32)


def _sample_field(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of a float32 (h, w) field at (n, 2) pixel positions."""
    xy = points.astype(np.float32).reshape(1, -1, 2)
    return cv2.remap(field, xy[..., 0], xy[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0].astype(
        np.float64
    )


def _bbox(region: np.ndarray, margin: int, limit: tuple[int, int]) -> tuple[int, int, int, int]:
    """Half-open (top, bottom, left, right) box of the True cells, grown by `margin` and clipped to `limit`."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return (
        max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, limit[0]),
        max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, limit[1]),
    )


def _smoothstep(edge0: float, edge1: float, value: np.ndarray) -> np.ndarray:
    t = np.clip((value - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _catmull_rom_matrix(count: int, per_segment: int) -> np.ndarray:
    """Matrix taking `count` chain points to a smooth Catmull-Rom curve through them (ends repeated)."""
    rows = []
    for segment in range(count - 1):
        for step in range(per_segment):
            t = step / per_segment
            basis = (
                0.5 * (-t**3 + 2 * t**2 - t),
                0.5 * (3 * t**3 - 5 * t**2 + 2),
                0.5 * (-3 * t**3 + 4 * t**2 + t),
                0.5 * (t**3 - t**2),
            )
            weights = np.zeros(count)
            for offset, value in zip((-1, 0, 1, 2), basis, strict=True):
                weights[min(max(segment + offset, 0), count - 1)] += value
            rows.append(weights)
    last = np.zeros(count)
    last[-1] = 1.0
    rows.append(last)
    return np.array(rows)


def _resample_polyline(polyline: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    lengths = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    distance = np.concatenate([[0.0], np.cumsum(lengths)])
    target = fractions * distance[-1]
    return np.column_stack([np.interp(target, distance, polyline[:, 0]), np.interp(target, distance, polyline[:, 1])])


def _curve_y(curve: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """y of a left-to-right curve at each column (x kept increasing so np.interp is valid)."""
    xs = np.maximum.accumulate(curve[:, 0])
    return np.interp(columns, xs, curve[:, 1]).astype(np.float32)


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear BGR samples (float32) of `image` at an (h, w, 2) array of positions."""
    xy = xy.astype(np.float32)
    return cv2.remap(image, xy[..., 0], xy[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(
        np.float32
    )


def _luma(bgr: np.ndarray) -> np.ndarray:
    return np.asarray(bgr, dtype=np.float64) @ np.array([0.114, 0.587, 0.299])


def _lip_colour(crop: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mean BGR of the lips: inside the outer lip contour, outside the inner one (which may hold teeth)."""
    lips = np.zeros(crop.shape[:2], dtype=np.uint8)
    cv2.fillPoly(lips, [np.round(points[48:60]).astype(np.int32)], 1)
    cv2.fillPoly(lips, [np.round(points[60:68]).astype(np.int32)], 0)
    if not lips.any():
        return np.array([90.0, 90.0, 160.0])
    return np.array(cv2.mean(crop, mask=lips)[:3])
