"""PyTorch component -> FP32 ONNX file, with only the batch axis dynamic.

Exporter choice: torch's TorchScript-based exporter (`dynamo=False`). On these models it
gives the same operator set as the dynamo exporter at opset 17/18 (native
LayerNormalization, GroupNorm as InstanceNormalization, SDPA as MatMul/Softmax), but it
names every node after its module path (`/dit/t_embedder/Cos`), which is what the FP32
scopes of the mixed-precision conversion match on, and it is ~15x faster on two CPU cores
(0.25 s vs 4 s per tiny component), which keeps export-in-the-test-suite affordable. The
dynamo exporter names nodes `node_cos` and keeps the module path only in metadata.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from mmgen_deploy import onnx_files
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.export.fold import MAX_FOLD_ELEMENTS as _MAX_FOLD_ELEMENTS
from mmgen_deploy.export.fold import fold_static_shapes
from mmgen_deploy.specs import ComponentSpec, TensorSpec

MIN_OPSET = 17  # native LayerNormalization for TensorRT
MAX_OPSET = 20  # the TorchScript exporter's ceiling
DEFAULT_OPSET = 18
EXPORTER_NAME = "torch.onnx.export (TorchScript exporter, dynamo=False)"
# Protobuf cannot serialise a single message over 2 GiB: larger models keep weights next to the graph.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
_INLINE_BYTES = 1024  # smaller tensors stay inside the graph (onnx's own default threshold)
_ALIGN = 4096
_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"{{opset}} {opset} is not supported",
                         f"use {MIN_OPSET}..{MAX_OPSET} (>= 17 gives TensorRT a native LayerNormalization; "
                         f"{MAX_OPSET} is the exporter's maximum)", params=["opset"])
    return opset


def _set_shape(value: onnx.ValueInfoProto, tensor: TensorSpec) -> None:
    """Overwrite an I/O declaration with the spec's: the exporter sometimes invents symbolic
    names for static axes (e.g. `Convh_dim_3`), which TensorRT would treat as dynamic."""
    value.type.tensor_type.elem_type = _ONNX_DTYPES[tensor.dtype]
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for dim in tensor.shape:
        entry = shape.dim.add()
        if isinstance(dim, str):
            entry.dim_param = dim
        else:
            entry.dim_value = int(dim)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn `Constant` nodes into initializers (a third of the TorchScript exporter's nodes).

    Same computation, fewer nodes: graph tools that scan the node list per node (ModelOpt
    AutoCast's clean-up is quadratic in the node count) get much faster.
    """
    graph = model.graph
    kept, moved = [], 0
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and len(node.output) == 1 and "value" in attrs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs["value"].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, wherever it lives (inline raw/typed fields or an external file)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if "length" in info:
            return int(info["length"])
        count = int(np.prod(tensor.dims, dtype=np.int64))
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def weight_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the model's initializers, inline or external."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _read_external(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    location = base_dir / info["location"]
    with open(location, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def _raw_bytes(tensor: onnx.TensorProto, base_dir: Path | None) -> bytes:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if base_dir is None:
            raise ValueError(f"tensor {tensor.name} has external data but no folder to read it from")
        return _read_external(tensor, base_dir)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _set_inline(tensor: onnx.TensorProto, raw: bytes) -> None:
    dims, name, dtype = list(tensor.dims), tensor.name, tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)
    tensor.raw_data = raw


def load_small_external(model: onnx.ModelProto, base_dir: Path, max_elements: int) -> int:
    """Bring initializers of at most `max_elements` elements (shape vectors, scalars) and every
    tensor held in a node attribute (torch stores `Constant` values externally too) inline, so
    graph-only work such as shape folding can read them; the weights stay external."""
    moved = 0
    for tensor in model.graph.initializer:
        if (tensor.data_location == onnx.TensorProto.EXTERNAL
                and int(np.prod(tensor.dims, dtype=np.int64)) <= max_elements):
            _set_inline(tensor, _read_external(tensor, base_dir))
            moved += 1
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                _set_inline(attr.t, _read_external(attr.t, base_dir))
                moved += 1
    return moved


