from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "train", "Train the VQ-VAE and the DiT on built-in or user data.", 3)
    add_stub(app, "quickstart", "Train the tiny preset on `shapes`, then export, generate and check parity.", 3)
    add_stub(app, "eval", "Measure a run: reconstruction PSNR, codebook usage, conditional accuracy.", 3)
