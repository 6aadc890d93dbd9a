from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from mmgen_deploy.cli.common import emit_json, json_option, stdout_console

_STYLE = {"ok": "green", "warn": "yellow", "missing": "red"}


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        json_out: str | None = json_option("the report"),
    ) -> None:
        """Report Python, torch, ONNX, ONNX Runtime providers, the CPU's BF16 / AMX / VNNI units and the runtimes
        that use them (OpenVINO, torch autocast), TensorRT / TensorRT-RTX and CUDA devices."""
        from mmgen_deploy.doctor import as_dicts, collect

        checks = collect()
        if json_out == "-":
            emit_json(as_dicts(checks), "-")
            return
        table = Table(title="mmgen doctor", show_lines=False)
        for col in ("component", "status", "version", "detail"):
            table.add_column(col)
        for c in checks:
            # Details hold pip extras like 'mmgen-deploy[openvino]': not rich markup.
            table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.version), escape(c.detail))
        stdout_console.print(table)
        emit_json(as_dicts(checks), json_out)
