"""FP32 ONNX -> mixed-precision FP16 ONNX with NVIDIA ModelOpt AutoCast.

TensorRT 11 and TensorRT-RTX build strongly typed networks only, so precision must be
in the graph. AutoCast runs the FP32 graph in ONNX Runtime on calibration data and keeps
a node FP32 when a value it reads or writes exceeds `data_max` (so it would overflow or
lose too much in FP16) or one of its weights exceeds `init_max`; on top of that, nodes
matching the spec's FP32 scopes / op types are forced FP32. I/O types stay FP32.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmgen_deploy import onnx_files
from mmgen_deploy.errors import NotAvailableError
from mmgen_deploy.export.onnx_export import check_model, save_model
from mmgen_deploy.specs import BATCH, ComponentSpec, scope_regex

DATA_MAX = 512.0  # AutoCast's default: FP16 keeps ~3 significant digits; 65504 is the hard limit
INIT_MAX = 65504.0  # largest finite FP16


def _autocast() -> Any:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise NotAvailableError(f"FP16 export needs NVIDIA ModelOpt AutoCast ({exc})",
                                "pip install 'mmgen-deploy[fp16]', or export with {precision} fp32",
                                params=["precision"]) from None
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
    tensors, e.g. Shape arithmetic, and AutoCast's own Casts are left out). Needs the graph
    only: load it with `load_external_data=False`."""
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


def _graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def convert_fp16(fp32_path: Path, spec: ComponentSpec, out_path: Path, calibration: dict[str, np.ndarray], *,
                 external_data: bool | None = None, batch_size: int | None = None,
                 threads: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the FP16 graph of one component; returns the manifest's converter record.

    AutoCast's range analysis is fed by `activation_ranges` (batches of `batch_size` samples,
    ranges merged), not by its own reference run, which holds every intermediate tensor of the
    whole calibration set at once (23 GB for 16 images through a 256 px encoder).
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if spec.keep_fp32:
        # The quantizer: FP16 distances flip code indices, so its "FP16" graph is the FP32 one.
        onnx_files.copy_onnx(fp32_path, out_path)
        precisions = node_precisions(_graph(out_path))
        return {"name": "none (component kept FP32: spec.keep_fp32)", "version": None, "arguments": {},
                "kept_fp32_nodes": sorted(n for n, p in precisions.items() if p == "fp32"), "fp16_nodes": 0}
    convert = _autocast()
    arguments = converter_arguments(spec)
    samples = int(calibration[spec.input_names[0]].shape[0])
    batch = batch_size or calibration_batch_size(fp32_path, spec)
    ranges = activation_ranges(fp32_path, {name: calibration[name] for name in spec.input_names}, batch,
                               threads=threads, progress=progress)
    if progress is not None:
        progress("AutoCast")
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
    runner = _PrecomputedRanges.install(ranges)
    graph_checks = _WeightlessGraphChecks.install()
    try:
        model = convert(str(fp32_path), calibration_data=None, **arguments)
    finally:
        graph_checks.uninstall()
        runner.uninstall()
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)
        autocast_logger.setLevel(saved[0])
        autocast_logger.propagate = saved[1]
        autocast_logger.handlers = saved[2]
    del ranges
    model.producer_name = "mmgen-deploy"
    model.doc_string = f"mmgen-deploy {spec.name}, mixed-precision FP16 (ModelOpt AutoCast)"
    if progress is not None:
        progress("saving")
    save_model(model, out_path, base_dir=fp32_path.parent, external_data=external_data)
    del model
    gc.collect()
    check_model(out_path)
    precisions = node_precisions(_graph(out_path))
    kept = sorted(n for n, p in precisions.items() if p != "fp16")
    return {
        # Why each node stayed FP32, as AutoCast decided it: the spec's op types / scopes, or the
        # calibration data's range ("reference IO out of range: ... absmax=...") beyond data_max.
        "fp32_reasons": {n: recorder.reasons[n] for n in kept if n in recorder.reasons},
        "name": "modelopt.onnx.autocast.convert_to_mixed_precision",
        "version": converter_version(),
        "arguments": {**arguments, "calibration_samples": samples, "calibration_batch": batch,
                      "reference_runner": "mmgen activation_ranges (batched, ranges merged)"},
        "uncovered_tensors": runner.uncovered,
        "kept_fp32_nodes": kept,
        "fp16_nodes": sum(1 for p in precisions.values() if p == "fp16"),
    }


