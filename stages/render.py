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
# The range the per-node triangle candidates are built for; commands beyond it are clamped.
MAX_APERTURE = 0.5
MAX_WIDTH = 0.15
MAX_ROLL_DEG = 6.0
MAX_SHIFT = 0.15
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
        frame = _frame_points(self._shape, frame_inset)
        anchors = _anchor_points(points, self._iod, self._shape, 2 * frame_inset)
        self._control = np.vstack([closed, anchors, frame])
        self._mesh = Delaunay(self._control).simplices.astype(np.int64)
        count = len(self._control)
        self._open_basis = self._basis(OPEN_MOVES, count)
        self._spread_basis = self._basis(SPREAD_MOVES, count)
        self._round_basis = self._basis(ROUND_MOVES, count)
        self._blink_basis = self._lid_basis(closed, count)
        self._head_weight = np.concatenate(
            [np.ones(68), _anchor_weights(anchors, points, self._shape, frame_inset), np.zeros(len(frame))]
        )
        self._pivot = closed[8] + 0.25 * self._iod * self._down

        self._step = max(1, math.ceil(max(height, width) / MAX_NODES_PER_SIDE))
        self._nodes = (math.ceil(height / self._step), math.ceil(width / self._step))
        node_y, node_x = np.mgrid[0 : self._nodes[0], 0 : self._nodes[1]].astype(np.float64)
        self._node_xy = np.dstack([(node_x + 0.5) * self._step - 0.5, (node_y + 0.5) * self._step - 0.5])
        self._pixel_x, self._pixel_y = (
            grid.astype(np.float32) for grid in np.meshgrid(np.arange(width), np.arange(height))
        )

        mouth = self._touching(MOUTH_POINTS)
        eyes = self._touching(EYE_POINTS)
        face = np.union1d(mouth, eyes)
        moving = self._touching(tuple(np.flatnonzero(self._head_weight > 0)))
        still_poses = self._poses(head=False)
        self._inverses = {
            "mouth": _MeshInverse(self._mesh, mouth, still_poses, self._node_xy),
            "eyes": _MeshInverse(self._mesh, eyes, still_poses, self._node_xy),
            "face": _MeshInverse(self._mesh, face, still_poses, self._node_xy),
            "head": _MeshInverse(self._mesh, moving, self._poses(head=True), self._node_xy),
        }
        self._palette = _MouthPalette(crop, points, self._iod)
        self._base = self._close_mouth(crop, points, mouth)
        self._frozen, self.mask = self._masks(moving)
        self._curve = _catmull_rom_matrix(5, 6)

    # ------------------------------------------------------------------------------------------ per frame

    def landmarks_for(self, expression: Expression) -> np.ndarray:
        """The 68 points the output shows for `expression`, in crop pixels (float32)."""
        return self._moved_control(expression)[:68].astype(np.float32)

    def render(self, expression: Expression) -> np.ndarray:
        """A new (h, w, 3) uint8 BGR crop showing `expression`; pixels where `mask` is 0 equal the input crop."""
        moved = self._moved_control(expression)
        out = self._base.copy()
        inverse = self._inverses.get(self._moving_part(expression))
        if inverse is not None:
            source = inverse.sources(moved, self._control)
            self._remap(out, source - self._node_xy, inverse.block)
        self._paint_mouth(out, moved[60:68])
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

    def _poses(self, head: bool) -> np.ndarray:
        """Control points at every corner of the command range (the candidates' hulls must cover all of it)."""
        ranges = [(0.0, MAX_APERTURE), (-MAX_WIDTH, 0.0, MAX_WIDTH), (0.0, 1.0)]
        if head:
            ranges += [(-MAX_ROLL_DEG, 0.0, MAX_ROLL_DEG), (-MAX_SHIFT, MAX_SHIFT), (-MAX_SHIFT, MAX_SHIFT)]
        else:
            ranges += [(0.0,), (0.0,), (0.0,)]
        return np.array([
            self._moved_control(Expression(0, a, w, b, roll, dx, dy))
            for a, w, b, roll, dx, dy in itertools.product(*ranges)
        ])

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
        """All control points for `expression` (clamped to the supported range): expression moves, then the head."""
        aperture = min(max(expression.aperture, 0.0) * APERTURE_GAIN, MAX_APERTURE)
        width = min(max(expression.width, -MAX_WIDTH), MAX_WIDTH)
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
        roll = min(max(expression.head_roll_deg, -MAX_ROLL_DEG), MAX_ROLL_DEG)
        shift_x = min(max(expression.head_dx, -MAX_SHIFT), MAX_SHIFT) * self._iod
        shift_y = min(max(expression.head_dy, -MAX_SHIFT), MAX_SHIFT) * self._iod
        if roll or shift_x or shift_y:
            angle = math.radians(roll)
            turn = np.array([[math.cos(angle) - 1.0, -math.sin(angle)], [math.sin(angle), math.cos(angle) - 1.0]])
            offset = (moved - self._pivot) @ turn.T + (shift_x, shift_y)
            moved += self._head_weight[:, None] * offset
        return moved

    @staticmethod
    def _moving_part(expression: Expression) -> str | None:
        if expression.head_roll_deg or expression.head_dx or expression.head_dy:
            return "head"
        mouth = expression.aperture > 0 or expression.width != 0
        eyes = expression.blink > 0
        if mouth and eyes:
            return "face"
        return "mouth" if mouth else "eyes" if eyes else None

    def _remap(self, out: np.ndarray, shift: np.ndarray, block: tuple[int, int, int, int]) -> None:
        """Upsample the node shifts of `block` (node rows/cols, half-open) and resample the base there."""
        top, bottom, left, right = block
        step = self._step
        nodes = shift[top:bottom, left:right].astype(np.float32)
        upsampled = cv2.resize(nodes, ((right - left) * step, (bottom - top) * step), interpolation=cv2.INTER_LINEAR)
        y0, x0 = top * step, left * step
        y1, x1 = min(bottom * step, self._shape[0]), min(right * step, self._shape[1])
        upsampled = upsampled[: y1 - y0, : x1 - x0]
        map_x = self._pixel_x[y0:y1, x0:x1] + upsampled[..., 0]
        map_y = self._pixel_y[y0:y1, x0:x1] + upsampled[..., 1]
        cv2.remap(
            self._base, map_x, map_y, cv2.INTER_LINEAR, dst=out[y0:y1, x0:x1], borderMode=cv2.BORDER_REPLICATE
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
        region = out[y0:y1, x0:x1].astype(np.float32)
        region += alpha[:, :, None] * (interior - region)
        out[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)


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
        """(h, w, 3) float32 colours of the mouth interior over `box` (x0, y0, x1, y1), per column of the opening."""
        x0, y0, x1, y1 = box
        columns = np.arange(x0, x1, dtype=np.float32)
        top = _curve_y(upper, columns)
        bottom = _curve_y(lower, columns)
        opening = np.maximum(bottom - top, 0.5)
        rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        depth = rows - top[None, :]
        fraction = np.clip(depth / opening[None, :], 0.0, 1.0)
        centre_x = 0.5 * (upper[0, 0] + upper[-1, 0])
        half_width = max(0.5 * abs(upper[-1, 0] - upper[0, 0]), 1.0)
        across = np.clip((columns - centre_x) / half_width, -1.0, 1.0)[None, :]
        cross = 1.0 - across**2
        back = np.sqrt(cross) * np.sin(np.pi * fraction)
        colour = self._rim + back[:, :, None] * (self._back - self._rim)
        tongue = _smoothstep(0.55, 1.0, fraction) * cross * min(1.0, gap / (0.25 * self._iod))
        colour += (0.7 * tongue)[:, :, None] * (self._tongue - colour)
        # Upper teeth hang from the upper lip at their own size; the lower lip covers them as the mouth closes.
        teeth_height = np.minimum(self._teeth_height, 0.6 * opening)[None, :]
        teeth_across = np.clip((columns - centre_x) / self._teeth_half_width, -1.0, 1.0)
        index = np.round((teeth_across + 1.0) * 0.5 * (len(self._teeth) - 1)).astype(int)
        teeth = self._teeth[index][None, :, :] * (1.0 - 0.55 * np.abs(teeth_across) ** 3)[None, :, None]
        edge = np.clip(depth / np.maximum(teeth_height, 1.0), 0.0, 1.0)
        teeth = teeth * (1.0 - 0.2 * _smoothstep(0.6, 1.0, edge))[:, :, None]
        upper_teeth = np.clip(teeth_height - depth + 0.5, 0.0, 1.0)
        colour += upper_teeth[:, :, None] * (teeth - colour)
        # A hint of the lower teeth just above the lower lip, dimmer and only in the middle.
        lower_height = np.minimum(0.035 * self._iod, 0.25 * opening)[None, :]
        from_bottom = bottom[None, :] - rows
        lower_teeth = np.clip(lower_height - from_bottom + 0.5, 0.0, 1.0) * np.clip(from_bottom + 1.0, 0.0, 1.0)
        lower_teeth *= 0.6 * cross
        colour += lower_teeth[:, :, None] * (0.7 * teeth - colour)
        return colour.astype(np.float32)


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


def _anchor_weights(anchors: np.ndarray, points: np.ndarray, shape: tuple[int, int], inset: int) -> np.ndarray:
    """How much of the head motion each anchor takes: 1 at the face, falling linearly to 0 at the fixed frame."""
    height, width = shape
    to_face = np.min(np.linalg.norm(anchors[:, None] - points[None], axis=2), axis=1)
    to_frame = np.minimum(
        np.minimum(anchors[:, 0] - inset, width - 1 - inset - anchors[:, 0]),
        np.minimum(anchors[:, 1] - inset, height - 1 - inset - anchors[:, 1]),
    )
    to_frame = np.maximum(to_frame, 0.0)
    return to_frame / np.maximum(to_frame + to_face, 1e-6)


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
