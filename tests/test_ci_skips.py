"""`CI=true` turns skips for a missing optional part into failures; skips for the machine stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER_TESTS = {
    "conftest.py": """
        import pytest
        from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401


        def pytest_collection_modifyitems(config, items):
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is visible to torch"))
    """,
    "test_parts.py": """
        import pytest


        def test_missing_part():
            pytest.skip("no usable Triton server: tritonserver not found")


        @pytest.mark.skipif(True, reason="tensorrt-rtx-cu13 is not installed (dev extra)")
        def test_missing_part_by_mark():
            pass


        @pytest.mark.gpu
        def test_needs_a_gpu():
            pass


        @pytest.mark.skipif(True, reason="this CPU has no AMX or AVX-512 BF16")
        def test_needs_bf16_units():
            pass


        @pytest.mark.xfail(reason="known", strict=False)
        def test_expected_failure():
            raise AssertionError


        def test_runs():
            pass
    """,
    "test_whole_module.py": """
        import pytest

        pytest.importorskip("a_module_nobody_installed", reason="a_module_nobody_installed is not installed")


        def test_never_collected():
            pass
    """,
}


def _inner_pytest(tmp_path: Path, ci: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    for name, text in INNER_TESTS.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "-o", "markers=gpu", "--rootdir", str(tmp_path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_without_ci_every_skip_stays_a_skip(tmp_path: Path) -> None:
    result = _inner_pytest(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 5 skipped, 1 xfailed" in result.stdout, result.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_on_ci_a_missing_part_fails_and_a_missing_gpu_is_skipped(tmp_path: Path, ci: str) -> None:
    result = _inner_pytest(tmp_path, ci, "test_parts.py")
    assert result.returncode == 1, result.stdout + result.stderr
    # A skip in the test body fails it; a skip mark (acting in setup) makes it an error: both fail the run.
    failed = {line.split("::")[1].split()[0] for line in result.stdout.splitlines()
              if line.startswith(("FAILED", "ERROR"))}
    assert failed == {"test_missing_part", "test_missing_part_by_mark"}, result.stdout
    assert "1 failed, 1 passed, 2 skipped, 1 xfailed, 1 error" in result.stdout, result.stdout
    assert "CI=true and this was skipped (Skipped: no usable Triton server" in result.stdout


def test_on_ci_a_module_skipped_for_a_missing_import_fails_collection(tmp_path: Path) -> None:
    result = _inner_pytest(tmp_path, "true", "test_whole_module.py")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "a_module_nobody_installed is not installed" in result.stdout and "CI=true" in result.stdout
    assert "error" in result.stdout.lower()
