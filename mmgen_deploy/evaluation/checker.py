"""A judge for `shapes` images that reads pixels only (no model involved).

Colour: every clearly lit pixel votes for the primary/secondary colour whose channels
it lights (a channel counts when it exceeds half of the pixel's brightest channel).
Shape: the image's brightness is treated as a coverage map; for each candidate shape we
render the ideal anti-aliased template with the same centroid and keep the shape whose
template differs least (L1) from the image. Each candidate is fitted at a few sizes around
the one with the image's area (`_TEMPLATE_SCALES`): a decoded image has soft edges and
rounded corners, which spread its coverage and shrink its bright core, so the area alone
gives every candidate a slightly wrong size and the comparison would favour the circle.
This needs no thresholds tuned per shape and works for any size and position.
Size: the shape's half extent follows from its lit area (coverage sum) once the shape is
known; `small` and `large` are told apart at the midpoint of their ranges.
Position: the centroid's offset from the image middle (for a triangle, the centre of its
box, a third of the half extent above the centroid). Within `_CENTRE_RADIUS` of the middle
is `center`, otherwise the dominant axis and its sign give left/right/top/bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmgen_deploy.data.shapes import _HALF_EXTENT, COLOURS, SHAPES, SQUARE_FRACTION, coverage

# A pixel takes part in the colour vote when its brightest channel is at least this.
_LIT = 128
# Fewer lit pixels than this: there is no shape to judge.
_MIN_PIXELS = 4
# Half extents (fraction of the side) are 0.135..0.165 for small and 0.243..0.297 for large
# shapes (x0.9..1.1 scale jitter): split at the midpoint of the gap.
_SIZE_SPLIT = (_HALF_EXTENT["small"] * 1.1 + _HALF_EXTENT["large"] * 0.9) / 2
# Centred shapes move at most 1.5 px (of 32) from the middle; the others sit >= 5.5 px away.
_CENTRE_RADIUS = 3.5 / 32
# Template sizes tried per candidate shape, relative to the area-matched one.
_TEMPLATE_SCALES = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)
_PATTERN_TO_COLOUR = {tuple(int(v > 0) for v in rgb): name for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None
    size: str | None = None
    position: str | None = None

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape

    def matches_all(self, colour: str, shape: str, size: str, position: str) -> bool:
        return self.matches(colour, shape) and self.size == size and self.position == position


def judge_colour(image: np.ndarray) -> str | None:
    rgb = image.astype(np.int32).reshape(-1, 3)
    brightest = rgb.max(axis=1)
    lit = rgb[brightest >= _LIT]
    if len(lit) < _MIN_PIXELS:
        return None
    on = (lit * 2 > lit.max(axis=1, keepdims=True)).astype(np.int64)
    codes = on[:, 0] * 4 + on[:, 1] * 2 + on[:, 2]
    votes = np.bincount(codes, minlength=8)
    best = int(np.argmax(votes))
    return _PATTERN_TO_COLOUR.get(((best >> 2) & 1, (best >> 1) & 1, best & 1))


def _half_extent_for_area(shape: str, area: float) -> float:
    if shape == "circle":
        return math.sqrt(area / math.pi)
    if shape == "square":
        return math.sqrt(area) / (2 * SQUARE_FRACTION)
    return math.sqrt(area / 2.0)  # triangle: base 2h, height 2h


@dataclass(frozen=True)
class _Blob:
    """The coverage map of an image's shape: its area and centroid (pixels)."""

    cover: np.ndarray
    area: float
    cx: float
    cy: float


def _blob(image: np.ndarray) -> _Blob | None:
    size = image.shape[0]
    cover = image.astype(np.float64).max(axis=2) / 255.0
    if int((cover >= _LIT / 255).sum()) < _MIN_PIXELS:
        return None
    area = float(cover.sum())
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return _Blob(cover, area, float((cover * xs).sum() / area), float((cover * ys).sum() / area))


def _shape_of(blob: _Blob) -> str:
    cover, area, cx, cy = blob.cover, blob.area, blob.cx, blob.cy
    size = cover.shape[0]
    errors = {}
    for shape in SHAPES:
        fits = []
        for scale in _TEMPLATE_SCALES:
            half = _half_extent_for_area(shape, area) * scale
            # The triangle's centroid lies a third of the half extent below its box centre.
            box_cy = cy - half / 3.0 if shape == "triangle" else cy
            fits.append(float(np.abs(cover - coverage(shape, cx, box_cy, half, size)).sum()))
        errors[shape] = min(fits)
    return min(errors, key=errors.__getitem__)


def _size_of(blob: _Blob, shape: str) -> str:
    half = _half_extent_for_area(shape, blob.area) / blob.cover.shape[0]
    return "small" if half < _SIZE_SPLIT else "large"


def _position_of(blob: _Blob, shape: str) -> str:
    side = blob.cover.shape[0]
    cy = blob.cy
    if shape == "triangle":  # the box centre lies above the centroid
        cy -= _half_extent_for_area(shape, blob.area) / 3.0
    dx, dy = (blob.cx - side / 2) / side, (cy - side / 2) / side
    if max(abs(dx), abs(dy)) < _CENTRE_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def judge(image: np.ndarray) -> Verdict:
    """(H, W, 3) uint8 image -> the colour, shape, size and position it shows (None where it shows none)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    blob = _blob(image)
    if blob is None:
        return Verdict(judge_colour(image), None)
    shape = _shape_of(blob)
    return Verdict(judge_colour(image), shape, _size_of(blob, shape), _position_of(blob, shape))
