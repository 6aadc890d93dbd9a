"""`mmgen generate`: sample images on PyTorch, ONNX Runtime or TensorRT."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from mmgen_deploy.cli.common import console, emit_json, stdout_console


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    run_dir: Path = typer.Argument(..., help="Run directory (from `mmgen train`, `quickstart` or `import`)."),
    classes: list[str] = typer.Option(
        [], "--class", "-c",
        help="Class to sample, by name (\"red circle\") or id (3). Repeatable. Default: every class."),
    prompts: list[str] = typer.Option(
        [], "--prompt", "-p",
        help="Text-to-image models: a prompt, e.g. \"a large blue triangle at the top\". Repeatable."),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="Text-to-image models: a UTF-8 file with one prompt per line (blank lines "
                                     "skipped); adds to --prompt."),
    n: int = typer.Option(4, "--n", "-n", help="Images per class or prompt (18 classes with --n 10 give 180 "
                                               "images)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b",
                                   help="Images per denoiser call (guidance doubles the model batch)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps (respaced from the training schedule)."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim, ddpm or dpmpp-2m (DPM-Solver++ 2M)."),
    cfg_scale: float = typer.Option(4.0, "--cfg-scale",
                                    help="Classifier-free guidance scale; 1 disables guidance, 0 is unconditional."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM noise (0 = deterministic, 1 = DDPM-like)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the NumPy noise: same seed, same noise on every backend."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Output folder (default RUN_DIR/samples/<backend>-<precision>-<sampler>-"
                                         "<steps>steps-seed<seed>). A previous `generate` folder is replaced."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto, torch, onnxruntime, openvino or tensorrt. auto picks the fastest "
                                     "available: TensorRT engines, then ONNX Runtime CUDA, then OpenVINO BF16 (CPU "
                                     "with AMX / AVX-512 BF16), then ONNX Runtime CPU."),
    precision: str | None = typer.Option(None, "--precision",
                                         help="fp32 or fp16: which exported ONNX set to run; bf16: the FP32 "
                                              "set in BF16 (openvino, torch autocast). Default: fp16 on GPUs, bf16 "
                                              "with OpenVINO on BF16 CPUs, else fp32."),
    device: str | None = typer.Option(None, "--device",
                                      help="cpu or cuda; OpenVINO: cpu, gpu or npu (default: what the backend "
                                           "prefers)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for ONNX Runtime / OpenVINO / torch."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph",
                                    help="TensorRT: capture the denoiser step in a CUDA graph per batch size and "
                                         "replay it every step."),
    json_out: str | None = typer.Option(None, "--json",
                                        help="Write settings, files and timings as JSON ('-' = stdout)."),
) -> None:
    """Sample images: noise -> denoising loop -> quantizer -> decoder -> PNGs.

    Class models take --class; text-to-image models take --prompt / --prompts-file (the text
    encoder runs once per distinct prompt, not per step; words it never saw in training are
    named in a warning, and prompts longer than the tokenizer's limit are cut, also with a warning).

    Writes one PNG per image (with PNG text chunks class or prompt, seed, steps, sampler, cfg_scale, backend,
    precision), a grid.png and samples.json into the output folder, and prints images/s.
    """
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.sampling.schedulers import SAMPLERS

    # Refuse bad numbers before touching any file or model.
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be >= 0, got {cfg_scale}", "1 disables guidance; 4.0 is DiT's choice")
    if eta < 0:
        raise UsageError(f"--eta must be >= 0, got {eta}")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler {sampler!r}", f"choose one of: {', '.join(SAMPLERS)}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")

    from mmgen_deploy.io_utils import atomic_dir, write_json
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample, text_conditioning
    from mmgen_deploy.sampling.loop import validate_sampling_args
    from mmgen_deploy.sampling.pipeline import resolve_class, write_samples

    run = RunDir(run_dir)
    config = run.load_config()
    all_prompts = [*prompts, *(_read_prompts_file(prompts_file) if prompts_file is not None else [])]
    per_image: list[int] | None = None
    per_prompt: list[str] = []
    tokenizer = None
    if config.uses_text:
        if classes:
            raise UsageError("this model is conditioned on text: it takes prompts, not --class",
                             'use --prompt "a large blue triangle at the top" (or --prompts-file FILE)')
        if not all_prompts:
            raise UsageError("this text-to-image model needs prompts",
                             'pass --prompt "a large blue triangle at the top" (repeatable) or --prompts-file FILE')
        tokenizer = run.load_tokenizer()
        _warn_about_prompts(tokenizer, all_prompts)
        per_prompt = [p for p in all_prompts for _ in range(n)]
    else:
        if all_prompts:
            raise UsageError("this model is class-conditioned: it takes --class, not prompts",
                             "see `mmgen info RUN_DIR` for the class names")
        class_ids = [resolve_class(config, c) for c in classes] if classes else list(range(config.dit.num_classes))
        per_image = [c for c in class_ids for _ in range(n)]
    validate_sampling_args(config, per_image, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           batch_size=batch_size, eta=eta)
    count = len(per_prompt) if config.uses_text else len(per_image or [])
    if out is not None:
        _check_output_dir(out)

    runner, choice = open_runner(run, backend, precision, device=device, threads=threads,
                                 **({"cuda_graph": True} if cuda_graph else {}))
    # Named after the backend that actually runs (with auto, a TensorRT load failure falls back).
    target = out or run.samples_dir / f"{choice.backend}-{choice.precision}-{sampler}-{steps}steps-seed{seed}"
    try:
        _check_output_dir(target)
    except BaseException:
        runner.close()
        raise
    console.print(f"backend: [bold]{choice.backend}[/] {choice.precision} on {choice.device} ({choice.reason})")
    for line in choice.skipped:
        console.print(f"  [dim]skipped {line}[/]")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"sampling {count} images", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            condition: Any = per_image
            if tokenizer is not None:
                condition = text_conditioning(runner, config, tokenizer, per_prompt)
            result = sample(runner, config, condition, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                            seed=seed, batch_size=batch_size, eta=eta, progress=advance)
    finally:
        runner.close()

    with atomic_dir(target) as tmp:
        sidecar = write_samples(result, config, tmp, images_per_class=n,
                                extra={"run_dir": str(run.root), "backend_choice": choice.describe(),
                                       "skipped_backends": choice.skipped})
        write_json(tmp / "samples.json", sidecar)
    timing = result.timing()
    console.print(f"{count} images in {result.total_seconds:.2f} s: "
                  f"[bold]{timing['images_per_second']:.2f} images/s[/] "
                  f"(model calls {result.model_seconds:.2f} s, loop overhead "
                  f"{100 * result.loop_overhead_fraction:.1f}% of the denoising loop)")
    stdout_console.print(f"grid: {target / 'grid.png'}", soft_wrap=True)
    sidecar["out"] = str(target)
    emit_json(sidecar, json_out)


def _check_output_dir(target: Path) -> None:
    """Replace only folders that `generate` wrote; never swallow someone's other files."""
    from mmgen_deploy.errors import UsageError

    if target.is_file():
        raise UsageError(f"--out {target} is a file", "give a folder path")
    if target.is_dir() and any(target.iterdir()) and not (target / "samples.json").is_file():
        raise UsageError(f"--out {target} exists and was not written by `mmgen generate`",
                         "choose another --out folder (generate replaces only its own output folders)")


def _read_prompts_file(path: Path) -> list[str]:
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


def _warn_about_prompts(tokenizer: Any, prompts: list[str]) -> None:
    """One line each for words the model never saw and for prompts cut to the tokenizer's length."""
    distinct = list(dict.fromkeys(prompts))
    encoding = tokenizer.encode(distinct)
    if encoding.unknown_words:
        console.print(f"[yellow]warning:[/] unknown word(s) the model never saw in training, ignored as [UNK]: "
                      f"{', '.join(encoding.unknown_words)}", highlight=False, soft_wrap=True)
    if encoding.truncated:
        room = tokenizer.max_length - 2
        named = ", ".join(repr(distinct[i] if len(distinct[i]) <= 40 else distinct[i][:37] + "...")
                          for i in encoding.truncated)
        console.print(f"[yellow]warning:[/] {len(encoding.truncated)} prompt(s) longer than {room} words were cut "
                      f"to their first {room} words: {named}", highlight=False, soft_wrap=True)
