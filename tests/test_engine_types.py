"""The engine build path type-checked against classic TensorRT's stubs (no TensorRT library needed).

The CPU machine has TensorRT-RTX only, so classic TensorRT's API is checked statically: mypy
with `tensorrt-stubs`, as `tools/typecheck_engines.py` runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stubs_missing() -> str | None:
    import importlib.util

    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return f"{name} stubs are not installed (pip install --no-deps tensorrt-stubs)"
        if not any(Path(p, "tensorrt.pyi").is_file() or Path(p, "__init__.pyi").is_file()
                   for p in spec.submodule_search_locations):
            return f"{name} here is not the tensorrt-stubs package"
    return None


def test_classic_build_calls_type_check_against_the_tensorrt_stubs() -> None:
    """mypy over the build path against classic TensorRT's published stubs (`tools/typecheck_engines.py`):
    each call on a builder, network, parser, builder config or timing cache (the classic-only timing-cache
    calls included) must name a method of TensorRT's API with arguments of the right names and types.
    Lookups through `Flavour.trt` (enums such as BuilderFlag) are untyped and not checked here."""
    missing = _stubs_missing()
    if missing:
        pytest.skip(missing)
    result = subprocess.run([sys.executable, "tools/typecheck_engines.py", "--follow-imports=skip",
                             "mmgen_deploy/engines/flavour.py", "mmgen_deploy/engines/builder.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues found in 2 source files" in result.stdout