# -- batched range analysis ------------------------------------------------------------------------------------

_CALIBRATION_ACTIVATION_BUDGET = 1 << 30  # bytes of intermediate tensors one calibration batch may hold


def _float_values(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Every float tensor a node writes (and the graph inputs), with its inferred shape."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    out: dict[str, list[int | str]] = {}
    produced = [o for node in inferred.graph.node for o in node.output if o]
    for name in [i.name for i in inferred.graph.input] + produced:
        value = types.get(name)
        if value is None or value.type.tensor_type.elem_type not in _FLOAT_TYPES:
            continue
        dims = value.type.tensor_type.shape.dim
        out[name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def activation_bytes_per_sample(path: Path) -> int | None:
    """Bytes of all float intermediate tensors of one sample (batch axis = 1): what a reference
    run that records every tensor holds per sample; None when shape inference leaves a size
    unknown (it does after a GroupNorm's reshape), so the graph alone cannot tell."""
    total = 0
    for dims in _float_values(_graph(path)).values():
        count = 1
        for d in dims:
            if d == BATCH:
                continue
            if not isinstance(d, int) or d <= 0:
                return None
            count *= d
        total += 4 * count
    return total


def calibration_batch_size(path: Path, spec: ComponentSpec, budget: int = _CALIBRATION_ACTIVATION_BUDGET) -> int:
    """Samples per range-analysis batch from the graph's own shapes (the exporter passes one counted
    on the torch side instead, see `budget.calibration_batch`); 1 when the graph cannot tell."""
    per_sample = activation_bytes_per_sample(path)
    if per_sample is None:
        return 1
    return max(1, min(spec.profile.max, budget // max(1, per_sample)))


@dataclass
class _Stats:
    absmax: float
    min_val: float
    max_val: float
    shape: tuple[int, ...]


def activation_ranges(path: Path, inputs: dict[str, np.ndarray], batch_size: int, *, threads: int = 1,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """min / max / absmax of every float tensor of the FP32 graph at `path` over `inputs`, run in
    ONNX Runtime `batch_size` samples at a time (ranges are min/max: they merge exactly).

    The graph computes its own statistics: every float tensor gets a ReduceMin, a ReduceMax and a
    Shape node, and only those small outputs are fetched. Making the tensors themselves outputs
    would hold every intermediate of a forward at once, twice over (ORT's buffers and the NumPy
    copies): 10 GB for one sample of a DiT-XL/2, where this holds what plain inference holds.
    One session, on the graph file itself (its external data is read from beside it).
    Returns name -> AutoCast TensorStats.
    """
    import onnxruntime as ort
    from modelopt.onnx.autocast.referencerunner import TensorStats

    model = _graph(path)
    input_names = {i.name for i in model.graph.input}
    # name -> (min, max, shape) output names, for every float tensor a node writes. Each tensor's
    # probes follow its producer in the node list, so that ONNX Runtime (which runs the nodes in
    # that order where it can) frees the tensor as early as plain inference would.
    floats = [n for n in _float_values(model) if n not in input_names]
    probes = {name: (f"mmgen_ranges_min_{i}", f"mmgen_ranges_max_{i}", f"mmgen_ranges_shape_{i}")
              for i, name in enumerate(floats)}
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    for node in nodes:
        model.graph.node.append(node)
        for name in node.output:
            if name in probes:
                low, high, shape = probes[name]
                model.graph.node.extend([
                    onnx.helper.make_node("ReduceMin", [name], [low], name=f"{low}_node", keepdims=0),
                    onnx.helper.make_node("ReduceMax", [name], [high], name=f"{high}_node", keepdims=0),
                    onnx.helper.make_node("Shape", [name], [shape], name=f"{shape}_node"),
                ])
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for outs in probes.values() for o in outs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's default order runs the probes late and keeps their tensors alive (4.4 GB for one image
    # through a 256 px VQ-f8 decoder whose plain inference peaks at 0.7 GB); this one, 1.5 GB.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    uses_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if uses_external:
        # Beside the original so that the external data resolves; graph only (megabytes).
        probe = path.with_name(f".{path.stem}.ranges.onnx")
        onnx.save(model, str(probe))
        del model
        try:
            session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        finally:
            probe.unlink(missing_ok=True)
    else:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
    fetch = [o for outs in probes.values() for o in outs]
    stats: dict[str, _Stats] = {}
    total = next(iter(inputs.values())).shape[0]

    def merge(name: str, lo: float, hi: float, shape: tuple[int, ...]) -> None:
        if 0 in shape:  # an empty tensor has no range
            return
        old = stats.get(name)
        if old is None:
            stats[name] = _Stats(max(abs(lo), abs(hi)), lo, hi, shape)
        else:
            old.min_val, old.max_val = min(old.min_val, lo), max(old.max_val, hi)
            old.absmax = max(abs(old.min_val), abs(old.max_val))

    for start in range(0, total, batch_size):
        if progress is not None:
            progress(f"calibration {min(start + batch_size, total)}/{total}")
        feeds = {name: np.ascontiguousarray(array[start:start + batch_size]) for name, array in inputs.items()}
        for name, array in feeds.items():
            if array.size and np.issubdtype(array.dtype, np.floating):
                merge(name, float(np.min(array)), float(np.max(array)), tuple(array.shape))
        results = dict(zip(fetch, session.run(fetch, feeds), strict=True))
        for name, (lo, hi, shape) in probes.items():
            merge(name, float(results[lo]), float(results[hi]), tuple(int(d) for d in results[shape]))
        del results
    del session
    gc.collect()
    return {name: TensorStats(absmax=s.absmax, min_val=s.min_val, max_val=s.max_val, shape=s.shape)
            for name, s in stats.items()}


# Float initializers above this many bytes are left out of the graph views below (shape arithmetic
# reads only small integer tensors, which stay).
_VIEW_KEEP_BYTES = 1 << 16


def weightless_view(model: onnx.ModelProto, data_file: str = "weights.bin") -> tuple[onnx.ModelProto, int]:
    """A copy of `model` whose large float initializers keep their name, type and dims but not
    their values, which are external data at their own offsets in `data_file` (never written:
    a sparse file of the returned size stands in where a checker wants one). What shape
    inference and the checker read, at the size of the graph instead of the weights."""
    view = onnx.ModelProto()
    _copy_fields(model, view, skip="graph")
    graph, target = model.graph, view.graph
    _copy_fields(graph, target, skip="initializer")
    offset = 0
    for tensor in graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        size = count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if tensor.data_type not in _FLOAT_TYPES or size <= _VIEW_KEEP_BYTES:
            target.initializer.add().CopyFrom(tensor)
            continue
        stub = target.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                      data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(size))):
            stub.external_data.add(key=key, value=value)
        offset += size
    return view, offset


def _copy_fields(source: Any, target: Any, *, skip: str) -> None:
    """Copy every set field of protobuf message `source` into `target`, except `skip`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


class _WeightlessGraphChecks:
    """During one AutoCast conversion, ModelOpt's shape inference and model checker run on
    `weightless_view`s. On a model over protobuf's 2 GB limit each of them otherwise deep-copies
    the model, writes it with its weights to a temporary folder and (inference) reads it all
    back, several times per conversion: 15 GB peak RSS for a DiT-XL/2's 2.7 GB of weights.
    Inference results (value_info, input/output types) are carried back onto the real model."""

    def __init__(self) -> None:
        self._module: Any = None
        self._originals: dict[str, Any] = {}

    @classmethod
    def install(cls) -> _WeightlessGraphChecks:
        import modelopt.onnx.utils as modelopt_utils

        self = cls()
        missing = [n for n in ("infer_shapes", "check_model") if not hasattr(modelopt_utils, n)]
        if missing:
            raise NotAvailableError(f"this ModelOpt version has no modelopt.onnx.utils.{missing[0]}",
                                    "install nvidia-modelopt 0.47 (`pip install 'mmgen-deploy[fp16]'`)")
        self._module = modelopt_utils
        self._originals = {"infer_shapes": modelopt_utils.infer_shapes, "check_model": modelopt_utils.check_model}

        def infer_shapes(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
            inferred = onnx.shape_inference.infer_shapes(weightless_view(model)[0], **kwargs).graph
            graph = model.graph
            graph.ClearField("value_info")
            graph.value_info.extend(inferred.value_info)
            for mine, theirs in ((graph.input, inferred.input), (graph.output, inferred.output)):
                for value, typed in zip(mine, theirs, strict=True):
                    value.CopyFrom(typed)
            return model

        def check_model(model: onnx.ModelProto) -> None:
            import tempfile

            view, data_bytes = weightless_view(model)
            with tempfile.TemporaryDirectory(prefix="mmgen-check-") as folder:
                with open(Path(folder) / "weights.bin", "wb") as data:
                    data.truncate(data_bytes)  # sparse: no disk, no memory
                onnx.save(view, str(Path(folder) / "model.onnx"))
                onnx.checker.check_model(str(Path(folder) / "model.onnx"))

        modelopt_utils.infer_shapes = infer_shapes
        modelopt_utils.check_model = check_model
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(self._module, name, original)


class _PrecomputedRanges:
    """Stands in for AutoCast's ReferenceRunner during one conversion: returns the ranges
    `activation_ranges` measured (AutoCast's NodeClassifier accepts merged TensorStats, which is
    what its own runner returns for several calibration batches)."""

    def __init__(self, ranges: dict[str, Any]) -> None:
        self.ranges = ranges
        self.uncovered = 0
        self._module: Any = None
        self._original: Any = None

    @classmethod
    def install(cls, ranges: dict[str, Any]) -> _PrecomputedRanges:
        import modelopt.onnx.autocast.convert as autocast_convert

        runner = cls(ranges)
        owner = runner

        class Runner:
            def __init__(self, model: onnx.ModelProto, *args: Any, **kwargs: Any) -> None:
                self.model = model

            def run(self, inputs: Any = None) -> dict[str, Any]:
                produced = {o for node in self.model.graph.node for o in node.output if o}
                floats = _float_values_names(self.model)
                owner.uncovered = sum(1 for name in produced & floats if name not in owner.ranges)
                return dict(owner.ranges)

        if not hasattr(autocast_convert, "ReferenceRunner"):
            raise NotAvailableError("this ModelOpt version has no autocast.convert.ReferenceRunner to feed",
                                    "install nvidia-modelopt 0.33 .. 0.47")
        runner._module, runner._original = autocast_convert, autocast_convert.ReferenceRunner
        autocast_convert.ReferenceRunner = Runner
        return runner

    def uninstall(self) -> None:
        if self._module is not None:
            self._module.ReferenceRunner = self._original
            self._module = None


def _float_values_names(model: onnx.ModelProto) -> set[str]:
    """Names of float tensors per the value_info AutoCast has already inferred on its model."""
    return {v.name for v in (*model.graph.value_info, *model.graph.output)
            if v.type.tensor_type.elem_type in _FLOAT_TYPES}
