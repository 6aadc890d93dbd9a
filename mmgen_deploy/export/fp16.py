"""FP32 ONNX -> mixed-precision FP16 ONNX with NVIDIA ModelOpt AutoCast.

TensorRT 11 and TensorRT-RTX build strongly typed networks only, so precision must be
in the graph. AutoCast runs the FP32 graph in ONNX Runtime on calibration data and keeps
a node FP32 when a value it reads or writes exceeds `data_max` (so it would overflow or
lose too much in FP16) or one of its weights exceeds `init_max`; on top of that, nodes
matching the spec's FP32 scopes / op types are forced FP32. I/O types stay FP32.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmgen_deploy.errors import NotAvailableError
from mmgen_deploy.export.onnx_export import check_model, save_model, scope_regex
from mmgen_deploy.specs import ComponentSpec

DATA_MAX = 512.0  # AutoCast's default: FP16 keeps ~3 significant digits; 65504 is the hard limit
INIT_MAX = 65504.0  # largest finite FP16


def _autocast() -> Any:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise NotAvailableError(f"FP16 export needs NVIDIA ModelOpt AutoCast ({exc})",
                                "pip install 'mmgen-deploy[fp16]', or export with --precision fp32") from None
    return convert_to_mixed_precision


def converter_version() -> str:
    try:
        import modelopt

        return str(modelopt.__version__)
    except ImportError:
        return "not installed"


def converter_arguments(spec: ComponentSpec) -> dict[str, Any]:
    return {
        "low_precision_type": "fp16",
        "keep_io_types": True,
        "data_max": DATA_MAX,
        "init_max": INIT_MAX,
        "nodes_to_exclude": [scope_regex(s) for s in spec.fp32_scopes],
        "op_types_to_exclude": list(spec.fp32_op_types),
        "providers": ["cpu"],
    }


_FLOAT_TYPES: dict[int, str] = {int(onnx.TensorProto.FLOAT): "fp32", int(onnx.TensorProto.FLOAT16): "fp16"}


def node_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "fp32" / "fp16" by the float type of its tensors (nodes with no float
    tensors, e.g. Shape arithmetic, and AutoCast's own Casts are left out)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for value in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        types[value.name] = value.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    result = {}
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            continue
        found = {_FLOAT_TYPES[types[n]] for n in (*node.input, *node.output) if types.get(n) in _FLOAT_TYPES}
        if found:
            result[node.name] = "fp32" if found == {"fp32"} else "fp16" if found == {"fp16"} else "mixed"
    return result


_SKIP = re.compile(r"Skipping node (?P<node>\S+?): (?P<reason>.*)$")
_REASONS = {"DisabledOpTypes": "op type forced FP32 by the spec (fp32_op_types)",
            "DisabledNodeNameRegexRule": "scope forced FP32 by the spec (fp32_scopes)",
            "InitializerRangeRule": "a weight exceeds init_max"}


class _SkipRecorder(logging.Handler):
    """Collects AutoCast's "Skipping node X: why" decisions: the evidence of why each node stayed FP32
    (e.g. "reference IO out of range: ... absmax=1.2e5" on the calibration data)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _SKIP.match(record.getMessage())
        if match:
            reason = match.group("reason").strip()
            self.reasons.setdefault(match.group("node"), _REASONS.get(reason, reason))


def convert_fp16(fp32_path: Path, spec: ComponentSpec, out_path: Path,
                 calibration: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write the FP16 graph of one component; returns the manifest's converter record."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if spec.keep_fp32:
        # The quantizer: FP16 distances flip code indices, so its "FP16" graph is the FP32 one.
        shutil.copyfile(fp32_path, out_path)
        precisions = node_precisions(onnx.load(str(out_path)))
        return {"name": "none (component kept FP32: spec.keep_fp32)", "version": None, "arguments": {},
                "kept_fp32_nodes": sorted(n for n, p in precisions.items() if p == "fp32"), "fp16_nodes": 0}
    convert = _autocast()
    arguments = converter_arguments(spec)
    # A folder with one .npz is read as ONE batch; a bare .npz is split into batch-1 runs,
    # which costs ~1 s per sample on the S/2 denoiser for the same statistics.
    calib_dir = out_path.with_name(f".{spec.name}.calibration")
    calib_dir.mkdir(exist_ok=True)
    arrays: dict[str, Any] = {name: calibration[name] for name in spec.input_names}
    np.savez(calib_dir / "batch0.npz", **arrays)
    # AutoCast logs every node at INFO; what it decided is recorded in the manifest instead.
    # Some of its notes go to the root logger (e.g. "ops not supported in float16: Not", about the
    # text encoder's boolean padding mask, which has no float to convert anyway).
    # Its per-node decisions are captured (not printed) by a handler on the autocast logger, which
    # then neither propagates nor prints them.
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx")]
    loggers.append(logging.getLogger())
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    autocast_logger = logging.getLogger("modelopt.onnx.autocast")
    recorder = _SkipRecorder()
    saved = (autocast_logger.level, autocast_logger.propagate, list(autocast_logger.handlers))
    autocast_logger.handlers = [recorder]
    autocast_logger.setLevel(logging.INFO)
    autocast_logger.propagate = False
    try:
        model = convert(str(fp32_path), calibration_data=str(calib_dir), **arguments)
    finally:
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)
        autocast_logger.setLevel(saved[0])
        autocast_logger.propagate = saved[1]
        autocast_logger.handlers = saved[2]
        shutil.rmtree(calib_dir, ignore_errors=True)
    model.producer_name = "mmgen-deploy"
    model.doc_string = f"mmgen-deploy {spec.name}, mixed-precision FP16 (ModelOpt AutoCast)"
    save_model(model, out_path)
    check_model(out_path)
    precisions = node_precisions(onnx.load(str(out_path)))
    kept = sorted(n for n, p in precisions.items() if p != "fp16")
    return {
        # Why each node stayed FP32, as AutoCast decided it: the spec's op types / scopes, or the
        # calibration data's range ("reference IO out of range: ... absmax=...") beyond data_max.
        "fp32_reasons": {n: recorder.reasons[n] for n in kept if n in recorder.reasons},
        "name": "modelopt.onnx.autocast.convert_to_mixed_precision",
        "version": converter_version(),
        "arguments": {**arguments, "calibration_samples": int(calibration[spec.input_names[0]].shape[0])},
        "kept_fp32_nodes": kept,
        "fp16_nodes": sum(1 for p in precisions.values() if p == "fp16"),
    }
