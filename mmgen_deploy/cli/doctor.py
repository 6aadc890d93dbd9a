from __future__ import annotations

import typer
from rich import box
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
        # The version and the detail share a column (the detail on its own line), so that the
        # long details (paths, CPU flags, providers) fit an 80-column terminal whole.
        table = Table(title="mmgen doctor", box=box.SIMPLE_HEAD)
        table.add_column("component", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("version / detail", overflow="fold")
        for c in checks:
            # Details hold pip extras like 'mmgen-deploy[openvino]': not rich markup.
            version = "" if c.version in ("", "-") else escape(c.version)
            detail = f"[dim]{escape(c.detail)}[/]" if c.detail else ""
            table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", "\n".join(p for p in (version, detail) if p)
                          or "-")
        stdout_console.print(table)
        emit_json(as_dicts(checks), json_out)
