"""`shapes`: a procedural, downloadable-free RGB dataset of one filled shape per image.

Every image is a black square holding one circle, square or triangle in a pure
primary/secondary colour, small or large, on the left/right/top/bottom/centre.
The class label is colour x shape (18 classes, e.g. ``red circle``) and the caption
names all four attributes (``a small red circle on the left``). Generation is a pure
function of (seed, index range, image size), so a run directory only has to store the
description to regenerate its validation images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmgen_deploy.data.dataset import ImageData

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)

# Half the extent of a shape, as a fraction of the image side.
_HALF_EXTENT = {"small": 0.15, "large": 0.27}
# Anti-aliasing: each pixel averages a SUPERSAMPLE x SUPERSAMPLE grid of sub-pixels.
_SUPERSAMPLE = 4
# Validation images come from a different random stream than training images.
_VALIDATION_STREAM = 1_000_003
SQUARE_FRACTION = 0.9


def class_id(colour: str, shape: str) -> int:
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_parts(class_index: int) -> tuple[str, str]:
    """Class id -> (colour, shape)."""
    return COLOUR_NAMES[class_index // len(SHAPES)], SHAPES[class_index % len(SHAPES)]


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def label(self) -> int:
        return class_id(self.colour, self.shape)

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        if self.position in ("top", "bottom"):
            where = f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


def parse_caption(caption: str) -> ShapeSpec:
    """The inverse of `ShapeSpec.caption` ("a small red circle on the left" -> its ShapeSpec)."""
    words = caption.split()
    if len(words) < 5 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS \
            or words[3] not in SHAPES or words[-1] not in POSITIONS:
        raise ValueError(f"not a `shapes` caption: {caption!r}")
    return ShapeSpec(words[2], words[3], words[1], words[-1])


def _centre(position: str, half: float, size: int, jitter: np.ndarray) -> tuple[float, float]:
    """(x, y) centre in pixels; shapes keep a 1-pixel margin from the border."""
    mid = size / 2.0
    off = mid - half - 1.0  # the furthest a shape can move from the middle and stay inside
    dx, dy = {"left": (-off, 0.0), "right": (off, 0.0), "top": (0.0, -off), "bottom": (0.0, off),
              "center": (0.0, 0.0)}[position]
    # Jitter moves shapes a little along the free axis only, so they never leave the image.
    return mid + dx + (jitter[0] if dx == 0 else 0.0), mid + dy + (jitter[1] if dy == 0 else 0.0)


def coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """(size, size) fraction of each pixel covered by `shape` centred at (cx, cy).

    `half` is half the extent of the shape's bounding box; the triangle points up and its
    box is centred at (cx, cy).
    """
    ss = _SUPERSAMPLE
    coords = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    xs, ys = np.meshgrid(coords, coords)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        # A little smaller than the circle's box so the two have similar visual weight.
        side = half * SQUARE_FRACTION
        inside = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    elif shape == "triangle":
        t = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(spec: ShapeSpec, size: int = 32, *, scale: float = 1.0,
           jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One anti-aliased (size, size, 3) uint8 image of `spec`."""
    half = _HALF_EXTENT[spec.size] * size * scale
    cx, cy = _centre(spec.position, half, size, np.asarray(jitter))
    cover = coverage(spec.shape, cx, cy, half, size)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    return np.clip(np.rint(cover[..., None] * colour), 0, 255).astype(np.uint8)


def sample_specs(count: int, rng: np.random.Generator) -> list[ShapeSpec]:
    picks = rng.integers(0, [len(COLOUR_NAMES), len(SHAPES), len(SIZES), len(POSITIONS)], size=(count, 4))
    return [ShapeSpec(COLOUR_NAMES[c], SHAPES[s], SIZES[z], POSITIONS[p]) for c, s, z, p in picks]


# The held-out combinations come from their own random stream, so they do not move when
# the number of images changes.
_HOLDOUT_STREAM = 2_000_003
# A prompt-evaluation draw uses yet another stream (distinct from both image streams).
_EVAL_PROMPT_STREAM = 3_000_017
MAX_HOLDOUT_FRACTION = 0.5


