"""Type-check `mmgen_deploy/engines` and the TensorRT runner against the installed `tensorrt-stubs`.

The published stubs (10.13.0.35.1) are not usable by mypy as installed: `tensorrt/`
has no py.typed marker, and `tensorrt_bindings/tensorrt.pyi` has Python syntax errors
(a parameter named `in`, non-default parameters after defaulted ones) and imports the
absent `tensorrt_libs`. This script copies them to `.mypy_stubs/`, repairs exactly
those lines, and runs mypy with that directory on MYPYPATH.

    python tools/typecheck_engines.py            # exit status = mypy's
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".mypy_stubs"


def _site_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: {package} is not installed (pip install tensorrt-stubs)")
    return Path(next(iter(spec.submodule_search_locations)))


def _fix_signature(line: str) -> str:
    """Make one stub `def` line valid Python: rename `in`, drop defaults when a required parameter follows."""
    line = re.sub(r"([(,]\s*)in:", r"\1in_:", line)
    try:
        ast.parse(line.strip() + "\n    ...")
        return line
    except SyntaxError:
        return re.sub(r"\s*=\s*(None|\.\.\.|[\w.]+(\(\))?)(?=\s*[,)])", "", line)


def write_stubs() -> Path:
    stubs = _site_dir("tensorrt")
    bindings = _site_dir("tensorrt_bindings")
    for name, source in (("tensorrt", stubs), ("tensorrt_bindings", bindings)):
        target = OUT / name
        target.mkdir(parents=True, exist_ok=True)
        for pyi in source.glob("*.pyi"):
            lines = []
            for line in pyi.read_text().splitlines():
                if line.startswith("import tensorrt_libs"):
                    continue
                if line.lstrip().startswith("def "):
                    line = _fix_signature(line)
                lines.append(line)
            (target / pyi.name).write_text("\n".join(lines) + "\n")
    return OUT


def main() -> int:
    stub_dir = write_stubs()
    # The project's mypy settings, plus: do not report the stubs' own inconsistencies.
    config = stub_dir / "mypy.ini"
    config.write_text("[mypy]\npython_version = 3.10\nignore_missing_imports = True\n"
                      f"mypy_path = {stub_dir}\n\n"
                      "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n")
    env = dict(os.environ, MYPYPATH=str(stub_dir))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--follow-imports=silent",
           *(sys.argv[1:] or ["mmgen_deploy/engines", "mmgen_deploy/runtime/tensorrt_runner.py"])]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
