"""Layout of `RUN_DIR/onnx/` and its manifest.

    RUN_DIR/onnx/manifest.json
    RUN_DIR/onnx/fp32/{encoder,quantizer,decoder,denoiser}.onnx
    RUN_DIR/onnx/fp16/{encoder,quantizer,decoder,denoiser}.onnx   (quantizer: FP32-typed graph)
    RUN_DIR/onnx/{fp32,fp16}/text_encoder.onnx                    (text-to-image runs only)

The manifest's `components` lists the model's components (`component_names(config)`).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import RunDirError
from mmgen_deploy.io_utils import read_json
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.specs import PRECISIONS

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmgen-onnx-export"
MANIFEST_VERSION = 1


def _root(run_dir: str | os.PathLike[str] | RunDir) -> Path:
    return run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)


def onnx_dir(run_dir: str | os.PathLike[str] | RunDir) -> Path:
    return _root(run_dir) / "onnx"


def relative_onnx_path(precision: str, component: str) -> str:
    return f"{precision}/{component}.onnx"


def onnx_path(run_dir: str | os.PathLike[str] | RunDir, precision: str, component: str) -> Path:
    """Where the exported graph of `component` at `precision` lives (it may not exist yet)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return onnx_dir(run_dir) / relative_onnx_path(precision, component)


def manifest_path(run_dir: str | os.PathLike[str] | RunDir) -> Path:
    return onnx_dir(run_dir) / MANIFEST_NAME


def read_manifest(run_dir: str | os.PathLike[str] | RunDir) -> dict[str, Any]:
    """The export manifest of a run; RunDirError when there is none or it is damaged."""
    path = manifest_path(run_dir)
    if not path.is_file():
        raise RunDirError(f"{_root(run_dir)} has no ONNX export ({path} is missing)",
                          f"run `mmgen export {_root(run_dir)}` first")
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable: {exc}",
                          f"re-export with `mmgen export {_root(run_dir)} --overwrite`") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise RunDirError(f"{path} is not an mmgen export manifest",
                          f"re-export with `mmgen export {_root(run_dir)} --overwrite`")
    if data.get("format_version", 0) > MANIFEST_VERSION:
        raise RunDirError(f"{path} was written by a newer mmgen-deploy", "upgrade mmgen-deploy")
    return data


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    from mmgen_deploy import __version__

    versions = {"mmgen-deploy": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "nvidia-modelopt", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
