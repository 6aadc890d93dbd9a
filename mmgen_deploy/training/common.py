"""Pieces shared by both training stages: checkpoints, RNG state, schedules, EMA, grids, progress."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgen_deploy.errors import MMGenError, RunDirError
from mmgen_deploy.io_utils import atomic_path

# Called after every optimisation step with (step, metrics); it may raise KeyboardInterrupt,
# which is how tests simulate Ctrl-C.
StepCallback = Callable[[int, dict[str, float]], None]


def default_threads() -> int:
    """One torch thread per CPU this process may run on: fixed for a machine, whatever its load.

    The thread count changes the order in which sums are taken, so the same seed trains different
    weights on one and two threads; a default read from the load average made results depend on
    what else was running. `--threads N` trades speed on a busy machine for the same count anywhere.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on every platform
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Set the number of torch threads (`threads`, or `default_threads()`) and return it; the
    training reports record it (`threads` in reports/train_*.json)."""
    threads = default_threads() if threads is None else threads
    torch.set_num_threads(threads)
    return threads


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final_fraction` of the base rate at `total` steps."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate to `lr` times the group's own `lr_scale` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buf, buf in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buf.copy_(buf)


def ema_decay_at(step: int, target: float) -> float:
    """EMA warm-up (as in many diffusion codebases): early weights are not averaged in for long."""
    return min(target, (1.0 + step) / (10.0 + step))


# -- checkpoints ------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: Ctrl-C or a crash mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a checkpoint cannot run code."""
    if not path.is_file():
        raise RunDirError(f"no checkpoint to resume from at {path}", "train without {resume} first",
                          params=["resume"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise RunDirError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}",
                          "delete it and train again without {resume}", params=["resume"]) from None
    if not isinstance(state, dict) or "step" not in state:
        raise RunDirError(f"{path} is not an mmgen training checkpoint", "delete it and train without {resume}",
                          params=["resume"])
    return state


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"global": torch.get_rng_state(), "batches": generator.get_state()}


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["global"])
    generator.set_state(state["batches"])


# -- progress ---------------------------------------------------------------------------

@contextmanager
def progress_bar(description: str, total: int, start: int, enabled: bool) -> Iterator[Callable[..., None]]:
    """Yield `advance(**fields)`; a rich bar on stderr with loss and speed when enabled."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    console = Console(stderr=True)
    if not console.is_terminal:
        # Logs and pipes get one plain line per 5% instead of a bar that only prints at the end.
        every = max(1, total // 20)
        state = {"step": start, "since": time.perf_counter(), "since_step": start}

        def log_line(**fields: float) -> None:
            state["step"] += 1
            if state["step"] % every and state["step"] != total:
                return
            now = time.perf_counter()
            speed = (state["step"] - state["since_step"]) / max(now - state["since"], 1e-9)
            state["since"], state["since_step"] = now, state["step"]
            info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
            console.print(f"{description} step {state['step']}/{total}  {info}  {speed:.2f} it/s", highlight=False)

        yield log_line
        return
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=start, info="")

        def advance(**fields: float) -> None:
            info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
            speed = progress.tasks[0].speed
            if speed:
                info += f"  {speed:.1f} it/s"
            progress.update(task, advance=1, info=info)

        yield advance


class TrainingInterrupted(MMGenError):
    """Ctrl-C during training: the last complete checkpoint is intact."""

    exit_code = 130


def interrupted(stage: str, checkpoint: Path, step: int | None) -> TrainingInterrupted:
    where = f"the last complete checkpoint (step {step}) is {checkpoint}" if step else "no checkpoint was written yet"
    return TrainingInterrupted(f"{stage} training interrupted; {where}",
                               "continue with the same command plus {resume}" if step else None, params=["resume"])
