from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from mmgen_deploy.cli.common import (
    CACHE_OPTION,
    RECIPE_OPTION,
    THREADS_OPTION,
    console,
    emit_json,
    json_option,
    refuse_recipe_conflicts,
    sampling_seed_option,
    split_list,
    stdout_console,
)
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.runtime.backends import backend_list, backends_on, capabilities, precision_help, precision_list
from mmgen_deploy.specs import PIPELINE_TOLERANCES, RUN_PRECISIONS

if TYPE_CHECKING:
    from mmgen_deploy.parity.compare import ParityOptions
    from mmgen_deploy.parity.report import ParityReport
    from mmgen_deploy.rundir import RunLike


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {text!r}", f"e.g. {option} 1,3") from None
    if not values or any(not 1 <= v <= SAMPLING.max_batch_size for v in values):
        raise UsageError(f"{option} values must be in 1..{SAMPLING.max_batch_size}, got {text!r}")
    return values


def _parse_per_output(values: list[str], option: str) -> dict[str, float]:
    """`0.02` (every output) or `name=0.02` (one output), repeatable."""
    out: dict[str, float] = {}
    for item in values:
        name, _, number = item.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            raise UsageError(f"{option} {item!r} is not a number or NAME=NUMBER",
                             f"e.g. {option} 0.02 or {option} model_output=0.02") from None
        if value < 0:
            raise UsageError(f"{option} must be >= 0, got {item!r}")
        out[name or "*"] = value
    return out


