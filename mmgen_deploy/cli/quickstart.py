"""`mmgen quickstart`: train the tiny preset on `shapes` (or `tones`), then every later pipeline stage.

Every stage calls the library (training, `export_run`, `generate_to_folder`, `evaluate_run`,
`run_parity`) through the same printing helpers its own command uses, so the quickstart shows
what running the commands one by one would show, without the CLI calling itself back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mmgen_deploy.cli.common import TRAINING_SEED_OPTION, console, emit_json, json_option
from mmgen_deploy.cli.evaluate import eval_settings, run_eval
from mmgen_deploy.cli.train import (
    OVERWRITE_OPTION,
    TextOptions,
    dit_train_settings,
    new_run,
    stage_dit,
    stage_vq,
    vq_train_settings,
)
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.runtime.backends import DEFAULT_BACKEND
from mmgen_deploy.specs import DEFAULT_EXPORT_PRECISIONS

if TYPE_CHECKING:
    from mmgen_deploy.rundir import RunDir

# The backend the main job runs on: the embedded default (ONNX Runtime on the CPU).
QUICKSTART_BACKEND = DEFAULT_BACKEND


@dataclass
class QuickstartContext:
    """What the quickstart stages share; later stages (export, generate, parity) read `run`."""

    run: RunDir
    train: Any
    val: Any
    seed: int
    threads: int | None = None  # every stage's CPU threads (None: each stage's default, as its command's)
    results: dict[str, Any] = field(default_factory=dict)
    text: bool = False  # `quickstart --text`: a text-to-image model
    samples_per_class: int | None = None  # the evaluation's, for a class model (None: QUICKSTART_EVAL's)


# A stage does its work and returns one line saying where its outputs went.
QuickstartStage = tuple[str, Callable[[QuickstartContext], str]]


def _qs_vqvae(ctx: QuickstartContext) -> str:
    from mmgen_deploy.training import recipe_for

    settings = vq_train_settings(recipe_for("tiny", text=ctx.text), None, None, None, ctx.seed, False)
    result = stage_vq(ctx.run, ctx.train, ctx.val, settings, False, ctx.threads)
    ctx.results["vqvae"] = result
    return f"{ctx.run.weights_path('vqvae')}, reconstructions in {result['reconstruction_grid']}"


def _qs_dit(ctx: QuickstartContext) -> str:
    from mmgen_deploy.training import recipe_for

    settings = dit_train_settings(recipe_for("tiny", text=ctx.text), None, None, None, ctx.seed)
    result = stage_dit(ctx.run, ctx.train, settings, False, ctx.threads)
    ctx.results["dit"] = result
    return f"{ctx.run.weights_path('dit')}" + (f", samples in {result['sample_grid']}"
                                               if result.get("sample_grid") else "")


def export_stage(ctx: QuickstartContext) -> str:
    from mmgen_deploy.cli.export import run_export

    # What `mmgen export` makes.
    manifest = run_export(ctx.run, precisions=list(DEFAULT_EXPORT_PRECISIONS), threads=ctx.threads)
    emit_json(manifest, str(ctx.run.report_path("export")))
    return str(ctx.run.onnx_dir)


def _generate(ctx: QuickstartContext, *, classes: list[str] | None = None, prompts: list[str] | None = None) -> str:
    """Two images per class or prompt with generate's sampling defaults, on ONNX Runtime CPU FP32."""
    from mmgen_deploy.cli.generate import run_generate
    from mmgen_deploy.sampling.generate import GenerateRequest

    out = ctx.run.samples_dir / f"{QUICKSTART_BACKEND}-fp32"
    # The sampling defaults (steps, sampler, guidance) are generate's.
    request = GenerateRequest(classes=classes or [], prompts=prompts or [], n=2, seed=ctx.seed,
                              backend=QUICKSTART_BACKEND, precision="fp32", batch_size=18, out=out,
                              threads=ctx.threads)
    run_generate(ctx.run, request)
    return str(out / "grid.png")


def generate_stage(ctx: QuickstartContext) -> str:
    return _generate(ctx, classes=list(ctx.run.load_config().class_names))


