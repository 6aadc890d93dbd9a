from __future__ import annotations

import typer

from mmgen_deploy.cli.common import add_stub


def register(app: typer.Typer) -> None:
    add_stub(app, "parity", "Compare a backend with PyTorch FP32, component by component and end to end.", 7)
    add_stub(app, "bench", "Latency and throughput of each backend and precision, side by side.", 7)