def save_model(model: onnx.ModelProto, path: Path, *, base_dir: Path | None = None,
               external_data: bool | None = None) -> bool:
    """Write `model` to `path`: one file, or the graph plus `<name>.onnx.data` (returns True then).

    `external_data` None decides by size (over EXTERNAL_DATA_THRESHOLD: protobuf's 2 GB limit);
    True forces the two-file form (what the tests use to cover the large-model path cheaply).
    Initializers may already live in external files relative to `base_dir` (a graph loaded with
    `load_external_data=False`): they are streamed tensor by tensor into the one data file, so the
    weights are never all in memory. The proto is changed in place (its tensors end up pointing
    at the new data file, or inline).
    """
    total = weight_bytes(model)
    external = total > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_file = onnx_files.data_path(path)
    if not external:
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    _set_inline(tensor, _raw_bytes(tensor, base_dir))
        data_file.unlink(missing_ok=True)
        onnx.save(model, str(path))
        return False
    partial = data_file.with_name(data_file.name + ".partial")
    with open(partial, "wb") as out:
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor, base_dir)
            if len(raw) < _INLINE_BYTES:
                if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                    _set_inline(tensor, raw)
                continue
            offset = -(-out.tell() // _ALIGN) * _ALIGN  # page-aligned: ONNX Runtime can map it
            out.write(b"\0" * (offset - out.tell()))
            out.write(raw)
            dims, name, dtype = list(tensor.dims), tensor.name, tensor.data_type
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_file.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            del raw
    os.replace(partial, data_file)
    onnx.save(model, str(path))
    return True


def check_model(path: Path) -> onnx.ModelProto:
    """onnx.checker (full, by path: works past 2 GB) + strict shape inference on the graph alone
    (weights not loaded); returns the graph (external tensors unloaded) with inferred shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MMGenError(f"{path.name} fails the ONNX checker: {str(exc).splitlines()[0]}",
                         "report this as a bug with the {debug} output", params=["debug"]) from None


def export_fp32(module: nn.Module, spec: ComponentSpec, path: Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None) -> bool:
    """Export one component to `path` (FP32, batch axis dynamic), then check it.

    The graph is handled without its weights throughout (torch writes the weights of a model over
    2 GB to files of their own; they are streamed into `<name>.onnx.data`), so a model of any size
    exports with one copy of its weights in memory: the torch module's. `external_data`: see
    `save_model`. Returns whether the weights were written to an external data file.
    """
    check_opset(opset)
    # Trace with batch 2: a batch of 1 invites the tracer to specialise broadcasting on it.
    example = spec.make_inputs(2, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    dynamic_axes = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs) if t.dynamic_axes}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo; see the module doc.
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, str(raw), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        external = finish_export(raw, spec, path, external_data=external_data)
    check_model(path)
    return external


def finish_export(raw: Path, spec: ComponentSpec, path: Path, *, external_data: bool | None = None) -> bool:
    """torch's output graph at `raw` (weights inline, or, over 2 GB, one file per tensor beside it)
    -> the checked, folded graph at `path`; graph-only throughout, the weights streamed."""
    model = onnx.load(str(raw), load_external_data=False)
    constants_to_initializers(model)
    load_small_external(model, raw.parent, _MAX_FOLD_ELEMENTS)
    for value, tensor in zip(model.graph.input, spec.inputs, strict=True):
        _set_shape(value, tensor)
    for value, tensor in zip(model.graph.output, spec.outputs, strict=True):
        _set_shape(value, tensor)
    model, _ = fold_static_shapes(model)
    # Drop the exporter's intermediate shapes (some carry invented axis names); re-inferred below.
    del model.graph.value_info[:]
    model.producer_name = "mmgen-deploy"
    model.doc_string = f"mmgen-deploy {spec.name}, FP32, exported with {EXPORTER_NAME}"
    return save_model(model, path, base_dir=raw.parent, external_data=external_data)


def file_size(path: Path) -> int:
    """Bytes of the graph plus its external data file, if any."""
    return onnx_files.onnx_bytes(path)


def file_opset(path: Path) -> int:
    """The default-domain opset the file declares (what the manifest records, not what was asked)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

