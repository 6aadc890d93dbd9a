"""`mmgen tune RUN_DIR`: the measured quality / cost front of a run on this machine, and a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmgen_deploy.cli.common import (
    THREADS_OPTION,
    console,
    emit_json,
    json_option,
    plural,
    sampling_seed_option,
    split_list,
    stdout_console,
)
from mmgen_deploy.runtime.backends import backend_list, precision_list


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)


def tune_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory to tune (trained, imported or distilled)."),
    max_quality_drop: float | None = typer.Option(
        None, "--max-quality-drop", metavar="POINTS",
        help="Write RUN_DIR/recipe.json: the fastest measured configuration whose quality is at most POINTS below "
             "the reference's (accuracy points with a judge, SSIM x 100 otherwise). Left out: measure and "
             "report only."),
    budget_minutes: float = typer.Option(20.0, "--budget-minutes", help="Stop measuring after this many minutes "
                                                                         "and choose from what was measured."),
    student: Path | None = typer.Option(None, "--student", help="Also measure this distilled student of the run "
                                                                 "(its run.json must name this run's weights)."),
    backend: list[str] | None = typer.Option(None, "--backend", help=f"Backends to measure, repeat or comma-separate: "
                                                                      f"{backend_list()} (default: every one here)."),
    precision: list[str] | None = typer.Option(None, "--precision",
                                               help=f"Precisions to measure ({precision_list()}; default: every one "
                                                    "with artifacts here)."),
    batch_sizes: str = typer.Option("16,64", "--batch-sizes", help="Images per denoiser call to measure, "
                                                                    "comma-separated."),
    samples: int | None = typer.Option(None, "--samples", help="Images of the last rung (default 20 per class with "
                                                               "a class judge, 200 prompts with a text judge, 16 "
                                                               "for fidelity)."),
    seed: int = sampling_seed_option("The search's images are images 0..N-1 of this seed; check a recipe on "
                                     "another seed."),
    threads: int | None = THREADS_OPTION,
    json_out: str | None = json_option("the report"),
) -> None:
    """Measure configurations of a run on this machine (backend x precision x batch size x sampler x steps x
    guidance x step caching, and a distilled student with --student) and report the Pareto front of quality
    against milliseconds per image.

    Quality is the shapes judge's accuracy for runs trained on shapes, otherwise the SSIM to the reference
    configuration's images (PyTorch FP32, the run's own steps, no cache, same seeds). Hopeless and dominated
    configurations are dropped early and the rest measured on more images (successive halving) within
    --budget-minutes. Writes RUN_DIR/reports/tune.json, RUN_DIR/reports/tune-front.png and, with
    --max-quality-drop, RUN_DIR/recipe.json, which `generate --recipe` and `batch --recipe` use."""
    from mmgen_deploy.tuning.search import TuneOptions
    from mmgen_deploy.tuning.tune import check_options, tune_run

    try:
        sizes = tuple(int(v) for v in split_list([batch_sizes]))
    except ValueError:
        from mmgen_deploy.errors import UsageError

        raise UsageError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    options = TuneOptions(samples=samples, seed=seed, budget_seconds=budget_minutes * 60,
                          max_quality_drop=max_quality_drop, backends=split_list(backend) or None,
                          precisions=split_list(precision) or None, batch_sizes=sizes or (16,), threads=threads,
                          student=student)
    if not budget_minutes > 0:
        from mmgen_deploy.errors import UsageError

        raise UsageError(f"--budget-minutes must be > 0, got {budget_minutes}")
    check_options(options)
    with console.status("tuning") as status:
        def progress(text: str) -> None:
            status.update(f"tuning: {text}")

        tuned = tune_run(run_dir, options, progress)
    show(tuned)
    emit_json(tuned.report if tuned.recipe_path is None else {**tuned.report, "recipe": str(tuned.recipe_path)},
              json_out)


def show(tuned: Any) -> None:
    """The front, what was pruned, and the choice."""
    from rich.table import Table

    result = tuned.result
    measure = result.measure
    console.print(f"quality: {measure.description} ({measure.kind}); {plural(result.rungs[-1], 'image')} "
                  f"on the last rung, rungs {', '.join(str(r) for r in result.rungs)}")
    table = Table(title="the front (quality vs ms per image)", title_justify="left")
    for column in ("quality", "ms/image", "images", "configuration"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for m in result.front():
        table.add_row(f"{m.quality:.1f} +-{m.noise:.1f}", f"{m.ms_per_image:.2f}", str(m.images),
                      m.candidate.label())
    stdout_console.print(table)
    ref, default = result.reference, result.default
    console.print(f"reference: {ref.candidate.label()}: {ref.quality:.1f} at {ref.ms_per_image:.2f} ms/image")
    console.print(f"default:   {default.candidate.label()}: {default.quality:.1f} at "
                  f"{default.ms_per_image:.2f} ms/image")
    counts = ", ".join(f"{count} {status}" for status, count in sorted(result.pruned_counts().items()))
    budget = " (the budget ran out)" if result.budget_exhausted else ""
    console.print(f"{plural(len(result.measurements), 'configuration')} in {result.seconds:.0f} s{budget}: {counts}")
    if tuned.chosen is not None:
        chosen = tuned.chosen
        speedup = default.ms_per_image / chosen.ms_per_image if default.scores and chosen.scores else float("nan")
        drop, stderr = result.drop(chosen)
        console.print(f"chosen: [bold]{chosen.candidate.label()}[/]: {chosen.quality:.1f} "
                      f"(reference {ref.quality:.1f}; drop {drop:.1f} +-{stderr:.1f} on the same images) at "
                      f"{chosen.ms_per_image:.2f} ms/image, {speedup:.2f}x the default's speed")
        stdout_console.print(f"recipe: {tuned.recipe_path}", soft_wrap=True)
    stdout_console.print(f"report: {tuned.report_path}", soft_wrap=True)
    stdout_console.print(f"plot: {tuned.plot_path}", soft_wrap=True)
