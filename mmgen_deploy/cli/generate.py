from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "generate", "Sample images on PyTorch, ONNX Runtime or TensorRT.", 5)
