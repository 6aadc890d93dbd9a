"""What the Triton tests share: finding a usable server, and starting `mmgen serve` as a
user would (its own process, Ctrl-C acting)."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _triton_missing_reason() -> str | None:
    from mmgen_deploy.errors import MMGenError
    from mmgen_deploy.serve.server import find_triton, prepare_stub_python

    try:
        install = find_triton()
        # The wheel's server needs a Python stub built for it: building one is the real test of it.
        if install.origin == "nvidia-pytriton":
            with tempfile.TemporaryDirectory() as scratch:
                prepare_stub_python(install, Path(scratch))
    except MMGenError as exc:
        return f"no usable Triton server: {exc}"
    return None


TRITON_MISSING = _triton_missing_reason()
needs_triton = pytest.mark.skipif(TRITON_MISSING is not None, reason=TRITON_MISSING or "")


def child_env() -> dict[str, str]:
    """The environment of a child `python -m mmgen_deploy`: this checkout first on its path."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def ctrl_c_acts() -> None:
    """preexec_fn: SIGINT back to its default in the child. A shell starts background commands with
    SIGINT ignored and Python keeps it so; the suite run that way (`.ci/run &`) had `mmgen serve`
    ignore the tests' Ctrl-C until it was killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


T = TypeVar("T")
# What a server says when another process took its port between `free_loopback_ports` and its bind.
PORT_TAKEN = "already in use"


def with_free_loopback_ports(count: int, start: Callable[[list[int]], T], attempts: int = 3) -> T:
    """`start(ports)` with `count` distinct free loopback ports; again with new ones when a port was
    taken meanwhile (`start` raised an error whose text says a port is already in use)."""
    from mmgen_deploy.serve.server import free_loopback_ports

    for attempt in range(attempts):
        try:
            return start(free_loopback_ports(count))
        except Exception as exc:
            if PORT_TAKEN not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def ask_a_served_repository(repository: Path, ask: Callable[[Any], T], statistics_of: str) -> tuple[T, dict[str, Any]]:
    """Start Triton on `repository` (free loopback ports), call `ask(client)` with a `GenerateClient`
    of it, and return what `ask` returned with the inference statistics of the model `statistics_of`."""
    from mmgen_deploy.serve.client import GenerateClient
    from mmgen_deploy.serve.server import running_server

    def start(ports: list[int]) -> tuple[T, dict[str, Any]]:
        with running_server(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=None,
                            python_paths=[REPO_ROOT]) as server:
            client = GenerateClient(server.http_url, timeout_s=120)
            try:
                return ask(client), dict(client.client.get_inference_statistics(statistics_of))
            finally:
                client.close()

    return with_free_loopback_ports(2, start)
