from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "triton-repo", "Write a Triton Inference Server model repository for a run.", 10)
    add_stub(app, "serve", "Serve generation behind NVIDIA Triton Inference Server.", 10)
    add_stub(app, "client", "Request images from a running `mmgen serve`.", 10)
