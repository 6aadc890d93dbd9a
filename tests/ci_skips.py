"""Under `CI=true` a skipped test fails, unless it was skipped for what the machine is.

The dev install (`pip install -e ".[dev]"` plus `tensorrt-stubs`, as the Makefile does) provides every
optional part the suite uses: Triton, TensorRT-RTX, the TensorRT stubs, OpenVINO, diffusers, Ray Data,
nvidia-modelopt. On CI a test skipped for one of them hides a broken install, so it fails there.
What a CI machine may legitimately lack stays a skip: a GPU (tests marked `gpu`) and the CPU or
library facts listed in `MACHINE_SKIP_REASONS`. Both hooks are imported by `conftest.py`.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

# Skip reasons (substrings) that describe the machine, not a missing optional part of the install.
MACHINE_SKIP_REASONS = (
    "needs a CUDA device",  # conftest: a `gpu` test on a machine without one
    "this CPU has no AMX or AVX-512 BF16",  # BF16 paths need the CPU's BF16 units
    "on a machine without a GPU",  # a check of what a GPU-less machine prints, on a GPU machine
    "classic TensorRT is installed here",  # a check of what happens without it
    "environments with numpy 2",  # the numpy 1 stub directory only exists there
)


def running_on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def may_skip_on_ci(reason: str, keywords: Any = ()) -> bool:
    return "gpu" in keywords or any(allowed in reason for allowed in MACHINE_SKIP_REASONS)


def _fail_instead(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (f"CI=true and this was skipped ({reason}): the dev install provides every optional part "
                       "(pip install -e '.[dev]' and --no-deps tensorrt-stubs, as `make venv` does)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (running_on_ci() and report.skipped and not hasattr(report, "wasxfail")
            and not may_skip_on_ci(_skip_reason(report), item.keywords)):
        _fail_instead(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module skipped as a whole (`pytest.importorskip` at its top) fails collection instead."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if running_on_ci() and report.skipped and not may_skip_on_ci(_skip_reason(report), collector.keywords):
        _fail_instead(report)
