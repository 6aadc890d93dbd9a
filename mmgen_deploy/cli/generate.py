"""`mmgen generate`: sample images on PyTorch, ONNX Runtime or TensorRT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mmgen_deploy.cli.common import (
    BACKEND_OPTION,
    CACHE_OPTION,
    CFG_SCALE_OPTION,
    CLASS_OPTION,
    PRECISION_OPTION,
    PROMPT_OPTION,
    PROMPTS_FILE_OPTION,
    RECIPE_OPTION,
    SAMPLER_OPTION,
    STEPS_OPTION,
    THREADS_OPTION,
    console,
    count_column,
    emit_json,
    json_option,
    plural,
    refuse_recipe_conflicts,
    sample_noun,
    sampling_seed_option,
    stdout_console,
)
from mmgen_deploy.defaults import SAMPLING

if TYPE_CHECKING:
    from mmgen_deploy.rundir import RunLike
    from mmgen_deploy.sampling.generate import GenerateRequest


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="Run directory (from `mmgen train`, `quickstart` or `import`)."),
    classes: list[str] = CLASS_OPTION,
    prompts: list[str] = PROMPT_OPTION,
    prompts_file: Path | None = PROMPTS_FILE_OPTION,
    n: int = typer.Option(4, "--n", "-n", help="Images per class or prompt (18 classes with --n 10 give 180 "
                                               f"images); at most {SAMPLING.max_generate_images} images in all "
                                               "(generate keeps them in memory; `mmgen batch` writes any number)."),
    batch_size: int = typer.Option(SAMPLING.batch_size, "--batch-size", "-b",
                                   help="Images per denoiser call (guidance doubles the model batch)."),
    steps: int | None = STEPS_OPTION,
    sampler: str | None = SAMPLER_OPTION,
    cfg_scale: float | None = CFG_SCALE_OPTION,
    eta: float = typer.Option(SAMPLING.eta, "--eta",
                              help=f"DDIM noise in 0..{SAMPLING.max_eta:g} (0 = deterministic, 1 = DDPM-like); "
                                   "ddim only."),
    seed: int = sampling_seed_option(),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Output folder (default RUN_DIR/samples/<backend>-<precision>-<sampler>-"
                                         "<steps>steps-seed<seed>). A previous `generate` folder is replaced."),
    backend: str = BACKEND_OPTION,
    precision: str | None = PRECISION_OPTION,
    device: str | None = typer.Option(None, "--device",
                                      help="cpu or cuda; OpenVINO: cpu, gpu or npu (default: what the backend "
                                           "prefers)."),
    threads: int | None = THREADS_OPTION,
    cache: str = CACHE_OPTION,
    recipe: bool = RECIPE_OPTION,
    cuda_graph: bool = typer.Option(False, "--cuda-graph",
                                    help="TensorRT: capture the denoiser step in a CUDA graph per batch size and "
                                         "replay it every step."),
    json_out: str | None = json_option("settings, files and timings"),
) -> None:
    """Sample images: noise -> denoising loop -> (quantizer ->) decoder -> PNGs (a KL first stage has no quantizer).

    Class models take --class; text-to-image models take --prompt / --prompts-file (the text
    encoder runs once per distinct prompt, not per step; words it never saw in training are
    named in a warning, and prompts longer than the tokenizer's limit are cut, also with a warning).

    Writes one PNG per image (with PNG text chunks class or prompt, seed, steps, sampler, cfg_scale, backend,
    precision), a grid.png and samples.json into the output folder, and prints images/s.
    """
    from mmgen_deploy.sampling.generate import GenerateRequest

    request = GenerateRequest(classes=list(classes), prompts=list(prompts), n=n, batch_size=batch_size, steps=steps,
                              sampler=sampler, cfg_scale=cfg_scale, eta=eta, seed=seed, backend=backend,
                              precision=precision, device=device, threads=threads, cuda_graph=cuda_graph, out=out,
                              cache=cache)
    if recipe:
        run_dir, request = apply_recipe(ctx, run_dir, request)
    request.check()  # bad numbers are refused before any file or model is touched
    if prompts_file is not None:
        request.prompts = [*request.prompts, *read_prompts_file(prompts_file)]
    sidecar = run_generate(run_dir, request)
    emit_json(sidecar, json_out)


# The generate options a recipe sets (parameter name -> option).
RECIPE_SETS = {"backend": "--backend", "precision": "--precision", "device": "--device", "steps": "--steps",
               "sampler": "--sampler", "cfg_scale": "--cfg-scale", "eta": "--eta", "cache": "--cache",
               "batch_size": "--batch-size", "threads": "--threads"}


def apply_recipe(ctx: typer.Context, run_dir: Path, request: GenerateRequest) -> tuple[Path, GenerateRequest]:
    """The run that samples (the tuned run, or the distilled student the recipe chose) and `request` with the
    recipe's settings; an option the recipe sets given as well is refused."""
    import dataclasses

    from mmgen_deploy.tuning.recipe import load_recipe

    refuse_recipe_conflicts(ctx, RECIPE_SETS)
    chosen = load_recipe(run_dir)
    engine, settings = chosen.candidate.engine, chosen.candidate.settings
    console.print(f"recipe: {chosen.candidate.label()} ({chosen.path})")
    return chosen.model_dir, dataclasses.replace(
        request, backend=engine.backend, precision=engine.precision, device=engine.device,
        batch_size=engine.batch_size, steps=settings.steps, sampler=settings.sampler, cfg_scale=settings.cfg_scale,
        cache=settings.cache, threads=chosen.threads)


def run_generate(run_dir: RunLike, request: GenerateRequest) -> dict[str, Any]:
    """Generate with a progress bar and the backend, warning and timing lines; return the sidecar.
    What `mmgen generate` and the quickstart's generate stage print."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.sampling.generate import generate_to_folder

    run = RunDir.of(run_dir)
    noun = sample_noun(run.load_config())
    count = [0]

    def say_backend(choice: Any) -> None:
        console.print(f"backend: [bold]{choice.backend}[/] {choice.precision} on {choice.device} ({choice.reason})")
        for line in choice.skipped:
            console.print(f"  [dim]skipped {line}[/]")

    def warn(condition: Any) -> None:
        count[0] = len(condition)
        if condition.prompts:
            warn_about_prompts(condition.unknown_words, condition.truncated_prompts, run.load_config())

    columns = (TextColumn("{task.description}"), BarColumn(), count_column(), TimeRemainingColumn())
    # The run's writer lock (when the samples go inside it) before the progress bar and minutes of sampling.
    with run.writing_into(request.out, "write samples"), Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"sampling {noun}s", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, description=f"sampling {plural(count[0], noun)}", completed=done, total=total)

        generated = generate_to_folder(run, request, progress=advance, on_backend=say_backend,
                                    on_conditioning=warn)
    result, target = generated.result, generated.out
    timing = result.timing()
    console.print(f"{plural(len(result.images), noun)} in {result.total_seconds:.2f} s: "
                  f"[bold]{timing['images_per_second']:.2f} {noun}s/s[/] "
                  f"(model calls {result.model_seconds:.2f} s, loop overhead "
                  f"{100 * result.loop_overhead_fraction:.1f}% of the denoising loop)")
    console.print(f"denoising loop {result.denoise_seconds:.2f} s; cache {result.cache.describe()}")
    stdout_console.print(f"grid: {target / 'grid.png'}", soft_wrap=True)
    return generated.sidecar


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    from mmgen_deploy.errors import UsageError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {path} does not exist", "give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --prompts-file {path}: {exc}", "give a UTF-8 text file") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path} holds no prompts", "write one prompt per line")
    return prompts


def warn_about_prompts(unknown_words: Sequence[str], truncated_prompts: Sequence[str], config: Any) -> None:
    """One line each for words the model never saw and for prompts cut to the tokenizer's length
    (what the conditioning recorded while encoding the prompts: they are not encoded twice;
    `mmgen client` passes what the served model's tokenizer says)."""
    if unknown_words:
        console.print(f"[yellow]warning:[/] unknown word(s) the model never saw in training, ignored as [UNK]: "
                      f"{', '.join(unknown_words)}", highlight=False, soft_wrap=True)
    if truncated_prompts:
        room = config.text.max_length - 2
        named = ", ".join(repr(p if len(p) <= 40 else p[:37] + "...") for p in truncated_prompts)
        console.print(f"[yellow]warning:[/] {len(truncated_prompts)} prompt(s) longer than {room} words "
                      f"were cut to their first {room} words: {named}", highlight=False, soft_wrap=True)