def run_parity_report(run_dir: RunLike, options: ParityOptions, json_out: str | None = None) -> ParityReport:
    """`run_parity` with its progress lines and table (what `mmgen parity` and the quickstart's
    parity stage print); returns the report (`.passed` is the verdict)."""
    from mmgen_deploy.parity.compare import run_parity

    report = run_parity(run_dir, options, progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    if json_out != "-":
        report.render(stdout_console)
    emit_json(report.to_dict(), json_out)
    return report


# The bench options a recipe sets (parameter name -> option).
BENCH_RECIPE_SETS = {"backends": "--backend", "precisions": "--precision", "batch_sizes": "--batch-sizes",
                     "steps": "--steps", "cfg_scale": "--cfg-scale", "threads": "--threads", "cache": "--cache"}


def register(app: typer.Typer) -> None:
    @app.command()
    def parity(
        run_dir: Path = typer.Argument(..., help="Run directory (trained or imported, with an ONNX export)."),
        backend: str = typer.Option("onnxruntime", help=f"Backend to check: {backend_list()}."),
        precision: str = typer.Option("fp32", help=precision_help(backend_default=False)),
        batch_sizes: str = typer.Option("1,3", "--batch-sizes", "--batch",
                                        help="Comma-separated batch sizes for the per-component checks."),
        steps: int | None = typer.Option(None, show_default=False,
                                         help="Sampling steps of the end-to-end check. Default: 20, or a distilled "
                                              "student's own."),
        sampler: str | None = typer.Option(None, show_default=False,
                                           help=f"Sampler of the end-to-end check. Default: {SAMPLING.sampler}, "
                                                "or a distilled student's own."),
        cfg_scale: float | None = typer.Option(None, show_default=False,
                                               help=f"Guidance scale of the end-to-end check. Default: "
                                                    f"{SAMPLING.cfg_scale:g}."),
        num_images: int = typer.Option(8, "--images", help="Images in the end-to-end check (classes or prompts "
                                       "cycle)."),
        prompt: list[str] = typer.Option([], "--prompt", "-p", help="Text-to-image runs: a prompt of the end-to-end "
                                         "check (repeatable). Default: captions of the run's validation images, or "
                                         "prompts made of its tokenizer's words."),
        seed: int = sampling_seed_option("Parity also draws the per-component test inputs from it, the same on "
                                         "both sides."),
        rtol: list[str] = typer.Option([], "--rtol", help="Relative-L2 tolerance, for all outputs (0.02) or one "
                                       "(model_output=0.02); repeatable. Defaults come from the component specs."),
        atol: list[str] = typer.Option([], "--atol", help="Add a max-abs-error check, for all outputs or NAME=X."),
        min_psnr: float | None = typer.Option(None, help="Minimum end-to-end image PSNR in dB (default: "
                                              + ", ".join(f"{t['min_psnr']:g} for {p}"
                                                          for p, t in PIPELINE_TOLERANCES.items()) + ")."),
        end_to_end: bool = typer.Option(True, "--end-to-end/--components-only", help="Also compare whole "
                                        "sampling runs with the same seed."),
        allow_untrained: bool = typer.Option(False, help="Compare even a model whose denoiser output is zero or "
                                             "negligible next to its input (RMS ratio below 0.05); the report "
                                             "is then marked NOT MEANINGFUL."),
        threads: int | None = typer.Option(None, "--threads", min=1,
                                           help="CPU threads of the backend under test and of the PyTorch "
                                                "reference (default: the backend's own; the reference 1, fastest "
                                                "for small models on busy CPUs)."),
        torch_threads: int = typer.Option(1, "--torch-threads", min=0, hidden=True,
                                          help="PyTorch threads of the reference side only (0 = torch's default)."),
        cache: str = CACHE_OPTION,
        json_out: str | None = json_option("every number"),
    ) -> None:
        """Compare a backend with PyTorch FP32: every component on random and real inputs (max/mean abs,
        relative L2, cosine, NaN/Inf, quantizer index agreement with near-tie analysis), then whole sampling
        runs (final latent over all images and for the median image, code indices, image PSNR/SSIM, per-step
        drift). Exit code 1 on any FAILED check.

        With --cache, the end-to-end check samples with that policy on both sides (the steps each side
        recomputed must agree) and the denoiser's parts are compared too.

        A copy of the JSON report is always written to RUN_DIR/reports/parity-BACKEND-PRECISION.json, with the
        settings that differ from the defaults added to the name (parity-onnxruntime-fp32-steps4.json,
        -cache-POLICY with --cache), so a quick check never replaces the verdict of a full one."""
        from mmgen_deploy.parity.compare import ParityOptions
        from mmgen_deploy.runtime import REGISTRY
        from mmgen_deploy.sampling.cache import parse_cache_policy
        from mmgen_deploy.sampling.loop import check_sampling_numbers

        if backend not in REGISTRY:
            raise UsageError(f"unknown backend {backend!r}", f"choose {backend_list()}")
        if precision not in RUN_PRECISIONS:
            raise UsageError(f"unknown precision {precision!r}", f"choose {', '.join(RUN_PRECISIONS)}")
        if not 1 <= num_images <= SAMPLING.max_generate_images:
            raise UsageError(f"--images must be in 1..{SAMPLING.max_generate_images}, got {num_images}")
        check_sampling_numbers(steps=1 if steps is None else steps, sampler=sampler or SAMPLING.sampler,
                               cfg_scale=SAMPLING.cfg_scale if cfg_scale is None else cfg_scale, batch_size=1,
                               seed=seed)
        parse_cache_policy(cache)
        options = ParityOptions(
            backend=backend, precision=precision, batches=_parse_ints(batch_sizes, "--batch-sizes"), steps=steps,
            sampler=sampler, cfg_scale=cfg_scale, num_images=num_images, seed=seed,
            rel_l2=_parse_per_output(rtol, "--rtol"), max_abs=_parse_per_output(atol, "--atol"),
            min_psnr=min_psnr, end_to_end=end_to_end, allow_untrained=allow_untrained, prompts=prompt or None,
            torch_threads=threads or torch_threads or None, threads=threads, cache=cache,
        )
        if not run_parity_report(run_dir, options, json_out).passed:
            raise typer.Exit(1)

    @app.command()
    def bench(
        ctx: typer.Context,
        run_dir: Path = typer.Argument(..., help="Run directory with an ONNX export."),
        backends: list[str] = typer.Option([",".join(backends_on("cpu"))], "--backend", "--backends",
                                           help=f"Backends to measure (repeat or comma-separate): {backend_list()}."),
        precisions: list[str] = typer.Option(["auto"], "--precision", "--precisions",
                                             help=f"Precisions to measure (repeat or comma-separate: "
                                                  f"{precision_list()}); each backend runs those it has ("
                                                  + "; ".join(f"{name}: {runs}" for name, runs in capabilities())
                                                  + ") and the table lists the others as not run. auto: every one "
                                                  "a backend has here (its exported or built sets; bf16 on CPUs "
                                                  "with BF16 units)."),
        batch_sizes: str = typer.Option("1,16", "--batch-sizes", "--batch",
                                        help="Comma-separated batch sizes (images; the denoiser runs 2x with "
                                             "guidance)."),
        runs: int = typer.Option(10, help="Timed runs per component and batch (after warm-up)."),
        warmup: int = typer.Option(3, help="Untimed warm-up runs."),
        steps: int | None = typer.Option(None, show_default=False,
                                         help="Sampling steps of the end-to-end measurement. Default: 10, or a "
                                              "distilled student's own."),
        cfg_scale: float | None = typer.Option(None, show_default=False,
                                               help=f"Guidance scale (> 1 doubles the denoiser batch, except a "
                                                    f"distilled student's). Default: {SAMPLING.cfg_scale:g}, or a "
                                                    "distilled student's own."),
        components: list[str] = typer.Option([], "--components", "-c",
                                             help="Components to time one by one (repeat or comma-separate; default "
                                                  "all; e.g. denoiser,quantizer,decoder skips the encoder, which "
                                                  "generation does not run)."),
        json_out: str | None = json_option("the results"),
        markdown: Path | None = typer.Option(None, help="Also write the table as Markdown to this file."),
        threads: int | None = THREADS_OPTION,
        cache: str = CACHE_OPTION,
        recipe: bool = RECIPE_OPTION,
    ) -> None:
        """Per-component latency (median, p90) and end-to-end images/s for each backend and precision, side by
        side in one run, with peak host memory, where the time of a generation goes, and the denoiser's and
        decoder's achieved GFLOP/s against this machine's matrix-multiply peak of the precision they ran
        (FP32, BF16 and INT8 peaks are measured at the start of the same run)."""
        from mmgen_deploy.parity.bench import run_bench

        backend_list = split_list(backends)
        precision_list = split_list(precisions)
        batch_list = _parse_ints(batch_sizes, "--batch-sizes")
        sampler = None
        if recipe:  # the one configuration `mmgen tune` chose, on the run (or student) it measured
            from mmgen_deploy.tuning.recipe import load_recipe

            refuse_recipe_conflicts(ctx, BENCH_RECIPE_SETS)
            chosen = load_recipe(run_dir)
            engine, sampled = chosen.candidate.engine, chosen.candidate.settings
            console.print(f"recipe: {chosen.candidate.label()} ({chosen.path})")
            run_dir = chosen.model_dir
            backend_list, precision_list, batch_list = [engine.backend], [engine.precision], [engine.batch_size]
            steps, cfg_scale, sampler, cache, threads = (sampled.steps, sampled.cfg_scale, sampled.sampler,
                                                         sampled.cache, chosen.threads)
        if runs < 1 or warmup < 0 or (steps is not None and steps < 1):
            raise UsageError("--runs and --steps must be >= 1 and --warmup >= 0")
        if cfg_scale is not None and not (math.isfinite(cfg_scale) and 0 <= cfg_scale <= SAMPLING.max_cfg_scale):
            raise UsageError(f"--cfg-scale must be in 0..{SAMPLING.max_cfg_scale:g}, got {cfg_scale}")
        from mmgen_deploy.sampling.cache import parse_cache_policy
        from mmgen_deploy.specs import ALL_COMPONENTS, expand_parts

        parse_cache_policy(cache)
        component_list = list(expand_parts(split_list(components))) or None
        unknown = [c for c in component_list or () if c not in ALL_COMPONENTS]
        if unknown:
            raise UsageError(f"unknown component {unknown[0]!r}", f"choose from {', '.join(ALL_COMPONENTS)}")
        result = run_bench(run_dir, backend_list, precision_list, batch_list, runs=runs,
                           warmup=warmup, steps=steps, cfg_scale=cfg_scale,
                           progress=lambda msg: console.print(f"[dim]{msg}[/]"), components=component_list,
                           threads=threads, cache=cache, sampler=sampler)
        if json_out != "-":
            for table in result.tables():
                stdout_console.print(table)
            for note in result.notes():
                stdout_console.print(escape(note))  # errors name pip extras such as mmgen-deploy[tensorrt]
        emit_json(result.to_dict(), json_out)
        if markdown is not None:
            from mmgen_deploy.io_utils import atomic_path

            with atomic_path(markdown) as tmp:
                tmp.write_text(result.markdown())
