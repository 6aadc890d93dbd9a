"""The INT8 / FP8 sets inside `mmgen export`: calibration plan, per-component precision, records.

`export_models` calls `quant_plan` once (calibration data along the trajectory for every
component) and `export_quantized` per component and 8-bit precision. A component ships at the
precision the spec (or `--component-precision`) chooses for that set: quantized, or FP16 / FP32
where quantizing does not pay or is unsafe (the quantizer always FP32). The manifest entry
records that choice, the quantizer's name, version and arguments, the calibration, and what
stayed in high precision; runners, engines and parity read it from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy import onnx_files
from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import UsageError
from mmgen_deploy.export.calibration import (
    CalibrationData,
    CalibrationSource,
    FirstStageCache,
    dataset_calibration,
    load_calibration,
)
from mmgen_deploy.export.manifest import relative_onnx_path
from mmgen_deploy.export.onnx_export import file_opset, file_size
from mmgen_deploy.export.quantize import QuantSettings, quantize_component, trajectory_calibration
from mmgen_deploy.export.validate import InputSet, OutputCheck, summarize, validate_graph
from mmgen_deploy.onnx_files import onnx_sha256
from mmgen_deploy.specs import ComponentSpec

if TYPE_CHECKING:
    from torch import nn

    from mmgen_deploy.text.tokenizer import WordTokenizer

__all__ = ["QuantPlan", "QuantSettings", "export_quantized", "quant_plan", "quantization_data"]


@dataclass
class QuantPlan:
    settings: QuantSettings
    inputs: dict[str, dict[str, np.ndarray]]
    description: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"settings": self.settings.recorded(), **self.description}


def quantization_data(calibration: CalibrationSource, meta: dict[str, Any], config: ModelConfig,
                      settings: QuantSettings) -> CalibrationData:
    """Images for the 8-bit calibration: the given `--calibration` file, else the run's validation
    split (3x `settings.images` are read so that a round-robin pick covers every class)."""
    if calibration is not None:
        data = load_calibration(calibration, config, limit=1 << 30)
        assert data is not None
        return data
    data, why = dataset_calibration(meta, count=3 * settings.images)
    if data is None:
        raise UsageError(f"INT8/FP8 calibration needs real images and {why}",
                         "pass {calibration} FILE.npz with `images` (and `labels` / `captions`)",
                         params=["calibration"])
    loaded = load_calibration(data, config, limit=1 << 30)
    assert loaded is not None
    return loaded


def quant_plan(quantized: list[str], settings: QuantSettings | None, data: CalibrationData | None,
               config: ModelConfig, modules: dict[str, nn.Module], tokenizer: WordTokenizer | None,
               why_no_data: str, progress: Callable[[str], None] | None = None,
               cache: FirstStageCache | None = None) -> QuantPlan | None:
    """The calibration inputs of every component, or None when no 8-bit set is asked for."""
    if not quantized:
        return None
    if data is None:
        raise UsageError(f"INT8/FP8 calibration needs real images ({why_no_data})",
                         "pass {calibration} FILE.npz with `images` (and `labels` / `captions`)",
                         params=["calibration"])
    settings = settings or QuantSettings()
    inputs, description = trajectory_calibration(data, config, modules, settings, tokenizer=tokenizer,
                                                 progress=progress, cache=cache)
    return QuantPlan(settings, inputs, description)


def _kept_by(settings: QuantSettings, spec: ComponentSpec) -> str:
    """Who kept a component of an 8-bit set unquantized, as its manifest record says: the user's setting
    (`QuantSettings.component_precisions`) or the spec."""
    return "component_precisions" if spec.name in settings.component_precisions else "spec.shipped_precision"


def export_quantized(plan: QuantPlan, precision: str, spec: ComponentSpec, module: nn.Module, fp32_file: Path,
                     out: Path, input_sets: list[InputSet], real: dict[str, np.ndarray],
                     step: Callable[[str], None], fp32_checks: list[OutputCheck] | None = None,
                     *, batch_limit: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Write and validate `out/<precision>/<component>.onnx`; return its manifest entry. A component
    shipped as its FP32 graph reuses that graph's validation (`fp32_checks`, same file, same inputs).
    `threads`: ONNX Runtime's, for the FP16 range analysis and the validation (ModelOpt's calibration
    session picks its own)."""
    shipped = plan.settings.shipped_precision(spec, precision)
    target = out / precision / f"{spec.name}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if shipped == precision:
        step(f"{spec.name}: quantizing to {precision.upper()} ({plan.settings.method} calibration)")
        record = quantize_component(fp32_file, spec, target, precision, plan.inputs[spec.name], plan.settings,
                                    batch_limit=batch_limit, threads=threads)
    elif shipped == "fp16":
        from mmgen_deploy.export.fp16 import convert_fp16

        step(f"{spec.name}: kept FP16 in the {precision} set")
        converted = convert_fp16(fp32_file, spec, target, real, threads=threads)
        record = {"name": f"none (component kept FP16: {_kept_by(plan.settings, spec)})", "fp16_converter": converted,
                  "qdq_pairs": 0, "quantized_nodes": 0}
    else:
        step(f"{spec.name}: kept FP32 in the {precision} set")
        onnx_files.copy_onnx(fp32_file, target)
        reason = "spec.keep_fp32, distances decide code indices" if spec.keep_fp32 else _kept_by(plan.settings, spec)
        record = {"name": f"none (component kept FP32: {reason})", "qdq_pairs": 0, "quantized_nodes": 0}
    seconds = time.perf_counter() - started
    step(f"{spec.name}: validating {precision} against PyTorch FP32")
    if shipped == "fp32" and fp32_checks is not None:
        checks = fp32_checks
    else:
        checks = validate_graph(target, module, spec, shipped, input_sets, threads=threads)
    return {
        "path": relative_onnx_path(precision, spec.name), "sha256": onnx_sha256(target), "bytes": file_size(target),
        "precision": precision, "component_precision": shipped, "opset": file_opset(target), **spec.interface_record(),
        "keep_fp32": spec.keep_fp32, "quantization": record, "convert_seconds": round(seconds, 3),
        # Self-contained: a later export of other precisions replaces the manifest's top-level record.
        "calibration": {"source": plan.description.get("source"), "settings": plan.settings.recorded(),
                        **(plan.description.get(spec.name) or {})},
        "validation": summarize(checks),
    }
