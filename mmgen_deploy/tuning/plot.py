"""The measured front as a PNG: quality against milliseconds per image (log scale), every measured
configuration grey, the front joined in blue, the reference and default configurations labelled and the
chosen one marked in red. Drawn with Pillow (a dependency already), no plotting library."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mmgen_deploy.tuning.search import Measurement

_SIZE = (900, 600)
_MARGIN = (80, 30, 30, 60)  # left, top, right, bottom


def plot_front(points: Sequence[Measurement], front: Sequence[Measurement], path: Path, *, quality_label: str,
               reference: Measurement | None = None, default: Measurement | None = None,
               chosen: Measurement | None = None) -> Path:
    """Write the plot to `path` atomically and return it."""
    from PIL import Image, ImageDraw

    from mmgen_deploy.io_utils import atomic_path

    shown = [p for p in points if p.scores and math.isfinite(p.ms_per_image) and p.ms_per_image > 0]
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    width, height = _SIZE[0] - left - right, _SIZE[1] - top - bottom
    draw.rectangle((left, top, left + width, top + height), outline="black")
    if shown:
        ms = [math.log10(p.ms_per_image) for p in shown]
        qs = [p.quality for p in shown]
        x0, x1 = min(ms) - 0.05, max(ms) + 0.05
        y0, y1 = min(qs) - 1.0, max(qs) + 1.0

        def at(p: Measurement) -> tuple[float, float]:
            x = left + (math.log10(p.ms_per_image) - x0) / (x1 - x0) * width
            y = top + (1 - (p.quality - y0) / (y1 - y0)) * height
            return x, y

        for k in range(math.floor(x0), math.ceil(x1) + 1):
            for mult in (1, 2, 5):
                value = mult * 10.0**k
                if x0 <= math.log10(value) <= x1:
                    x = left + (math.log10(value) - x0) / (x1 - x0) * width
                    draw.line((x, top + height, x, top + height + 5), fill="black")
                    draw.text((x - 10, top + height + 8), f"{value:g}", fill="black")
        for step in range(6):
            value = y0 + (y1 - y0) * step / 5
            y = top + (1 - step / 5) * height
            draw.line((left - 5, y, left, y), fill="black")
            draw.text((8, y - 6), f"{value:.1f}", fill="black")
        for p in shown:
            x, y = at(p)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(170, 170, 170))
        line = [at(p) for p in front if p in shown]
        if len(line) > 1:
            draw.line(line, fill=(30, 80, 200), width=2)
        for x, y in line:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(30, 80, 200))
        marks = [(reference, "reference"), (default, "default")]
        if reference is default:
            marks = [(reference, "reference = default")]
        for marked, name in marks:
            if marked is not None and marked in shown:
                x, y = at(marked)
                draw.rectangle((x - 5, y - 5, x + 5, y + 5), outline="black")
                draw.text((x + 8, y - 14), name, fill="black")
        if chosen is not None and chosen in shown:
            x, y = at(chosen)
            draw.ellipse((x - 8, y - 8, x + 8, y + 8), outline=(220, 30, 30), width=3)
            draw.text((x + 10, y + 4), "chosen", fill=(220, 30, 30))
    draw.text((left + width // 2 - 60, _SIZE[1] - 25), "ms per image (log scale)", fill="black")
    draw.text((left, 8), quality_label, fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
