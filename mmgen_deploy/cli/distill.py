"""`mmgen distill`: a few-step, guidance-free student of a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from mmgen_deploy.cli.common import TRAINING_SEED_OPTION, console, emit_json, json_option
from mmgen_deploy.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)


def _guidance_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--guidance-range {text!r} is not MIN:MAX", "e.g. --guidance-range 1:6") from None
    return low, high


def distill_cmd(
    teacher_dir: Path = typer.Argument(..., help="The teacher: a run directory with a trained DiT."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to create for the student."),
    steps: int = typer.Option(4, "--steps", help="The student's denoiser evaluations per image: 1, 2, 4 or 8."),
    guidance_range: str = typer.Option("1:6", "--guidance-range", metavar="MIN:MAX",
                                       help="Guidance scales the student learns (its --cfg-scale input); must "
                                            "hold the default scale."),
    trajectories: int | None = typer.Option(None, "--trajectories", show_default=False,
                                            help="Teacher samples the student learns from (drawn from noise: no "
                                                 "training images are read). Default: 4096."),
    train_steps: int | None = typer.Option(None, "--train-steps", show_default=False,
                                           help="Student optimisation steps. Default: 1500."),
    seed: int = TRAINING_SEED_OPTION,
    threads: int | None = typer.Option(None, "--threads",
                                       help="torch CPU threads (default: one per CPU this process may use; the "
                                            "count changes the result, so pass it for a repeatable student)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the student's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run directory that holds another model."),
    json_out: str | None = json_option("the results"),
) -> None:
    """Distill a trained run into a STEPS-step student that takes the guidance scale as an input: one
    denoiser evaluation per step instead of the teacher's [cond; uncond] pair, e.g. 4 evaluations
    per image instead of 50 x 2.

    The teacher samples from fresh noise on its own first stage (no training images), each sample at a
    guidance scale from --guidance-range; the student (the teacher's DiT plus a guidance embedding)
    learns to land, in each of its steps, where the teacher's several steps landed. The student is a
    normal run directory (same first stage; run.json records the teacher's weights hash, the method,
    the steps and the guidance range) that export, generate, parity, bench, serve and batch take as
    they are; generate uses its steps and sampler by default and refuses others. Checkpoints every
    250 steps in OUT/checkpoints (Ctrl-C keeps the last; continue with --resume)."""
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.training.common import set_threads
    from mmgen_deploy.training.distill import DistillSettings, distill_into

    low, high = _guidance_range(guidance_range)
    given = {"trajectories": trajectories, "train_steps": train_steps}
    settings = DistillSettings(steps=steps, guidance_min=low, guidance_max=high, seed=seed,
                               **{name: value for name, value in given.items() if value is not None})
    settings.check()
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    used = set_threads(threads)
    console.print(f"distilling on {used} CPU thread(s)")
    result = distill_into(out, RunDir(teacher_dir), settings, overwrite=overwrite, resume=resume)
    console.print(f"student: {out} ({steps} steps, guidance {low:g}..{high:g}) in {result['seconds']} s; "
                  f"report: {Path(out) / 'reports' / 'distill.json'}")
    emit_json(result, json_out)
