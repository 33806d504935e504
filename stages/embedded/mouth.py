"""The mouth interior the warp renderer paints inside the moved inner lips: the portrait's own teeth where it shows
them, else teeth and cavity textures made from its lip colour, and the seam of closed lips kept clear of them.

Coordinates are crop pixels (x right, y down); lengths in IOD are fractions of |p36 - p45|.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

UPPER_INNER = (61, 62, 63)
LOWER_INNER = (67, 66, 65)  # paired with UPPER_INNER, as the aperture measure pairs them
UPPER_INNER_CHAIN = (60, 61, 62, 63, 64)
LOWER_INNER_CHAIN = (60, 67, 66, 65, 64)
TEETH_SHOW_IOD = (0.03, 0.08)  # drawn openings over which the painted teeth fade in
LOWER_TEETH_IOD = (0.22, 0.32)  # openings over which the lower teeth come into view
LOWER_TEETH_HEIGHT = 0.4        # as tall as this share of the upper teeth
LOWER_TEETH_LIGHT = 0.85        # in the jaw's shadow
LOWER_TEETH_WIDTH = 0.7         # the front teeth of the narrower lower jaw: this share of the upper row's width
SEAM_CLEAR_IOD = 0.04  # how far either side of the closed lips' seam nothing may look like teeth
COLOURLESS_CHROMA = 4.0  # mean channel spread (levels) under which a mouth counts as greyscale


class MouthPalette:
    """Colours of the mouth interior for one avatar: the portrait's own teeth if it shows them, cavity from its lips."""

    def __init__(self, crop: np.ndarray, points: np.ndarray, iod: float) -> None:
        self._iod = iod
        curve = catmull_rom_matrix(5, 6)
        upper = curve @ points[list(UPPER_INNER_CHAIN)]
        lower = curve @ points[list(LOWER_INNER_CHAIN)]
        self._lip = _lip_colour(crop, points)
        self._lip_luma = _luma(self._lip)
        # A portrait without colour (greyscale, or nearly): lips and teeth differ only in brightness, and nothing
        # painted may bring a tint of its own.
        self._colourless = _chroma(crop, points) < COLOURLESS_CHROMA
        # Teeth: columns across the portrait's opening, sampled in the middle of the gap, away from the lips' edges.
        samples = 24
        along = np.linspace(0.0, 1.0, samples)
        top, bottom = _resample_polyline(upper, along), _resample_polyline(lower, along)
        gap = np.linalg.norm(bottom - top, axis=1)
        probe = top[None] + np.linspace(0.3, 0.7, 5)[:, None, None] * (bottom - top)[None]
        profile = _sample(crop, probe).mean(axis=0)
        luma = _luma(profile)
        valid = gap >= max(2.0, 0.04 * iod)
        # Teeth show when a good part of the opening is clearly brighter than the lips.
        self.shows_teeth = bool(valid.mean() > 0.3 and np.median(luma[valid]) > self._lip_luma + 25.0)
        if self.shows_teeth:
            good = valid & (luma > self._lip_luma + 10.0)
            indices = np.flatnonzero(good) if good.any() else np.flatnonzero(valid)
            nearest = indices[np.abs(np.arange(samples)[:, None] - indices[None, :]).argmin(axis=1)]
            profile = profile[nearest]
            self._teeth_redness: float | None = float(np.median(_redness(profile[indices])))
            self._teeth_luma = float(np.median(luma[indices]))
        else:
            # No teeth to copy: an ivory shade, dimmer for a darker-lit face.
            ivory = np.array([188.0, 204.0, 214.0]) * min(1.0, 0.4 + self._lip_luma / 200.0)
            profile = np.tile(ivory, (samples, 1))
            self._teeth_redness = None
            self._teeth_luma = float(_luma(ivory))
            self._teeth_height = 0.1 * iod
        self._lip_redness = float(_redness(self._lip))
        self._scan_reach = 0.5 * float(gap.max()) + 0.1 * iod
        if self.shows_teeth:
            self._teeth_height = self._visible_teeth(crop, top, bottom, valid)
        self._teeth_half_width = max(1.0, float(np.linalg.norm(points[64] - points[60])) / 2.0)
        if self._colourless:
            profile, self._lip = _grey(profile), _grey(self._lip)
        self._teeth_texture = _teeth_texture(profile)
        self._cavity_texture = _cavity_texture(self._lip)
        if self._colourless:
            self._cavity_texture = _grey(self._cavity_texture).astype(np.uint8)

    def _visible_teeth(self, crop: np.ndarray, top: np.ndarray, bottom: np.ndarray, valid: np.ndarray) -> float:
        """How tall the photo's upper teeth show (px): down the middle third of the opening, from the upper lip's
        edge to where the brightness of teeth ends. The painted teeth keep this height."""
        middle_third = np.zeros(len(top), bool)
        middle_third[len(top) // 3:-(len(top) // 3)] = True
        columns = np.flatnonzero(valid & middle_third)
        if not len(columns):
            return 0.1 * self._iod
        centre = (top[columns] + bottom[columns]) / 2.0
        down = (bottom[columns] - top[columns]) / np.maximum(np.linalg.norm(bottom[columns] - top[columns], axis=1,
                                                                            keepdims=True), 1e-6)
        edge = centre - self._extent(crop, centre, -down)[:, None] * down
        steps = np.arange(0.0, self._scan_reach * 2.0, 0.25)
        luma = _luma(_sample(crop, edge[:, None, :] + steps[None, :, None] * down[:, None, :]))
        bright = luma > 0.5 * (self._teeth_luma + self._lip_luma)
        # The first bright run below the lip's edge (its soft edge may take a step or two to cross).
        start = np.where(bright.any(axis=1), bright.argmax(axis=1), 0)
        after = np.where(np.arange(len(steps))[None, :] >= start[:, None], ~bright, False)
        end = np.where(after.any(axis=1), after.argmax(axis=1), len(steps))
        heights = (end - start) * 0.25
        return float(np.clip(np.median(heights) / self._iod, 0.05, 0.12)) * self._iod

    def lip_edges(self, crop: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The landmarks with each inner-lip point moved onto the lip's real edge when the portrait shows teeth.

        On a smile dlib puts the upper inner-lip points on the teeth and the lower ones anywhere on a glossy lower
        lip; the edges are found by scanning out from the middle of the gap to the first lip-coloured pixel.
        """
        edges = points.copy()
        if not self.shows_teeth:
            return edges
        inset = 0.5  # px into the lip past the last pixel of the opening
        upper, lower = points[list(UPPER_INNER)], points[list(LOWER_INNER)]
        middle = (upper + lower) / 2.0
        direction = (lower - upper) / np.maximum(np.linalg.norm(lower - upper, axis=1, keepdims=True), 1e-6)
        edges[list(UPPER_INNER)] = middle - (self._extent(crop, middle, -direction) + inset)[:, None] * direction
        edges[list(LOWER_INNER)] = middle + (self._extent(crop, middle, direction) + inset)[:, None] * direction
        return edges

    def without_opening(self, crop: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The crop with what shows between the lips (teeth, dark cavity) painted over from the lips around it.

        The closing warp is affine between a few landmarks while the lips' edges curve between them, so slivers of
        the opening survive along the closed lips (specks of teeth, most near the corners). Closing a crop whose
        opening already looks like lip leaves nothing of it to show.
        """
        opening = self._opening_mask(crop, points)
        return cv2.inpaint(crop, opening, 2.0, cv2.INPAINT_TELEA) if opening.any() else crop.copy()

    def _opening_mask(self, crop: np.ndarray, points: np.ndarray) -> np.ndarray:
        """uint8 mask of the opening: from the middle of the gap, up and down across the mouth to the first lip pixel.

        Scanning out from the middle rather than classifying the whole mouth keeps the lips' own highlights, which
        can be as white as teeth, out of the mask.
        """
        curve = catmull_rom_matrix(5, 6)
        upper = curve @ points[list(UPPER_INNER_CHAIN)]
        lower = curve @ points[list(LOWER_INNER_CHAIN)]
        columns = max(2, math.ceil(2.0 * float(np.linalg.norm(upper[-1] - upper[0]))))  # half-pixel steps
        along = np.linspace(0.0, 1.0, columns)
        middle = (_resample_polyline(upper, along) + _resample_polyline(lower, along)) / 2.0
        right = (points[45] - points[36]) / self._iod
        down = np.tile([-right[1], right[0]], (columns, 1))
        top = middle - self._extent(crop, middle, -down)[:, None] * down
        bottom = middle + self._extent(crop, middle, down)[:, None] * down
        mask = np.zeros(crop.shape[:2], dtype=np.uint8)
        for start, end in zip(np.round(top * 8).astype(int), np.round(bottom * 8).astype(int), strict=True):
            if np.any(start != end):
                cv2.line(mask, tuple(start), tuple(end), 1, 1, cv2.LINE_8, 3)
        # A pixel more all round takes the lips' soft edges, half teeth and half lip.
        return cv2.dilate(mask, np.ones((3, 3), np.uint8))

    def _extent(self, crop: np.ndarray, middle: np.ndarray, outwards: np.ndarray) -> np.ndarray:
        """How far (px, in half-pixel steps) from each middle point along its unit `outwards` the opening goes on."""
        reach = np.arange(0.0, self._scan_reach, 0.5)
        inside = self._not_lip(_sample(crop, middle[:, None, :] + reach[None, :, None] * outwards[:, None, :]))
        return reach[np.where(inside.all(axis=1), len(reach) - 1, inside.argmin(axis=1))]

    def _not_lip(self, colours: np.ndarray) -> np.ndarray:
        """Whether BGR colours look like the mouth's inside: far darker than the lips, or (teeth) much less red."""
        luma = _luma(colours)
        dark = luma < 0.55 * self._lip_luma
        if self._teeth_redness is None:
            return dark
        if self._colourless:  # brightness is all there is: teeth are brighter than the lips
            return dark | (luma > 0.5 * (self._teeth_luma + self._lip_luma))
        return dark | (_redness(colours) < 0.5 * (self._teeth_redness + self._lip_redness))

    def draw_seam(self, image: np.ndarray, seam: np.ndarray) -> None:
        """A soft darker line where the closed lips meet, with nothing teeth-white beside it.

        A glossy lower lip can be as white as teeth just below their edge; closed, that gloss lands beside the
        seam and reads as teeth, so it is painted over from the lips around it.
        """
        near = max(2.0, SEAM_CLEAR_IOD * self._iod)
        low = np.floor(seam.min(axis=0) - near).astype(int) - 3
        high = np.ceil(seam.max(axis=0) + near).astype(int) + 4
        x0, y0 = max(low[0], 0), max(low[1], 0)
        x1, y1 = min(high[0], image.shape[1]), min(high[1], image.shape[0])
        line = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.polylines(line, [np.round((seam - (x0, y0)) * 8).astype(np.int32)], False, 255, 1, cv2.LINE_AA, 3)
        region = image[y0:y1, x0:x1]
        beside = cv2.distanceTransform(np.where(line > 0, 0, 1).astype(np.uint8), cv2.DIST_L2, 5) <= near
        white = beside & self._not_lip(region) & (_luma(region) > self._lip_luma)
        if white.any():
            region[:] = cv2.inpaint(region, cv2.dilate(white.astype(np.uint8), np.ones((3, 3), np.uint8)), 2.0,
                                    cv2.INPAINT_TELEA)
        alpha = cv2.GaussianBlur(line, (3, 3), 0.7).astype(np.float32) * np.float32(0.55 / 255.0)
        region = image[y0:y1, x0:x1].astype(np.float32)
        region += alpha[:, :, None] * (self._lip.astype(np.float32) * 0.45 - region)
        image[y0:y1, x0:x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)

    def interior(self, upper: np.ndarray, lower: np.ndarray, box: tuple[int, int, int, int],
                 teeth: float = 1.0, scale: float = 1.0) -> np.ndarray:
        """(h, w, 3) uint8 mouth interior over `box` (x0, y0, x1, y1), from the textures laid along the opening;
        `scale`: the pixels' size against the crop's the palette was made from.

        The cavity texture spans the opening from lip to lip; the upper teeth hang from the upper lip at their own
        height, squeezed when the opening is small so the lower lip never meets them, and fade out in a slit;
        `teeth` (0..1) is how much of their height the lips leave visible. A wide-open jaw shows the lower teeth
        above the lower lip, in shadow.
        """
        x0, y0, x1, y1 = box
        iod = self._iod * scale
        columns = np.arange(x0, x1, dtype=np.float32)
        top = curve_y(upper, columns)
        bottom = curve_y(lower, columns)
        opening = np.maximum(bottom - top, np.float32(0.5))
        centre_x = np.float32(0.5 * (upper[0, 0] + upper[-1, 0]))
        half_width = np.float32(max(0.5 * abs(upper[-1, 0] - upper[0, 0]), 1.0))
        rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        depth = rows - top
        from_centre = columns - centre_x
        cavity_rows, cavity_cols = self._cavity_texture.shape[:2]
        across = from_centre * ((cavity_cols - 1) / (2.0 * half_width)) + (cavity_cols - 1) / 2.0
        across_rows = np.repeat(across.astype(np.float32, copy=False)[None], y1 - y0, axis=0)
        cavity = cv2.remap(self._cavity_texture, across_rows, depth * ((cavity_rows - 1) / opening), cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        # A narrow opening is a dark slit: the lips shade the teeth until it is wide enough to light them.
        lit = smoothstep(TEETH_SHOW_IOD[0] * iod, TEETH_SHOW_IOD[1] * iod, opening).astype(np.float32)
        upper_height = np.minimum(np.float32(self._teeth_height * scale * teeth), 0.6 * opening)
        out = self._teeth_over(cavity, self._teeth_columns(from_centre, scale, y1 - y0), depth, upper_height, lit)
        # The lower teeth rise from the lower lip once the jaw drops far enough: the front ones, half as tall, in
        # the jaw's shadow.
        lower_show = smoothstep(LOWER_TEETH_IOD[0] * iod, LOWER_TEETH_IOD[1] * iod, opening).astype(np.float32)
        if lower_show.any():
            lower_height = np.float32(LOWER_TEETH_HEIGHT * self._teeth_height * scale * teeth) * lower_show
            out = self._teeth_over(out, self._teeth_columns(from_centre, scale * LOWER_TEETH_WIDTH, y1 - y0),
                                   bottom - rows, lower_height, lower_show, shade=LOWER_TEETH_LIGHT)
        return out

    def _teeth_columns(self, from_centre: np.ndarray, scale: float, rows: int) -> np.ndarray:
        """The teeth texture's column for each pixel column (`from_centre`: px from the mouth's middle), `scale`
        times as wide as the crop's teeth; repeated down `rows` rows."""
        columns = self._teeth_texture.shape[1] - 1
        across = from_centre * (columns / (2.0 * self._teeth_half_width * scale)) + columns / 2.0
        return np.repeat(across.astype(np.float32, copy=False)[None], rows, axis=0)

    def _teeth_over(self, under: np.ndarray, across: np.ndarray, depth: np.ndarray, height: np.ndarray,
                    cover: np.ndarray, shade: float = 1.0) -> np.ndarray:
        """`under` with a row of teeth laid over it: `depth` (px) runs from the gum line into the mouth, `height`
        (px, per column) is how far the teeth reach, `cover` (per column) how much they show."""
        rows = self._teeth_texture.shape[0]
        down = ((depth + 1.0) * ((rows - 2) / (height + 1.0))).astype(np.float32)
        teeth = cv2.remap(self._teeth_texture, across, down, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
        alpha = teeth[:, :, 3].astype(np.float32) * (np.asarray(cover, np.float32) * np.float32(1.0 / 255.0))
        colour = teeth[:, :, :3] if shade == 1.0 else (teeth[:, :, :3] * np.float32(shade)).astype(np.uint8)
        return cv2.blendLinear(np.ascontiguousarray(colour), under, alpha, 1.0 - alpha)


def _teeth_texture(profile: np.ndarray, rows: int = 12) -> np.ndarray:
    """BGRA strip of the upper teeth: the portrait's colours across, darker towards the corners and the gums.

    Row 0 repeats row 1 (sampled just above the lip line, under the lip's soft edge); the last row is
    transparent so the teeth end softly.
    """
    across = np.linspace(-1.0, 1.0, len(profile))
    colour = profile * (1.0 - 0.55 * np.abs(across) ** 3)[:, None]
    down = np.linspace(0.0, 1.0, rows - 1)
    shade = 0.88 + 0.12 * smoothstep(0.0, 0.3, down) - 0.12 * smoothstep(0.7, 1.0, down)
    texture = np.zeros((rows, len(profile), 4), dtype=np.float64)
    texture[1:, :, :3] = shade[:, None, None] * colour[None]
    texture[0] = texture[1]
    texture[:-1, :, 3] = 255.0
    return np.clip(texture + 0.5, 0, 255).astype(np.uint8)


def _cavity_texture(lip: np.ndarray, size: int = 33) -> np.ndarray:
    """BGR cavity over (fraction of the opening from the upper lip, across the mouth): the lips' red in shadow,
    darker and browner towards the back, the tongue low in the middle."""
    fraction = np.linspace(0.0, 1.0, size)[:, None]
    across = np.linspace(-1.0, 1.0, size)[None, :]
    cross = 1.0 - across**2
    rim = lip * np.array([0.22, 0.22, 0.38])
    back = lip * np.array([0.05, 0.05, 0.1])
    tongue = lip * np.array([0.55, 0.55, 0.8])
    depth = 4.0 * fraction * (1.0 - fraction) * np.sqrt(cross)
    colour = rim + depth[..., None] * (back - rim)
    tongue_weight = np.clip(fraction - 0.6, 0.0, 0.25) * 2.8 * cross
    colour += tongue_weight[..., None] * (tongue - colour)
    return np.clip(colour + 0.5, 0, 255).astype(np.uint8)


def smoothstep(edge0: float, edge1: float, value: np.ndarray) -> np.ndarray:
    t = np.minimum(np.maximum((value - edge0) / (edge1 - edge0), 0.0), 1.0)  # np.clip, without its wrapper
    return t * t * (3.0 - 2.0 * t)


def catmull_rom_matrix(count: int, per_segment: int) -> np.ndarray:
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


def curve_y(curve: np.ndarray, columns: np.ndarray) -> np.ndarray:
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


def _grey(bgr: np.ndarray) -> np.ndarray:
    """The same brightness with no colour: luma in every channel."""
    return np.repeat(_luma(bgr)[..., None], 3, axis=-1)


def _chroma(crop: np.ndarray, points: np.ndarray) -> float:
    """How coloured the mouth and the skin around it are: the mean spread between the channels (0 for grey)."""
    box = cv2.boundingRect(np.round(points[list(range(3, 14)) + list(range(48, 60))]).astype(np.int32))
    x, y, w, h = box
    patch = crop[max(y, 0):y + h, max(x, 0):x + w].astype(np.int16)
    return float(np.mean(patch.max(axis=2) - patch.min(axis=2))) if patch.size else 0.0


def _redness(bgr: np.ndarray) -> np.ndarray:
    """Red over green per unit of brightness: high on lips and skin, low on teeth whatever their shading."""
    colours = np.asarray(bgr, dtype=np.float64)
    return (colours[..., 2] - colours[..., 1]) / (_luma(colours) + 1.0)


def _lip_colour(crop: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mean BGR of the lips: inside the outer lip contour, outside the inner one (which may hold teeth)."""
    lips = np.zeros(crop.shape[:2], dtype=np.uint8)
    cv2.fillPoly(lips, [np.round(points[48:60]).astype(np.int32)], 1)
    cv2.fillPoly(lips, [np.round(points[60:68]).astype(np.int32)], 0)
    if not lips.any():
        return np.array([90.0, 90.0, 160.0])
    return np.array(cv2.mean(crop, mask=lips)[:3])