def generate_prompts_stage(ctx: QuickstartContext) -> str:
    """A text-to-image run: two images for each of the fixed grid prompts (the training grid's)."""
    from mmgen_deploy.training.dit import grid_prompts

    return _generate(ctx, prompts=grid_prompts(ctx.train.captions))


def parity_stage(ctx: QuickstartContext) -> str:
    """Parity of the backend the quickstart used, FP32 and FP16, and of what `--backend auto` picks
    here when that is something else (OpenVINO BF16 on an AMX CPU for a large enough model); a failure
    fails the quickstart."""
    from mmgen_deploy.cli.parity import run_parity_report
    from mmgen_deploy.parity.compare import ParityOptions, parity_report_path
    from mmgen_deploy.runtime import resolve_backend

    verdicts = {}
    checks = [(QUICKSTART_BACKEND, precision) for precision in DEFAULT_EXPORT_PRECISIONS]
    auto = resolve_backend("auto", ctx.run, device="cpu")
    if (auto.backend, auto.precision) not in checks:
        checks.append((auto.backend, auto.precision))
    for backend, precision in checks:
        label = precision if backend == QUICKSTART_BACKEND else f"{backend} {precision}"
        # As `mmgen parity --threads`: the backend's threads and the PyTorch reference's.
        options = ParityOptions(backend=backend, precision=precision, threads=ctx.threads,
                                torch_threads=ctx.threads or ParityOptions.torch_threads)
        report = parity_report_path(ctx.run, options)
        passed = run_parity_report(ctx.run, options).passed
        verdicts[label] = "PASSED" if passed else "FAILED"
        ctx.results.setdefault("parity", {})[label] = str(report)
    if any(v == "FAILED" for v in verdicts.values()):
        raise MMGenError(f"parity failed: {verdicts}", "see the parity tables above and RUN_DIR/reports")
    return ", ".join(f"{p} {v}" for p, v in verdicts.items()) + f" ({ctx.run.reports_dir})"


@dataclass(frozen=True)
class QuickstartEval:
    """How much the quickstart's evaluation samples: a class run `samples_per_class` images of each
    class, a text run one image for each of `num_prompts` held-out prompts."""

    samples_per_class: int = 10
    num_prompts: int = 200
    steps: int = SAMPLING.steps


QUICKSTART_EVAL = QuickstartEval()


def _qs_eval_on_deployed_path(ctx: QuickstartContext) -> str:
    """Judged on the deployed path (ONNX Runtime, FP32 graphs), not on PyTorch."""
    from mmgen_deploy.evaluation.evaluate import eval_report_path

    sizes = QUICKSTART_EVAL
    settings = eval_settings(ctx.samples_per_class or sizes.samples_per_class, sizes.steps, SAMPLING.cfg_scale,
                             ctx.seed, True, QUICKSTART_BACKEND, "fp32", sizes.num_prompts, threads=ctx.threads)
    ctx.results["eval"] = run_eval(ctx.run, settings)
    return str(eval_report_path(ctx.run, settings))


# Ordered: training, then the deployment path on the embedded default backend.
QUICKSTART_STAGES: list[QuickstartStage] = [
    ("train VQ-VAE", _qs_vqvae),
    ("train DiT", _qs_dit),
    ("export ONNX FP32 + FP16", export_stage),
    ("generate (ONNX Runtime CPU)", generate_stage),
    ("evaluate", _qs_eval_on_deployed_path),
    ("parity vs PyTorch", parity_stage),
]


# The quickstart's data sets, and how many samples of each class its evaluation judges (None:
# QUICKSTART_EVAL's, read when the stage runs).
QUICKSTART_DATA: dict[str, int | None] = {"shapes": None, "tones": 20}

# `shapes` attribute combinations kept out of the text quickstart's training data.
QUICKSTART_TEXT_HOLDOUT = 0.2
# Pooled (adaLN) only: its steps cost ~0.8x those with cross-attention too, so 5000 fit in the
# 12 minutes. With the recipe's text encoder rate, held-out prompts got 89.5/87/93.5% shape and
# 100/98.5/99% position for seeds 0/1/2 (benchmarks/RESULTS.md); pooled+cross_attention got
# 87%/100% (seed 0) but trained for 12.1 minutes.
QUICKSTART_TEXT_CONDITIONING = "pooled"

