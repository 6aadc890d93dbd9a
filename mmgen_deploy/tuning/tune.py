"""`tune_run`: search, then write the report, the plot and (with a quality budget) the recipe.

Everything is written after the search, each file atomically, the recipe last: an interrupted tune
(Ctrl-C) leaves the run's earlier files as they were and no partial recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import UsageError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.tuning.recipe import build_recipe, machine_fingerprint, search_summary, write_recipe
from mmgen_deploy.tuning.search import Measurement, Progress, TuneOptions, TuneResult, tune


@dataclass
class Tuned:
    result: TuneResult
    report: dict[str, Any]
    report_path: Path
    plot_path: Path
    chosen: Measurement | None
    recipe_path: Path | None


def check_options(options: TuneOptions) -> None:
    """The checks that need no run directory (messages name the fields)."""
    if options.max_quality_drop is not None and not options.max_quality_drop >= 0:
        raise UsageError(f"{{max_quality_drop}} must be >= 0 points, got {options.max_quality_drop}",
                         params=["max_quality_drop"])
    if not options.budget_seconds > 0:
        raise UsageError("{budget_minutes} must be > 0", params=["budget_minutes"])
    if options.samples is not None and options.samples < 1:
        raise UsageError(f"{{samples}} must be >= 1, got {options.samples}", params=["samples"])
    if options.threads is not None and options.threads < 1:
        raise UsageError(f"{{threads}} must be >= 1, got {options.threads}", params=["threads"])


def tune_report(result: TuneResult, chosen: Measurement | None) -> dict[str, Any]:
    """Everything measured, as JSON: the measure, the reference, the default, the front, every
    configuration with its status (measured, pruned, skipped, cut, failed, budget) and why."""
    front = result.front()
    return {
        "measure": result.measure.describe(),
        "reference": result.reference.to_dict(), "default": result.default.to_dict(),
        "chosen": None if chosen is None else chosen.to_dict(),
        "max_quality_drop": result.options.max_quality_drop,
        "front": [m.to_dict() for m in front],
        "configurations": [m.to_dict() for m in sorted(result.measurements, key=_order)],
        "machine": machine_fingerprint(), "search": search_summary(result),
        "student": None if result.student is None else str(result.student.root),
    }


def _order(m: Measurement) -> tuple[int, float]:
    return (0 if m.scores else 1, m.ms_per_image if m.scores else 0.0)


def tune_run(run_dir: RunLike, options: TuneOptions, progress: Progress | None = None) -> Tuned:
    """Measure `run_dir` on this machine and write RUN_DIR/reports/tune.json, RUN_DIR/reports/tune-front.png
    and, when `options.max_quality_drop` is set, RUN_DIR/recipe.json."""
    from mmgen_deploy.io_utils import write_json
    from mmgen_deploy.tuning.plot import plot_front

    check_options(options)
    run = RunDir.of(run_dir)
    with run.writing("tune"):
        result = tune(run, options, progress)
        chosen = None if options.max_quality_drop is None else result.choose(options.max_quality_drop)
        report = tune_report(result, chosen)
        report_path = run.report_path("tune")
        write_json(report_path, report)
        plot_path = plot_front([m for m in result.measurements if m.scores], result.front(), run.tune_plot_path,
                               quality_label=f"quality: {result.measure.description}",
                               reference=result.reference, default=result.default, chosen=chosen)
        recipe_path = None
        if options.max_quality_drop is not None:
            recipe_path = write_recipe(run, build_recipe(result, run, options.max_quality_drop))
    return Tuned(result, report, report_path, plot_path, chosen, recipe_path)
