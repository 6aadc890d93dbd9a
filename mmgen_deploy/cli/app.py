"""The `mmgen` command: a thin Typer layer over the library.

Each command lives in its own module with a `register(app)` function; heavy imports
(torch, onnx, tensorrt) happen inside the commands so `mmgen --help` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from mmgen_deploy import __version__
from mmgen_deploy.cli import (
    batch,
    doctor,
    engines,
    evaluate,
    export,
    generate,
    importer,
    info,
    parity,
    quickstart,
    serve,
    train,
)
from mmgen_deploy.cli.common import console, install_log_handler, state
from mmgen_deploy.errors import MMGenError

app = typer.Typer(
    name="mmgen",
    help=(
        "Deploy a VQ-VAE + DiT latent generative model from PyTorch to FP16 TensorRT engines, "
        "proving at every step that the deployed model computes what PyTorch computes.\n\n"
        "Pipeline: train/import -> export (ONNX FP32, FP16) -> build-engine -> generate, "
        "with parity and bench at every arrow."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmgen-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    state.debug = debug or os.environ.get("MMGEN_DEBUG") == "1"


for _module in (doctor, info, train, quickstart, evaluate, export, engines, generate, batch, parity, importer, serve):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    state.debug = "--debug" in args or os.environ.get("MMGEN_DEBUG") == "1"
    install_log_handler()
    try:
        app(args=args, prog_name="mmgen")
    except MMGenError as exc:
        if state.debug:
            raise
        # escape(): messages hold things like `mmgen-deploy[fp16]` that rich would eat as markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # anything unexpected: still one line unless --debug
        if state.debug:
            raise
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))} "
                      "(run with --debug for a traceback)",
                      soft_wrap=True)
        sys.exit(1)
