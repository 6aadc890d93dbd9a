"""Shared CLI plumbing: consoles, the --debug state, JSON output."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console

# Human-readable output goes to stderr so that `--json -` style output on stdout stays clean.
console = Console(stderr=True, highlight=False)
# Tables to a pipe or a log file: rich would fall back to 80 columns and squeeze them unreadably.
stdout_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class _State:
    debug: bool = False


state = _State()


class _ConsoleHandler(logging.Handler):
    """The library's log lines (e.g. leftovers removed from a run directory) as `note:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        console.print(f"[yellow]note:[/] {escape(record.getMessage())}", soft_wrap=True)


def install_log_handler() -> None:
    """Show the library's warnings (logger `mmgen_deploy`) on the CLI console, once per process."""
    logger = logging.getLogger("mmgen_deploy")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler(logging.WARNING))
        logger.propagate = False


def split_list(values: list[str] | None) -> list[str]:
    """A repeatable option's values with comma lists split (`-c a,b -c d` = `-c a -c b -c d`), blanks dropped."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def json_option(what: str) -> Any:
    """The `--json FILE` option of a command that writes `what` as JSON (`-`: stdout, for pipes);
    one definition, so every command spells and explains it the same way (written by `emit_json`)."""
    return typer.Option(None, "--json", metavar="FILE", help=f"Write {what} as JSON to FILE ('-' = stdout).")


def emit_json(data: Any, destination: str | None) -> None:
    """Write `data` as JSON to a file, or to stdout when destination is "-"."""
    if destination is None:
        return
    text = json.dumps(data, indent=2, default=str)
    if destination == "-":
        sys.stdout.write(text + "\n")
    else:
        from mmgen_deploy.io_utils import atomic_path

        with atomic_path(destination) as tmp:
            tmp.write_text(text + "\n")


# The conditioning options, defined once so that `generate` and `client` (and any command that
# takes classes or prompts) spell and explain them the same way.
CLASS_OPTION = typer.Option(
    [], "--class", "-c",
    help="Class to sample, by name (\"red circle\") or id (3). Repeatable. Default: every class.")
PROMPT_OPTION = typer.Option(
    [], "--prompt", "-p",
    help="Text-to-image models: a prompt, e.g. \"a large blue triangle at the top\". Repeatable.")
PROMPTS_FILE_OPTION = typer.Option(
    None, "--prompts-file", help="Text-to-image models: a UTF-8 file with one prompt per line (blank lines "
                                 "skipped); adds to --prompt.")


# How a command that samples picks its backend and precision (`generate`, `batch`; `open_runner`
# resolves both), defined once so that both accept and explain the same values.
BACKEND_OPTION = typer.Option(
    "auto", "--backend",
    help="auto, torch, onnxruntime, openvino or tensorrt. auto picks the fastest available: TensorRT engines, "
         "then ONNX Runtime CUDA, then OpenVINO BF16 (CPU with AMX / AVX-512 BF16), then ONNX Runtime CPU.")
PRECISION_OPTION = typer.Option(
    None, "--precision",
    help="fp32, fp16, int8 or fp8: which exported ONNX set (or engine set) to run; bf16: the FP32 set in BF16 "
         "(openvino, torch autocast). Default: fp16 on GPUs, bf16 with OpenVINO on BF16 CPUs, else fp32.")
