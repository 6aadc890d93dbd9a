from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "export", "Export every component to ONNX (FP32 and mixed-precision FP16), validated.", 4)
