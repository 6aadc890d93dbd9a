"""The Pareto front of measured configurations: quality (higher is better) against milliseconds per
image (lower is better).

Peak memory is reported with each point but is not an objective: several runners are open in one
process while a search runs, so a candidate's peak includes theirs (see `search`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Measured(Protocol):
    """What the front needs of a point."""

    @property
    def quality(self) -> float: ...

    @property
    def ms_per_image(self) -> float: ...


P = TypeVar("P", bound="Measured")


def dominates(a: Measured, b: Measured) -> bool:
    """`a` is at least as good as `b` on both objectives and strictly better on one."""
    no_worse = a.quality >= b.quality and a.ms_per_image <= b.ms_per_image
    better = a.quality > b.quality or a.ms_per_image < b.ms_per_image
    return no_worse and better


def pareto_front(points: Sequence[P]) -> list[P]:
    """The points no other point dominates, fastest first (equal points are all kept)."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (p.ms_per_image, -p.quality))


def fastest_within(points: Sequence[P], reference_quality: float, max_drop: float) -> P | None:
    """The fastest point whose quality is at least `reference_quality - max_drop` (ties: the better
    quality); None when no point qualifies."""
    eligible = [p for p in points if p.quality >= reference_quality - max_drop]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (p.ms_per_image, -p.quality))


@dataclass(frozen=True)
class Point:
    """A bare point (tests, plots)."""

    quality: float
    ms_per_image: float
