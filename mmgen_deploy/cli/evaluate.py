"""`mmgen eval RUN_DIR`: reconstruction, codebook use and conditional accuracy of a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mmgen_deploy.cli.common import (
    CACHE_OPTION,
    CFG_SCALE_OPTION,
    STEPS_OPTION,
    THREADS_OPTION,
    console,
    emit_json,
    json_option,
    positive,
    sampling_seed_option,
    stdout_console,
)
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.runtime.backends import backend_list, precision_help

if TYPE_CHECKING:
    from mmgen_deploy.evaluation.evaluate import EvalSettings
    from mmgen_deploy.rundir import RunDir


def eval_settings(per_class: int, steps: int | None, cfg_scale: float | None, seed: int, generate: bool,
                  backend: str, precision: str, num_prompts: int = 200, threads: int | None = None,
                  cache: str = SAMPLING.cache) -> Any:
    from mmgen_deploy.defaults import SAMPLING
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.evaluation.evaluate import EvalSettings
    from mmgen_deploy.sampling.loop import check_sampling_numbers

    positive("number of samples per class", per_class)
    positive("number of prompts", num_prompts)
    for option, value in (("--samples-per-class", per_class), ("--num-prompts", num_prompts)):
        if value > SAMPLING.max_generate_images:
            raise UsageError(f"{option} must be at most {SAMPLING.max_generate_images}, got {value}",
                             "eval keeps every generated image in memory")
    check_sampling_numbers(steps=SAMPLING.steps if steps is None else steps, sampler=SAMPLING.sampler,
                           cfg_scale=SAMPLING.cfg_scale if cfg_scale is None else cfg_scale, batch_size=1,
                           seed=seed)
    return EvalSettings(samples_per_class=per_class, steps=steps, cfg_scale=cfg_scale, seed=seed,
                        generate=generate, backend=backend, precision=precision, num_prompts=num_prompts,
                        threads=threads, cache=cache)


def run_eval(run: RunDir, settings: EvalSettings) -> dict[str, Any]:
    """`evaluate_run` (which writes the report) with the summary lines `mmgen eval` and the quickstart print."""
    from mmgen_deploy.evaluation.evaluate import evaluate_run

    run.check_entries()  # the report goes into reports/: refuse a linked one before the work, not after
    with console.status("evaluating"):
        report = evaluate_run(run, settings)
    if "vqvae" in report:
        vq = report["vqvae"]
        console.print(f"VQ-VAE on {vq['num_images']} validation images: PSNR [bold]{vq['psnr_db']:.2f} dB[/] "
                      f"(min {vq['psnr_db_min']:.1f}), codebook {vq['codes_used']}/{vq['codebook_size']} in use "
                      f"({100 * vq['codebook_usage']:.0f}%), perplexity {vq['perplexity']:.1f}")
    else:
        kl = report["vae"]
        console.print(f"KL autoencoder on {kl['num_images']} validation images: PSNR [bold]{kl['psnr_db']:.2f} dB[/] "
                      f"(min {kl['psnr_db_min']:.1f})")
    gen = report.get("generation")
    if gen and "backend_reason" in gen:
        console.print(f"backend: {gen['backend']} {gen['precision']} on {gen['device']} ({gen['backend_reason']})")
    if gen and "position_accuracy" in gen:
        console.print(f"generation ({gen['backend']} {gen['precision']}, {gen['sampler']} {gen['steps']} steps, "
                      f"guidance {gen['cfg_scale']}, "
                      f"{gen['num_samples']} prompts from {gen['prompts_from']}): colour [bold]"
                      f"{100 * gen['colour_accuracy']:.1f}%[/], shape [bold]{100 * gen['shape_accuracy']:.1f}%[/], "
                      f"size [bold]{100 * gen['size_accuracy']:.1f}%[/], position [bold]"
                      f"{100 * gen['position_accuracy']:.1f}%[/], all four {100 * gen['accuracy']:.1f}%; "
                      f"grid in {gen['grid']}")
    elif gen and "waveform_accuracy" in gen:
        real = gen["judge_on_real_clips"]
        console.print(f"generation ({gen['backend']} {gen['precision']}, {gen['sampler']} {gen['steps']} steps, "
                      f"guidance {gen['cfg_scale']}, {gen['num_samples']} clips): requested waveform AND contour "
                      f"in [bold]{100 * gen['accuracy']:.1f}%[/] (waveform {100 * gen['waveform_accuracy']:.1f}%, "
                      f"contour {100 * gen['contour_accuracy']:.1f}%; the judge is right on "
                      f"{100 * real['accuracy']:.1f}% of {real['num_samples']} real clips); spectrograms in "
                      f"{gen['grid']}")
    elif gen and "accuracy" in gen:
        console.print(f"generation ({gen['backend']} {gen['precision']}, {gen['sampler']} {gen['steps']} steps, "
                      f"guidance {gen['cfg_scale']}, "
                      f"{gen['num_samples']} samples): requested colour AND shape in [bold]"
                      f"{100 * gen['accuracy']:.1f}%[/] (colour {100 * gen['colour_accuracy']:.1f}%, shape "
                      f"{100 * gen['shape_accuracy']:.1f}%); grid in {gen['grid']}")
    elif gen:
        console.print(f"generation: {gen['skipped']}")
    if gen and "cache" in gen:
        from mmgen_deploy.sampling.cache import CacheStats

        console.print(f"denoising loops {gen['denoise_seconds']:.1f} s; cache "
                      f"{CacheStats.from_dict(gen['cache']).describe()}")
    return report


def eval_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory to measure."),
    samples_per_class: int = typer.Option(10, "--samples-per-class", help="Generated images per class."),
    num_prompts: int = typer.Option(200, "--num-prompts",
                                    help="Text-to-image runs: prompts drawn from the held-out attribute "
                                         "combinations (one image each)."),
    steps: int | None = STEPS_OPTION,
    cfg_scale: float | None = CFG_SCALE_OPTION,
    seed: int = sampling_seed_option(),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Also generate and judge images."),
    backend: str = typer.Option("torch", "--backend",
                                help=f"Sampling backend: {backend_list(with_auto=True)} (as in `mmgen generate`)."),
    precision: str = typer.Option("fp32", "--precision",
                                  help=f"{precision_help(backend_default=False)} As in `mmgen generate`."),
    threads: int | None = THREADS_OPTION,
    cache: str = CACHE_OPTION,
    json_out: str | None = json_option("the results"),
) -> None:
    """Measure a run: VQ reconstruction PSNR and codebook usage on the validation split and, on
    `shapes`, how often generated images show the requested colour and shape (judged by a checker
    that reads pixels). For a text-to-image run: --num-prompts prompts from the attribute combinations
    held out of training, and the accuracy of colour, shape, size and position separately and
    together. Writes RUN_DIR/reports/eval-BACKEND-PRECISION.json, with the settings that differ from the
    defaults added to the name (eval-torch-fp32-samples2.json; eval-no-generate.json with --no-generate),
    so a smaller evaluation never replaces a larger one."""
    from mmgen_deploy.evaluation.evaluate import eval_report_path
    from mmgen_deploy.rundir import RunDir

    run = RunDir(run_dir)
    settings = eval_settings(samples_per_class, steps, cfg_scale, seed, generate, backend, precision,
                             num_prompts, threads, cache)
    report = run_eval(run, settings)
    if json_out == "-":
        emit_json(report, "-")
    else:
        emit_json(report, json_out)
        stdout_console.print(f"report: {eval_report_path(run, settings)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