# `quickstart --text`: the same path with prompts instead of classes; export, generate and
# parity include the text encoder (a fifth component).
QUICKSTART_TEXT_STAGES: list[QuickstartStage] = [
    ("train VQ-VAE", _qs_vqvae),
    ("train DiT + text encoder", _qs_dit),
    ("export ONNX FP32 + FP16", export_stage),
    ("generate from prompts (ONNX Runtime CPU)", generate_prompts_stage),
    ("evaluate (held-out prompts)", _qs_eval_on_deployed_path),
    ("parity vs PyTorch", parity_stage),
]


def quickstart_cmd(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Run directory to create."),
    seed: int = TRAINING_SEED_OPTION, overwrite: bool = OVERWRITE_OPTION,
    threads: int | None = typer.Option(
        None, "--threads", min=1,
        help="CPU threads of every stage: training (the count changes the trained weights' last bits), export, "
             "generate, eval and parity (the backend and the reference), as each command's --threads. Default: "
             "each stage's own (training: one per CPU this process may use)."),
    text: bool = typer.Option(False, "--text", help="Text-to-image instead: the tiny preset with a text encoder "
                              "(pooled conditioning: the prompt's mean embedding drives adaLN), trained on "
                              "`shapes` captions with 20% of the attribute combinations held out, evaluated on "
                              "prompts from those."),
    data: str = typer.Option("shapes", "--data", help="`shapes` (pictures) or `tones` (sound: 1 s clips as "
                             "spectrograms, a Griffin-Lim vocoder after the decoder, WAV files out, judged "
                             "from the waveform with 20 clips per class)."),
    json_out: str | None = json_option("the results"),
) -> None:
    """Train the tiny preset on the built-in `shapes` data (about 8 minutes on 2 CPU cores; --text:
    a text-to-image model, about 11; --data tones: sound, about 6), evaluate it, then run every later pipeline
    stage that exists (export, generate on ONNX Runtime CPU, parity), printing where each output went."""
    from mmgen_deploy.io_utils import write_json
    from mmgen_deploy.rundir import RunDir

    started = time.perf_counter()
    if data not in QUICKSTART_DATA:
        raise UsageError(f"--data {data!r} is not one of the quickstart's data sets", "use shapes or tones")
    if text and data != "shapes":
        raise UsageError("--text trains on `shapes` captions", "leave out --data, or --text")
    if RunDir(out).exists() and not overwrite:  # checked before the data is generated
        raise UsageError(f"{out} already holds a run", "pass --overwrite to train it again")
    text_options = TextOptions(conditioning=QUICKSTART_TEXT_CONDITIONING,
                               holdout_fraction=QUICKSTART_TEXT_HOLDOUT) if text else None
    with RunDir(out).writing("run the quickstart", create=True):  # one writer; nested stages share the lock
        run, train, val = new_run(out, "tiny", data, None, seed, None, overwrite, False, text_options)
        ctx = QuickstartContext(run=run, train=train, val=val, seed=seed, threads=threads, text=text,
                                samples_per_class=QUICKSTART_DATA[data])
        timings: dict[str, float] = {}
        stages = QUICKSTART_TEXT_STAGES if text else QUICKSTART_STAGES
        for index, (name, stage) in enumerate(stages, start=1):
            console.rule(f"[bold]{index}/{len(stages)} {name}")
            stage_start = time.perf_counter()
            where = stage(ctx)
            timings[name] = round(time.perf_counter() - stage_start, 1)
            console.print(f"[green]done[/] {name} in {timings[name]:.0f} s -> {where}")
        summary = {"run_dir": str(run.root), "stage_seconds": timings,
                   "total_seconds": round(time.perf_counter() - started, 1), **ctx.results}
        write_json(run.report_path("quickstart"), summary)
        console.print(f"quickstart finished in {summary['total_seconds']:.0f} s; everything is in {run.root} "
                      f"(summary: {run.report_path('quickstart')})")
        emit_json(summary, json_out)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_cmd)
