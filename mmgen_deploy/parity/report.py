"""PASSED/FAILED checks, rendered as a rich table and as JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


@dataclass
class Check:
    """One comparison: `value` must be `<=` or `>=` `threshold`."""

    group: str  # e.g. "encoder", "end-to-end"
    name: str  # e.g. "h rel_l2 (real, batch 3)"
    value: float
    threshold: float
    direction: str  # "<=" (errors) or ">=" (PSNR, agreement)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # NumPy scalars in, plain floats out: reports must serialise to JSON.
        self.value, self.threshold = float(self.value), float(self.threshold)

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return bool(self.value <= self.threshold if self.direction == "<=" else self.value >= self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "value": self.value, "threshold": self.threshold,
                "direction": self.direction, "passed": self.passed, "details": self.details}


@dataclass
class ParityReport:
    title: str
    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # Lines printed under the table (e.g. the output scale the comparison ran at).
    notes: list[str] = field(default_factory=list)
    # False when the checks cannot tell backends apart (e.g. a denoiser with negligible output).
    meaningful: bool = True

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def verdict(self) -> str:
        caveat = "" if self.meaningful else " (NOT MEANINGFUL: see the notes)"
        if self.passed:
            return f"PASSED: {len(self.checks)} of {len(self.checks)} checks within tolerance{caveat}"
        names = "; ".join(f"{c.group}: {c.name}" for c in self.failed[:3])
        more = f" (+{len(self.failed) - 3} more)" if len(self.failed) > 3 else ""
        return f"FAILED: {len(self.failed)} of {len(self.checks)} checks: {names}{more}{caveat}"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "passed": self.passed, "meaningful": self.meaningful, "verdict": self.verdict(),
                "notes": list(self.notes), "info": self.info, "checks": [c.to_dict() for c in self.checks]}

    def render(self, console: Console) -> None:
        # No vertical rules and short tolerances: the table fits an 80-column terminal with the
        # longest check names whole (the JSON report has every digit).
        table = Table(title=self.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ("component", "check", "value", "tolerance", "result"):
            table.add_column(col, justify="right" if col in ("value", "tolerance") else "left")
        for c in self.checks:
            result = "[green]PASSED[/]" if c.passed else "[bold red]FAILED[/]"
            table.add_row(c.group, c.name, _fmt(c.value), f"{c.direction} {c.threshold:.4g}", result)
        console.print(table)
        for note in self.notes:
            console.print(note if self.meaningful else f"[bold yellow]{note}[/]", highlight=False)
        style = "bold green" if self.passed else "bold red"
        console.print(f"[{style}]{self.verdict()}[/]")


def _fmt(x: float) -> str:
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"
