"""`mmgen batch`: offline generation from a JSONL file of requests, in-process or with Ray Data."""

from __future__ import annotations

from pathlib import Path

import typer

from mmgen_deploy.cli.common import (
    BACKEND_OPTION,
    CACHE_OPTION,
    PRECISION_OPTION,
    RECIPE_OPTION,
    console,
    count_column,
    emit_json,
    json_option,
    plural,
    refuse_recipe_conflicts,
    sample_noun,
    threads_option,
)
from mmgen_deploy.defaults import SAMPLING


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)


def batch(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="Run directory (from `mmgen train`, `quickstart` or `import`)."),
    requests: Path = typer.Argument(..., metavar="REQUESTS.jsonl",
                                    help='One JSON object per line: {"class": "red circle", "n": 3, "seed": 11} or '
                                         '{"prompt": "...", "n": 2}; optional steps, cfg_scale, sampler. '
                                         f'n is at most {SAMPLING.max_images_per_line} per line, '
                                         f'{SAMPLING.max_batch_images} images per file.'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images/, manifest.jsonl, batch.json. "
                                                      "Rerunning on it skips what is done."),
    ray_address: str | None = typer.Option(None, "--ray", metavar="ADDRESS|local",
                                           help="Spread the images over a Ray cluster with Ray Data (HOST:PORT of a "
                                                "running cluster, or local: start Ray on this machine). Default: "
                                                "in-process."),
    workers: int | None = typer.Option(None, "--workers",
                                       help="Ray actors, each holding one runner (default: one per GPU, else "
                                            "CPUs / --threads)."),
    steps: int | None = typer.Option(None, "--steps", show_default=False,
                                     help=f"Denoising steps for lines that name none. Default: {SAMPLING.steps}, or "
                                          "a distilled student's own."),
    cfg_scale: float | None = typer.Option(None, "--cfg-scale", show_default=False,
                                           help=f"Guidance scale for lines that name none. Default: "
                                                f"{SAMPLING.cfg_scale:g}, or a distilled student's own."),
    sampler: str | None = typer.Option(None, "--sampler", show_default=False,
                                       help=f"ddim, ddpm or dpmpp-2m, for lines that name none. Default: "
                                            f"{SAMPLING.sampler}, or a distilled student's own."),
    batch_size: int = typer.Option(SAMPLING.batch_size, "--batch-size", "-b",
                                   help="Images per denoiser call (per worker)."),
    backend: str = BACKEND_OPTION,
    precision: str | None = PRECISION_OPTION,
    threads: int | None = threads_option(
        "With --ray, each worker's: Ray reserves that many CPUs per worker (default 1), so a CPU cluster runs "
        "its CPUs / N workers."),
    cache: str = CACHE_OPTION,
    recipe: bool = RECIPE_OPTION,
    json_out: str | None = json_option("counts, files and timing"),
) -> None:
    """Generate every image a JSONL file of requests asks for, as `mmgen generate` would make it.

    Request line L with {"class": C, "n": N, "seed": S} gives the N images of
    `mmgen generate RUN --class C --n N --seed S` (image k from the noise of (S, k)), written as
    OUT/images/LLLLL_KKKK_<name>.png with generate's PNG text chunks, and one manifest.jsonl line
    each. A rerun skips every image already in the manifest, so an interrupted batch resumes.
    """
    from mmgen_deploy.batch import BatchSettings, run_batch
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.sampling.cache import parse_cache_policy
    from mmgen_deploy.sampling.loop import check_sampling_numbers

    check_sampling_numbers(steps=SAMPLING.steps if steps is None else steps, sampler=sampler or SAMPLING.sampler,
                           cfg_scale=SAMPLING.cfg_scale if cfg_scale is None else cfg_scale, batch_size=batch_size,
                           eta=SAMPLING.eta)
    parse_cache_policy(cache)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if workers is not None and ray_address is None:
        raise UsageError("--workers needs --ray", "add --ray local (or --ray HOST:PORT)")
    settings = BatchSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, backend=backend, precision=precision,
                             threads=threads, batch_size=batch_size, cache=parse_cache_policy(cache).spec)
    if recipe:
        from mmgen_deploy.tuning.recipe import load_recipe

        refuse_recipe_conflicts(ctx, {"steps": "--steps", "cfg_scale": "--cfg-scale", "sampler": "--sampler",
                                      "batch_size": "--batch-size", "backend": "--backend",
                                      "precision": "--precision", "threads": "--threads", "cache": "--cache"})
        chosen = load_recipe(run_dir)
        engine, sampled = chosen.candidate.engine, chosen.candidate.settings
        console.print(f"recipe: {chosen.candidate.label()} ({chosen.path}); request lines' own settings still apply")
        run_dir = chosen.model_dir
        settings = BatchSettings(steps=sampled.steps, cfg_scale=sampled.cfg_scale, sampler=sampled.sampler,
                                 backend=engine.backend, precision=engine.precision, threads=chosen.threads,
                                 batch_size=engine.batch_size, cache=sampled.cache)

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mmgen_deploy.rundir import RunDir

    noun = sample_noun(RunDir(run_dir).load_config())
    columns = (TextColumn("{task.description}"), BarColumn(), count_column(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"writing {noun}s", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = run_batch(run_dir, requests, out, settings, ray_address=ray_address, workers=workers,
                           progress=advance)
    where = f"Ray ({ray_address}, {plural(report.workers, 'worker')})" if ray_address else "in-process"
    if report.written == 0:
        console.print(f"nothing to do: all {plural(report.total, noun)} are already in {out / 'manifest.jsonl'}")
    else:
        console.print(f"wrote {plural(report.written, noun)} to {out} in {report.seconds:.2f} s "
                      f"([bold]{report.images_per_second:.2f} {noun}s/s[/], {where}; "
                      f"{report.steady_images_per_second:.2f} {noun}s/s after the first batch, which came back "
                      f"after {report.first_batch_seconds:.1f} s); {report.skipped} already done")
    emit_json(report.to_dict(), json_out)
