"""The `mmgen` command: a thin Typer layer over the library.

Each command lives in its own module with a `register(app)` function; heavy imports
(torch, onnx, tensorrt) happen inside the commands so `mmgen --help` stays fast.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any

import typer
from rich.markup import escape

# Typer vendors Click; its exceptions are only importable from there.
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from mmgen_deploy import __version__
from mmgen_deploy.cli import (
    batch,
    distill,
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
    tune,
)
from mmgen_deploy.cli.common import (
    console,
    describe_error,
    hide_old_spellings,
    install_log_handler,
    old_spellings_in,
    state,
)
from mmgen_deploy.errors import MMGenError
from mmgen_deploy.runtime.backends import deployment_targets

app = typer.Typer(
    name="mmgen",
    help=(
        "Deploy a VQ or KL autoencoder + DiT latent generative model (class- or text-conditioned) "
        f"from PyTorch to {deployment_targets()}, proving at every step that the "
        "deployed model computes what PyTorch computes.\n\n"
        "Pipeline: train/import -> export (ONNX FP32, FP16, INT8, FP8) -> build-engine -> generate, "
        "with parity and bench at every arrow; serve and batch for many images."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Click's own help formatter (pip's convention): "--steps INTEGER  Sampling steps ..." with the
    # description wrapped beside the option, readable in an 80-column terminal (rich's boxed tables
    # squeezed descriptions into a 20-character column there).
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
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


for _module in (doctor, info, train, distill, quickstart, evaluate, export, engines, generate, batch, parity, importer,
                serve, tune):
    _module.register(app)


_TYPE_NAMES = {"int": "INTEGER", "str": "TEXT", "float": "FLOAT", "Path": "PATH", "bool": "BOOLEAN"}


def _type_name(annotation: str) -> str:
    """Typer's annotation label ("int", "list[str]", "Path") as Click names it (INTEGER, TEXT, PATH)."""
    if annotation.startswith("list[") and annotation.endswith("]"):
        annotation = annotation[5:-1]  # a repeatable option: each occurrence takes one value
    return _TYPE_NAMES.get(annotation, annotation.upper())


def _name_values(command: Any) -> Any:
    """Name every value as Click and pip do: arguments by their name (RUN_DIR), options by their
    type (TEXT, INTEGER, FLOAT, PATH), where a command did not name it itself (FILE, SPEC, ...).
    (Typer's own default reads `<int>`, `<list[str]>` and `{run_dir}`.)"""
    for param in command.params:
        if param.param_type_name == "argument":
            # Click lists an argument by its name alone ("RUN_DIR"), not "RUN_DIR <path>".
            param.display_type_rich = _no_type
            param.metavar = param.metavar or (param.name or "value").upper()
        else:
            hide_old_spellings(param)
            if param.metavar is None and not param.is_flag and not param.count:
                param.metavar = _type_name(param.bare_type())
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for sub in subcommands.values():
            _name_values(sub)
    else:
        command.collect_usage_pieces = functools.partial(_usage_pieces, command)
    return command


def _no_type(ctx: Any = None) -> None:
    return None


def _usage_pieces(command: Any, ctx: Any) -> list[str]:
    """Click's usage line, `mmgen parity [OPTIONS] RUN_DIR` (Typer writes `{run_dir}`)."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
    return pieces


def command() -> Any:
    """The `mmgen` Click command with its values named (what `main` runs)."""
    return _name_values(typer.main.get_command(app))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    state.debug = "--debug" in args or os.environ.get("MMGEN_DEBUG") == "1"
    install_log_handler()
    try:
        # standalone_mode=False: the parser's errors come here, to be said the way mmgen says its own.
        root = command()
        for old, new in old_spellings_in(root, args):
            console.print(f"[yellow]note:[/] {old} is now {new}; the old spelling still works for this release",
                          soft_wrap=True)
        exit_code = root.main(args=args, prog_name="mmgen", standalone_mode=False)
        sys.exit(exit_code if isinstance(exit_code, int) else 0)  # typer.Exit(code) comes back as its code
    except NoArgsIsHelpError as exc:  # `mmgen` or `mmgen train` alone: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except ClickException as exc:  # a mistyped option, a missing argument, a value of the wrong type
        if state.debug:
            raise
        where = getattr(exc, "ctx", None)
        hint = f" (see '{where.command_path} --help')" if where is not None else ""
        message = exc.format_message().rstrip(".")
        message = message[:1].lower() + message[1:]  # "No such option" -> "no such option", as mmgen's own
        console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("Aborted!")
        sys.exit(1)
    except MMGenError as exc:
        if state.debug:
            raise
        # escape(): messages hold things like `mmgen-deploy[fp16]` that rich would eat as markup.
        console.print(f"[bold red]error:[/] {escape(describe_error(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # anything unexpected: still one line unless --debug
        if state.debug:
            raise
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {exc.filename}" if exc.filename else ""
            console.print(f"[bold red]error:[/] no space left on device{escape(where)} (free space on that disk "
                          "or write elsewhere)", soft_wrap=True)
            sys.exit(1)
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))} "
                      "(run with --debug for a traceback)",
                      soft_wrap=True)
        sys.exit(1)