def all_combinations() -> list[ShapeSpec]:
    """Every (colour, shape, size, position) combination, in a fixed order (180 of them)."""
    return [ShapeSpec(c, s, z, p) for c in COLOUR_NAMES for s in SHAPES for z in SIZES for p in POSITIONS]


def holdout_combinations(fraction: float, seed: int = 0) -> tuple[ShapeSpec, ...]:
    """The combinations kept out of the training split: round(`fraction` x 180) of them.

    Deterministic in (fraction, seed). Combinations are taken in a seeded random order,
    skipping any whose removal would leave some single attribute value (a colour, a shape,
    a size or a position) with no training combination at all: every word of a held-out
    caption is seen in training, only the combination is new.
    """
    if not 0.0 <= fraction <= MAX_HOLDOUT_FRACTION:
        raise ValueError(f"holdout fraction must be in [0, {MAX_HOLDOUT_FRACTION}], got {fraction}")
    combos = all_combinations()
    wanted = round(fraction * len(combos))
    if wanted == 0:
        return ()
    remaining: dict[tuple[int, str], int] = {}
    for combo in combos:
        for axis, value in enumerate((combo.colour, combo.shape, combo.size, combo.position)):
            remaining[(axis, value)] = remaining.get((axis, value), 0) + 1
    chosen: list[ShapeSpec] = []
    for index in np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(len(combos)):
        combo = combos[int(index)]
        keys = list(enumerate((combo.colour, combo.shape, combo.size, combo.position)))
        if any(remaining[key] <= 1 for key in keys):
            continue
        for key in keys:
            remaining[key] -= 1
        chosen.append(combo)
        if len(chosen) == wanted:
            break
    order = {combo: k for k, combo in enumerate(combos)}
    return tuple(sorted(chosen, key=order.__getitem__))


def heldout_prompt_specs(count: int, *, fraction: float, seed: int = 0,
                         draw_seed: int = 0) -> list[ShapeSpec]:
    """`count` evaluation prompts drawn from the held-out combinations of (`fraction`, `seed`).

    Every held-out combination is used equally often (up to one) before any repeats, in a
    seeded order. With no held-out combination (fraction 0) the prompts come from all 180
    combinations instead: the model has seen them, so the result then measures fit, not
    generalisation.
    """
    pool = list(holdout_combinations(fraction, seed)) or all_combinations()
    rng = np.random.default_rng([seed, draw_seed, _EVAL_PROMPT_STREAM])
    picks: list[ShapeSpec] = []
    while len(picks) < count:
        picks.extend(pool[int(i)] for i in rng.permutation(len(pool)))
    return picks[:count]


def make_shapes(count: int, *, seed: int = 0, image_size: int = 32, split: str = "train",
                holdout_fraction: float = 0.0) -> ImageData:
    """`count` images of the `split` ("train" or "val") stream for `seed`; deterministic.

    With `holdout_fraction` > 0 the training split never shows a held-out combination
    (see `holdout_combinations`): such draws are replaced by draws from the allowed ones.
    The validation split (used for VQ reconstruction metrics) is unaffected.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng([seed, _VALIDATION_STREAM if split == "val" else 0])
    specs = sample_specs(count, rng)
    held_out = set(holdout_combinations(holdout_fraction, seed)) if split == "train" else set()
    if held_out:
        allowed = [combo for combo in all_combinations() if combo not in held_out]
        replace = rng.integers(0, len(allowed), size=count)  # drawn for every image: independent of which hit
        specs = [allowed[int(r)] if spec in held_out else spec for spec, r in zip(specs, replace, strict=True)]
    scales = rng.uniform(0.9, 1.1, size=count)
    jitters = rng.uniform(-1.5, 1.5, size=(count, 2)) * image_size / 32
    images = np.stack([render(s, image_size, scale=float(k), jitter=(float(j[0]), float(j[1])))
                       for s, k, j in zip(specs, scales, jitters, strict=True)]) if count else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    return ImageData(
        images=images,
        labels=np.asarray([s.label for s in specs], dtype=np.int64),
        captions=[s.caption for s in specs],
        class_names=CLASS_NAMES,
    )
