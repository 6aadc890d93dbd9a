from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "import", "Turn diffusers / official DiT / taming VQ checkpoints into a run directory.", 8)
