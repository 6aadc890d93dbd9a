"""What ONNX Runtime's CPU provider is given for a graph: the file, or a rewritten copy in memory.

GroupNorm exports as Reshape -> InstanceNormalization -> Reshape (see `specs.GROUP_NORM_OP_TYPES`).
ONNX Runtime's CPU kernel for InstanceNormalization (1.32) sums each instance in one long float32
accumulation. At 256 px a group of a VQ-f8 encoder or decoder holds 4 x 256 x 256 = 262,144 values,
and the mean and variance come out ~1e-4 off: measured 1.3e-4 relative L2 for one GroupNorm on the
activations of a shapes image, 1.7e-4 for the whole encoder (torch FP32: 8e-7 from float64). That is
beyond the FP32 validation tolerance (1e-5), so exporting a 256 px first stage with real images failed
in the check of a graph that is right. Centering the data first does not help (the variance sum is
the long one); ReduceMean over the whole group is just as imprecise.

The fix here: before ONNX Runtime (CPU) loads a graph with GroupNorms, each one is replaced by
the same normalisation with short sums: the (N, G, L) instance is viewed as (N, G, C/G, H, W) and
averaged over W, then H, then the group's channels, in two passes (mean, then mean of squared
deviations). Measured on the same GroupNorm: 7e-7; the whole encoder on shapes images: 1.4e-6 (from
1.7e-4). Long sums of many equal values (a flat background) are the worst case: each addition rounds
the same way. The file on disk is not changed: TensorRT and OpenVINO get
the InstanceNormalization they fuse into their own normalisation kernels. The rewrite needs no
static shapes (ONNX shape inference loses the spatial sizes after the first downsampling), so it
applies at every image size, the 32 px quickstart included. It is made in memory: a graph with
external data is read whole (a first stage is far below protobuf's 2 GiB limit); a graph that
cannot be read is handed over unchanged, for ONNX Runtime to report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_PROTOBUF_LIMIT = 2_000_000_000


# Bump when the rewrite changes: stored graphs of an older rewrite are then made again.
REWRITE_VERSION = 1
# The rewritten graphs kept in the cache (a 256 px VQ-f8 encoder + decoder: 0.34 GB).
CACHE_LIMIT_BYTES = 5_000_000_000


def default_cache_dir() -> Path | None:
    """Where rewritten graphs are kept: `io_utils.cache_root()`/onnxruntime (None: off)."""
    from mmgen_deploy.io_utils import cache_root

    root = cache_root()
    return root / "onnxruntime" if root is not None else None


def ort_cpu_model(path: Path, *, has_group_norms: bool, cache_dir: Path | str | None = "default") -> str | bytes:
    """What to pass to `onnxruntime.InferenceSession` for `path` on the CPU provider: the path
    itself, or a graph with its GroupNorms rewritten (`precise_group_norms`).

    `has_group_norms` comes from the component spec, so graphs without any (the denoiser, which
    may be gigabytes) are not read here at all. Rewriting a 256 px decoder (0.2 GB) takes ~1 s
    (reading and writing the protobuf), so the result is kept in `cache_dir` (default
    `default_cache_dir()`), keyed by the graph's path, size and mtime: later processes pass ONNX
    Runtime that file. Without a usable cache the rewritten graph is returned as bytes."""
    if not has_group_norms:
        return str(path)
    from mmgen_deploy.onnx_files import file_stats

    # Stat only: parsing a graph to list its data files costs as much as the cache saves.
    stats = file_stats(path)
    if sum(size for _, size, _ in stats) > _PROTOBUF_LIMIT:
        return str(path)
    folder = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    target = None
    if folder is not None:
        identity = [REWRITE_VERSION, *stats]
        source = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
        target = folder / f"{source}-{path.stem}-{key}.onnx"
        if target.is_file():
            with contextlib.suppress(OSError):
                os.utime(target)  # used now: the last to be evicted
            return str(target)
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception:  # let ONNX Runtime report the damaged file in its own words
        return str(path)
    if precise_group_norms(model) == 0:
        return str(path)
    data = model.SerializeToString()
    if target is None:
        return data
    from mmgen_deploy.io_utils import CACHE_WRITE_ERRORS, store_in_cache

    try:  # replaces the entry of an earlier export of the same file
        store_in_cache(target, lambda tmp: tmp.write_bytes(data), f"{source}-{path.stem}-*.onnx", CACHE_LIMIT_BYTES)
    except CACHE_WRITE_ERRORS:  # a read-only, full or unusable cache: this process uses the bytes
        return data
    return str(target)


def precise_group_norms(model: Any) -> int:
    """Rewrite, in place, each GroupNorm of `model`'s main graph as torch exports it (Reshape to
    (N, G, -1) [-> Cast] -> InstanceNormalization, then back to the input's shape and the affine
    Mul/Add) into sums over one axis at a time; return how many were rewritten. Each sum runs over
    one spatial axis or the group's channels (256, 256 and 4 values for a 256 px VQ-f8 group, where
    the kernel sums 262,144). Inputs of rank < 3 (no spatial axis) are left as they are."""
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t

    def array(name: str) -> np.ndarray | None:
        while name not in values and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]  # the exporter shares equal weights through Identity nodes
        tensor = values.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    added: set[str] = set()

    def constant(name: str, data: np.ndarray) -> str:
        if name not in added:
            graph.initializer.append(numpy_helper.from_array(data, name))
            added.add(name)
        return name

    def reduce_means(x: str, axes: list[int], out: str) -> list[Any]:
        """Mean over `axes`, one axis per ReduceMean (each a short sum), the last one named `out`."""
        nodes = []
        for i, axis in enumerate(axes):
            target = out if i == len(axes) - 1 else f"{out}{axis}"
            if opset >= 18:
                held = constant(f"precise_group_norm/axis{axis}", np.asarray([axis], dtype=np.int64))
                nodes.append(helper.make_node("ReduceMean", [x, held], [target], name=target, keepdims=1))
            else:
                nodes.append(helper.make_node("ReduceMean", [x], [target], name=target, axes=[axis], keepdims=1))
            x = target
        return nodes

    rewritten, replaced = 0, set()
    for norm in [n for n in graph.node if n.op_type == "InstanceNormalization" and n.domain in ("", "ai.onnx")]:
        data = norm.input[0]
        source = producers.get(data)
        if source is not None and source.op_type == "Cast":
            source = producers.get(source.input[0])
        if source is None or source.op_type != "Reshape":
            continue
        view = array(source.input[1])
        if view is None or view.ndim != 1 or len(view) != 3 or int(view[0]) != 0 or int(view[2]) != -1:
            continue
        rank = _input_rank(norm, consumers, array)
        if rank < 3:
            continue
        groups, x = int(view[1]), source.input[0]
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        scale, bias = array(norm.input[1]), array(norm.input[2])
        if scale is None or bias is None:
            continue
        out = norm.output[0]
        p = f"{norm.name or out}/precise"
        per_group = (1, groups, 1, 1)
        # (N, G, L) viewed as (N, G, C/G, *spatial); the sums then run axis by axis, innermost first.
        axes = list(range(rank, 1, -1))
        nodes = [
            helper.make_node("Shape", [x], [f"{p}/spatial"], name=f"{p}/spatial", start=2),
            helper.make_node("Concat", [constant(f"precise_group_norm/lead{groups}",
                                                 np.asarray([0, groups, -1], np.int64)), f"{p}/spatial"],
                             [f"{p}/view"], name=f"{p}/view", axis=0),
            helper.make_node("Shape", [data], [f"{p}/flat"], name=f"{p}/flat"),
            helper.make_node("Reshape", [data, f"{p}/view"], [f"{p}/x"], name=f"{p}/x"),
            *reduce_means(f"{p}/x", axes, f"{p}/mean"),
            helper.make_node("Sub", [f"{p}/x", f"{p}/mean"], [f"{p}/dev"], name=f"{p}/dev"),
            helper.make_node("Mul", [f"{p}/dev", f"{p}/dev"], [f"{p}/sq"], name=f"{p}/sq"),
            *reduce_means(f"{p}/sq", axes, f"{p}/var"),
            helper.make_node("CastLike", [constant(f"{p}/eps", np.asarray(epsilon, np.float32)), f"{p}/x"],
                             [f"{p}/eps_like"], name=f"{p}/eps_like"),
            helper.make_node("Add", [f"{p}/var", f"{p}/eps_like"], [f"{p}/var_eps"], name=f"{p}/var_eps"),
            helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"], name=f"{p}/std"),
            helper.make_node("Div", [f"{p}/dev", f"{p}/std"], [f"{p}/norm"], name=f"{p}/norm"),
        ]
        result = f"{p}/norm"
        for what, op, affine, neutral in (("scale", "Mul", scale, 1.0), ("bias", "Add", bias, 0.0)):
            if np.all(affine == neutral):  # torch's GroupNorm export: ones and zeros (the affine follows)
                continue
            const = constant(f"{p}/{what}", affine.reshape(per_group).astype(np.float32))
            nodes += [helper.make_node("CastLike", [const, f"{p}/x"], [f"{p}/{what}_like"], name=f"{p}/{what}_like"),
                      helper.make_node(op, [result, f"{p}/{what}_like"], [f"{p}/{what}d"], name=f"{p}/{what}d")]
            result = f"{p}/{what}d"
        nodes.append(helper.make_node("Reshape", [result, f"{p}/flat"], [out], name=f"{p}/out"))
        position = list(graph.node).index(norm)
        graph.node.remove(norm)
        for offset, new in enumerate(nodes):
            graph.node.insert(position + offset, new)
        replaced.update(norm.input[1:3])
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    for held in [t for t in graph.initializer if t.name in replaced and t.name not in used]:
        graph.initializer.remove(held)  # the instance scales and biases no node reads any more
    for held in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in replaced - used]:
        graph.node.remove(held)
    return rewritten


def _input_rank(norm: Any, consumers: dict[str, list[Any]], array: Any) -> int:
    """The rank of the tensor a GroupNorm normalises, read from its affine weight (torch exports
    it as (C, 1, 1) for a 4-D input), following the InstanceNormalization's output through the
    Reshape back (and a Cast); 0 when the pattern is not there."""
    name = norm.output[0]
    for _ in range(3):  # [Cast ->] Reshape -> [Cast ->] Mul
        for node in consumers.get(name, []):
            if node.op_type == "Mul":
                for operand in node.input:
                    weight = array(operand)
                    if weight is not None and weight.ndim >= 1:
                        return weight.ndim + 1
            if node.op_type in ("Cast", "Reshape"):
                name = node.output[0]
                break
        else:
            return 0
    return 0
