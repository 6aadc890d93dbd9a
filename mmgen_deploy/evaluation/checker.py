"""A judge for `shapes` images that reads pixels only (no model involved).

Colour: every clearly lit pixel votes for the primary/secondary colour whose channels
it lights (a channel counts when it exceeds half of the pixel's brightest channel).
Shape: the image's brightness is treated as a coverage map; for each candidate shape we
render the ideal anti-aliased template with the same area and centroid and keep the
shape whose template differs least (L1) from the image. This needs no thresholds tuned
per shape and works for any size and position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmgen_deploy.data.shapes import COLOURS, SHAPES, SQUARE_FRACTION, coverage

# A pixel takes part in the colour vote when its brightest channel is at least this.
_LIT = 128
# Fewer lit pixels than this: there is no shape to judge.
_MIN_PIXELS = 4
_PATTERN_TO_COLOUR = {tuple(int(v > 0) for v in rgb): name for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape


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


def judge_shape(image: np.ndarray) -> str | None:
    size = image.shape[0]
    cover = image.astype(np.float64).max(axis=2) / 255.0
    if int((cover >= _LIT / 255).sum()) < _MIN_PIXELS:
        return None
    area = float(cover.sum())
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = float((cover * xs).sum() / area), float((cover * ys).sum() / area)
    errors = {}
    for shape in SHAPES:
        half = _half_extent_for_area(shape, area)
        # The triangle's centroid lies a third of the half extent below its box centre.
        box_cy = cy - half / 3.0 if shape == "triangle" else cy
        errors[shape] = float(np.abs(cover - coverage(shape, cx, box_cy, half, size)).sum())
    return min(errors, key=errors.__getitem__)


def judge(image: np.ndarray) -> Verdict:
    """(H, W, 3) uint8 image -> the colour and shape it shows (None where it shows none)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    return Verdict(judge_colour(image), judge_shape(image))
