from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "build-engine", "Build FP16 TensorRT / TensorRT-RTX engines with a manifest.", 6)
