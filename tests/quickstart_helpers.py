"""Shared by the quickstart tests: a training stage whose DiT is worth a parity check.

Two training steps leave the EMA DiT next to adaLN-Zero: its output is ~0.003 of its input's
RMS, every backend matches it trivially, and `mmgen parity` refuses it. The tests keep their
2-step recipes (CI time) and give the still-(almost-)zero tensors random values after the DiT
stage, as the parity tests do for fresh models, so the later stages compare real outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Parameters of a 2-step DiT that have hardly left their zero initialisation (measured: their
# largest entry is < 2e-4; the xavier-initialised weights are ~0.1).
NEAR_ZERO = 1e-3


def rerandomize_near_zero_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> list[str]:
    """Redraw every parameter whose entries are all below NEAR_ZERO (what `rerandomize_` does for
    exact zeros); returns their names."""
    gen = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("pos_embed") or float(param.abs().max()) >= NEAR_ZERO:
                continue
            param.copy_(torch.randn(param.shape, generator=gen) * std)
            redrawn.append(name)
    return redrawn


def with_meaningful_dit(train_stage: Callable[[Any], str]) -> Callable[[Any], str]:
    """The quickstart's DiT stage, then the saved (EMA) DiT's near-zero tensors re-randomised."""

    def stage(ctx: Any) -> str:
        where = train_stage(ctx)
        dit = ctx.run.load_dit()
        redrawn = rerandomize_near_zero_(dit, seed=2)
        assert any("adaLN_modulation" in n for n in redrawn), redrawn  # the layers adaLN-Zero zeroed
        ctx.run.save_weights("dit", dit.eval())
        return where

    return stage


def fewer_generate_steps(monkeypatch: Any, steps: int = 4) -> None:
    """The quickstart's generate stage as written (its prompts or classes, batch, output folder),
    sampling `steps` DDIM steps instead of 50 (CI time; parity still runs its own 20-step check)."""
    import dataclasses

    from mmgen_deploy.cli import generate as generate_cli

    real_run_generate = generate_cli.run_generate

    def run_generate(run_dir: Any, request: Any) -> dict[str, Any]:
        return real_run_generate(run_dir, dataclasses.replace(request, steps=steps))

    monkeypatch.setattr(generate_cli, "run_generate", run_generate)
