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

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.export.fold import fold_static_shapes
from mmgen_deploy.specs import ComponentSpec, TensorSpec

MIN_OPSET = 17  # native LayerNormalization for TensorRT
MAX_OPSET = 20  # the TorchScript exporter's ceiling
DEFAULT_OPSET = 18
EXPORTER_NAME = "torch.onnx.export (TorchScript exporter, dynamo=False)"
# Protobuf cannot serialise a single message over 2 GiB: larger models keep weights next to the graph.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset} is not supported",
                         f"use {MIN_OPSET}..{MAX_OPSET} (>= 17 gives TensorRT a native LayerNormalization; "
                         f"{MAX_OPSET} is the exporter's maximum)")
    return opset


def scope_regex(scope: str) -> str:
    """Module path `dit.t_embedder` -> regex for the TorchScript node names `/dit/t_embedder/...`."""
    return "^/" + "/".join(part for part in scope.split(".")) + "/"


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


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """One file, or graph + `<name>.data` when the weights are too big for protobuf."""
    size = sum(init.ByteSize() for init in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def check_model(path: Path) -> onnx.ModelProto:
    """onnx.checker (full) + strict shape inference; returns the model with inferred shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MMGenError(f"{path.name} fails the ONNX checker: {str(exc).splitlines()[0]}",
                         "report this as a bug with `--debug` output") from None


def export_fp32(module: nn.Module, spec: ComponentSpec, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Export one component to `path` (FP32, batch axis dynamic), then check it."""
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
        model = onnx.load(str(raw))
    for value, tensor in zip(model.graph.input, spec.inputs, strict=True):
        _set_shape(value, tensor)
    for value, tensor in zip(model.graph.output, spec.outputs, strict=True):
        _set_shape(value, tensor)
    constants_to_initializers(model)
    model, _ = fold_static_shapes(model)
    # Drop the exporter's intermediate shapes (some carry invented axis names); re-inferred below.
    del model.graph.value_info[:]
    model.producer_name = "mmgen-deploy"
    model.doc_string = f"mmgen-deploy {spec.name}, FP32, exported with {EXPORTER_NAME}"
    save_model(model, path)
    check_model(path)


def file_size(path: Path) -> int:
    """Bytes of the graph plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def file_opset(path: Path) -> int:
    """The default-domain opset the file declares (what the manifest records, not what was asked)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)

