"""Fold the exporter's static shape arithmetic into constants.

The TorchScript exporter computes every reshape target and `chunk` offset at run time
from `Shape` nodes (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), although only the
batch axis is dynamic. Folding what is static (with ONNX shape inference) gives:
- fewer nodes: AutoCast's clean-up is quadratic in the node count (S/2 denoiser 50 s -> 20 s);
- no integer tensors above AutoCast's `data_max` (chunk offsets such as 640 or 2304), which
  it would otherwise mistake for FP16 overflow and keep the slicing nodes FP32;
- simpler graphs for TensorRT.
Only nodes whose inputs are all constant (or static dimensions) are folded; the batch
dimension stays a `Shape` computation. Validation against PyTorch runs afterwards anyway.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Side-effect-free operators that may be evaluated at export time on small constant inputs.
_FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Cast", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Reshape",
    "Equal", "Where", "Sqrt", "Floor", "Ceil", "Neg", "Abs", "Min", "Max", "Range", "ConstantOfShape",
    "Expand", "Identity", "ReduceProd", "Mod", "Less", "Greater", "Not", "And", "Or", "Shape", "Size",
}
MAX_FOLD_ELEMENTS = 4096  # shape vectors and scalars, never weights


def _static_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if array is not None else "" for i, array in enumerate(inputs)]
    single = onnx.helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                                   domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = onnx.helper.make_graph(
        [single], "fold", [onnx.helper.make_empty_tensor_value_info(n) for n in names if n],
        [onnx.helper.make_empty_tensor_value_info(n) for n in single.output])
    evaluator = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))
    feeds = {name: array for name, array in zip(names, inputs, strict=True) if name}
    return [np.asarray(r) for r in evaluator.run(None, feeds)]


def fold_static_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Returns the folded model and how many nodes were removed."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: _static_dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input)}
    constants: dict[str, np.ndarray] = {
        init.name: numpy_helper.to_array(init) for init in model.graph.initializer
        if np.prod(init.dims, dtype=np.int64) <= MAX_FOLD_ELEMENTS
    }
    partial_shapes: dict[str, list[int | None]] = {}  # Shape outputs with a dynamic batch entry
    graph_outputs = {o.name for o in model.graph.output}
    kept: list[onnx.NodeProto] = []
    folded_outputs: set[str] = set()
    for node in model.graph.node:
        result: list[np.ndarray] | None = None
        if node.domain not in ("", "ai.onnx") or any(o in graph_outputs for o in node.output):
            result = None
        elif node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is not None:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                dims = dims[attrs.get("start", 0):attrs.get("end", len(dims))]
                if all(d is not None for d in dims):
                    result = [np.array(dims, dtype=np.int64)]
                else:
                    partial_shapes[node.output[0]] = dims
        elif node.op_type == "Gather" and node.input[0] in partial_shapes and node.input[1] in constants:
            index = constants[node.input[1]]
            dims = partial_shapes[node.input[0]]
            picked = [dims[int(i)] for i in index.reshape(-1)]
            if index.ndim <= 1 and all(d is not None for d in picked):
                result = [np.array(picked, dtype=np.int64).reshape(index.shape)]
        elif (node.op_type == "Slice" and node.input[0] in partial_shapes
              and all(name in constants for name in node.input[1:] if name)):
            # e.g. x.shape[-1] for SDPA's scale: slice the partly known shape vector.
            known = np.array([-1 if d is None else d for d in partial_shapes[node.input[0]]], dtype=np.int64)
            sliced = _evaluate(node, [known, *[constants[n] if n else None for n in node.input[1:]]], opset)[0]
            if sliced.size and (sliced >= 0).all():
                result = [sliced]
        elif node.op_type in _FOLDABLE and all(not name or name in constants for name in node.input):
            inputs = [constants[name] if name else None for name in node.input]
            if all(a is None or a.size <= MAX_FOLD_ELEMENTS for a in inputs):
                result = _evaluate(node, inputs, opset)
        if result is None or len(result) != len(node.output):
            kept.append(node)
            continue
        for name, array in zip(node.output, result, strict=True):
            constants[name] = array
            folded_outputs.add(name)
    # Dead-node elimination, backwards: Shape nodes whose every reader was folded.
    live: list[onnx.NodeProto] = []
    needed = set(graph_outputs)
    for node in reversed(kept):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    kept = live[::-1]
    used = {name for node in kept for name in node.input} | graph_outputs
    removed = len(model.graph.node) - len(kept)
    new_inits = [numpy_helper.from_array(constants[name], name) for name in sorted(folded_outputs & used)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(new_inits)
    # Drop initializers nothing reads any more (the folded chains' inputs).
    remaining = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(remaining)
    return model, removed
