"""The runner interface every backend implements (PyTorch, ONNX Runtime, TensorRT).

A runner executes one named component on NumPy feeds and returns NumPy outputs; the
tensor names, dtypes and shapes are those of `mmgen_deploy.specs.component_specs`.
The sampling loop only ever talks to this interface, so backends are interchangeable.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mmgen_deploy.errors import MMGenError
from mmgen_deploy.specs import ComponentSpec

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
# fp32 and fp16 name exported ONNX sets; bf16 is a runtime precision over the FP32 set (OpenVINO's
# bf16 inference hint, torch autocast).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")


@runtime_checkable
class Runner(Protocol):
    """Runs deployable components. `backend` is e.g. "torch", "onnxruntime", "openvino", "tensorrt";
    `precision` "fp32", "fp16" or "bf16"; `device` e.g. "cpu", "cuda", "cuda:0"."""

    backend: str
    precision: str
    device: str

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `component` ("encoder", "quantizer", "decoder", "denoiser") on `feeds`.

        The returned arrays may be buffers the runner reuses on the next call of the same
        component (preallocated outputs): copy them if they must outlive that call.
        """
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


def check_feeds(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> int:
    """Validate feeds against the component spec; return the batch size.

    Catches wrong names, dtypes and shapes with a message naming the tensor, before a
    backend fails with its own, less helpful error.
    """
    missing = [n for n in spec.input_names if n not in feeds]
    extra = [n for n in feeds if n not in spec.input_names]
    if missing or extra:
        raise MMGenError(f"{spec.name}: feeds must be exactly {spec.input_names}; "
                         f"missing {missing}, unexpected {extra}")
    batch = int(feeds[spec.inputs[0].name].shape[0])
    for tensor in spec.inputs:
        array = feeds[tensor.name]
        if array.dtype != np.dtype(tensor.dtype):
            raise MMGenError(f"{spec.name}.{tensor.name}: dtype {array.dtype}, expected {tensor.dtype}")
        expected = tensor.concrete_shape(batch)
        if tuple(array.shape) != expected:
            raise MMGenError(f"{spec.name}.{tensor.name}: shape {tuple(array.shape)}, expected {expected}")
    return batch
