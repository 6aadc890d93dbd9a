"""ONNX export: every component to FP32 and mixed-precision FP16 graphs, validated against PyTorch.

Public API (other packages code against these names):
    export_run(run_dir, *, precisions, components, opset, overwrite, calibration, progress) -> manifest
    export_models(config, vq, dit, out_dir, ..., text_encoder=, tokenizer=)   in-memory models, no run directory
    onnx_path(run_dir, precision, component) -> Path
    read_manifest(run_dir) -> dict
"""

from __future__ import annotations

from mmgen_deploy.export.calibration import CalibrationData, CalibrationSource
from mmgen_deploy.export.exporter import ProgressCallback, export_models, export_run
from mmgen_deploy.export.manifest import manifest_path, onnx_path, read_manifest
from mmgen_deploy.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from mmgen_deploy.export.validate import ExportValidationError
from mmgen_deploy.specs import PRECISIONS  # re-exported: the one list lives in specs

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "PRECISIONS",
    "CalibrationData",
    "CalibrationSource",
    "ExportValidationError",
    "ProgressCallback",
    "export_models",
    "export_run",
    "manifest_path",
    "onnx_path",
    "read_manifest",
]
