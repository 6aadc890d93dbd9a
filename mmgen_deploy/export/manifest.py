"""Layout of `RUN_DIR/onnx/` and its manifest.

    RUN_DIR/onnx/manifest.json
    RUN_DIR/onnx/fp32/{encoder,quantizer,decoder,denoiser}.onnx
    RUN_DIR/onnx/fp16/{encoder,quantizer,decoder,denoiser}.onnx   (quantizer: FP32-typed graph)
    RUN_DIR/onnx/{int8,fp8}/<component>.onnx                      (Q/DQ graphs; quantizer: FP32 graph)
    RUN_DIR/onnx/{fp32,fp16}/text_encoder.onnx                    (text-to-image runs only)

The manifest's `components` lists the model's components (`component_names(config)`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import RunDirError
from mmgen_deploy.io_utils import read_json
from mmgen_deploy.rundir import ONNX_MANIFEST_NAME, RunDir, RunLike

MANIFEST_NAME = ONNX_MANIFEST_NAME
MANIFEST_FORMAT = "mmgen-onnx-export"
MANIFEST_VERSION = 1


def _root(run_dir: RunLike) -> Path:
    return RunDir.of(run_dir).root


# The layout itself is RunDir's; these keep the export package's names for it.
def onnx_dir(run_dir: RunLike) -> Path:
    return RunDir.of(run_dir).onnx_dir


def relative_onnx_path(precision: str, component: str) -> str:
    return RunDir.onnx_relpath(precision, component)


def onnx_path(run_dir: RunLike, precision: str, component: str) -> Path:
    """Where the exported graph of `component` at `precision` lives (it may not exist yet)."""
    return RunDir.of(run_dir).onnx_path(precision, component)


def manifest_path(run_dir: RunLike) -> Path:
    return RunDir.of(run_dir).onnx_manifest_path


def read_manifest(run_dir: RunLike) -> dict[str, Any]:
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
