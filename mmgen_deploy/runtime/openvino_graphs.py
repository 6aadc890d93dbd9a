"""The spec's FP32 scopes kept FP32 in OpenVINO under a BF16 or FP16 inference hint.

Under INFERENCE_PRECISION_HINT bf16 the CPU plugin lowers every elementwise op and every tensor
between them to BF16, not only the matmuls and convolutions as torch.autocast does. For the
denoiser's timestep path (`fp32_scopes=("dit.t_embedder",)`) that rounds the timestep itself to 8
bits at the first op, measured with OpenVINO 2026.4: t = 996 and 997 gave identical outputs, as did
998, 999 and 1000, so the model ran at t = 1000 when asked for 999. It rounds t*f too, the
sinusoid's phase (up to 1000 rad), to 8 bits.

The plugin leaves a node at its graph's precision when the node carries OpenVINO's
DisablePrecisionConversion runtime attribute. Python cannot set that attribute (a node's RTMap takes
strings and integers only), but OpenVINO's IR reader builds it from XML. So `keep_scopes_fp32` cuts
the scopes' nodes out into a small model, writes it as IR with the attribute on each layer, reads it
back and splices the copy in place of the originals. Only the scopes' own constants pass through
the IR (the timestep MLP: 3.1 MB for DiT-B/2, 6.5 MB for XL/2, measured), never the whole graph.

Two kinds of node lose the mark inside the plugin (measured):
- Unsqueeze and Squeeze, which the plugin rebuilds as its own Reshape node. They are replaced by a
  Reshape here first, which keeps it.
- MatMul, which becomes the plugin's FullyConnected node. The scopes' matmuls (the timestep MLP)
  therefore still run BF16, as they do under torch.autocast. Their input embedding is exact.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.specs import scope_regex

# Bumped when what `keep_scopes_fp32` does to a graph changes: it is part of a compiled blob's key.
REWRITE_VERSION = 1

# From any type, to neither of the low precisions: the attribute as OpenVINO's IR spells it.
_KEEP_ATTRIBUTE = '<attribute name="DisablePrecisionConversion" version="0" value="dynamic:bf16,f16" />'
_NOT_MARKED = ("Parameter", "Constant", "Result")
_RESHAPED = ("Unsqueeze", "Squeeze")


def in_scopes(model: Any, scopes: Sequence[str]) -> list[Any]:
    """The nodes of `model` whose names place them in one of the module `scopes` (constants,
    parameters and results excepted), in topological order."""
    patterns = [re.compile(scope_regex(scope)) for scope in scopes]
    return [op for op in model.get_ordered_ops()
            if op.get_type_name() not in _NOT_MARKED and any(p.match(op.get_friendly_name()) for p in patterns)]


def _reshape_instead(ov: Any, op: Any) -> None:
    """Replace an Unsqueeze or Squeeze by the equivalent Reshape of the same name (the plugin
    drops the mark of the former). Left alone when more than one output axis is dynamic."""
    shape = op.get_output_partial_shape(0)
    if shape.rank.is_dynamic:
        return
    dims = [d.get_length() if d.is_static else -1 for d in shape]
    if dims.count(-1) > 1:
        return
    opset = ov.opset13
    target = opset.constant(np.array(dims, dtype=np.int64))
    reshape = opset.reshape(op.input_value(0), target, special_zero=False)
    reshape.set_friendly_name(op.get_friendly_name())
    op.output(0).replace(reshape.output(0))


def keep_scopes_fp32(ov: Any, core: Any, model: Any, scopes: Sequence[str]) -> int:
    """Make OpenVINO run the nodes of `model` (read from an exported graph) that lie in the module
    `scopes` at their FP32 precision under a BF16 or FP16 hint, in place. Returns how many nodes
    were marked (0: none in the scopes, the model is unchanged)."""
    for op in in_scopes(model, scopes):
        if op.get_type_name() in _RESHAPED:
            _reshape_instead(ov, op)
    selected = in_scopes(model, scopes)
    if not selected:
        return 0
    members = {op.get_name() for op in selected}

    # Inputs from outside the scopes (the timestep Parameter) become the small model's parameters.
    externals: list[Any] = []
    parameters: list[Any] = []
    by_source: dict[tuple[str, int], Any] = {}
    for op in selected:
        for port in op.inputs():
            source = port.get_source_output()
            node = source.get_node()
            if node.get_name() in members or node.get_type_name() == "Constant":
                continue
            key = (node.get_name(), source.get_index())
            if key not in by_source:
                by_source[key] = ov.opset13.parameter(source.get_partial_shape(), source.get_element_type(),
                                                      name=f"scope_input_{len(parameters)}")
                externals.append(source)
                parameters.append(by_source[key])
            port.replace_source_output(by_source[key].output(0))
    # Outputs used outside the scopes (by the rest of the graph) become its results.
    boundary = [out for op in selected for out in op.outputs()
                if any(t.get_node().get_name() not in members for t in out.get_target_inputs())]
    results = [ov.opset13.result(out, name=f"scope_output_{i}") for i, out in enumerate(boundary)]
    scoped = ov.Model(results, parameters, "fp32_scopes")

    with tempfile.TemporaryDirectory(prefix="mmgen-openvino-scopes-") as folder:
        xml_path, bin_path = Path(folder) / "scopes.xml", Path(folder) / "scopes.bin"
        ov.save_model(scoped, str(xml_path), compress_to_fp16=False)
        names = {op.get_friendly_name() for op in selected}
        text = re.sub(r'(<layer id="\d+" name="([^"]*)"[^>]*>)',
                      lambda m: m.group(1) + f"<rt_info>{_KEEP_ATTRIBUTE}</rt_info>" if m.group(2) in names
                      else m.group(1), xml_path.read_text())
        # Copied into memory (not mapped from the file): the folder is gone once this returns.
        weights = ov.Tensor(np.fromfile(bin_path, dtype=np.uint8)) if bin_path.stat().st_size \
            else ov.Tensor(np.zeros(0, dtype=np.uint8))
        copy = core.read_model(text, weights)

    # Matched by name, not by position: the IR need not keep the order of parameters and results.
    read_parameters = {p.get_friendly_name(): p for p in copy.get_parameters()}
    read_results = {r.get_friendly_name(): r for r in copy.get_results()}
    for i, source in enumerate(externals):
        for port in list(read_parameters[f"scope_input_{i}"].output(0).get_target_inputs()):
            port.replace_source_output(source)
    old_results = {r.get_name() for r in results}
    for i, out in enumerate(boundary):
        replacement = read_results[f"scope_output_{i}"].input_value(0)
        for port in list(out.get_target_inputs()):
            if port.get_node().get_name() not in old_results:
                port.replace_source_output(replacement)
    model.validate_nodes_and_infer_types()
    return len(selected)
