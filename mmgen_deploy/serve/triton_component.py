"""Triton Python-backend model for ONE exported component (ensemble layout, `--component-backend python`).

Copied as `<repo>/mmgen_<component>/1/model.py` next to `model.onnx`. It runs the ONNX file with
ONNX Runtime on the CPU. It exists for servers without Triton's onnxruntime backend (such as the
tritonserver inside the nvidia-pytriton wheel); on the official container, the ensemble layout
uses the native onnxruntime backend (or TensorRT plans) instead and this file is not written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        model_config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in model_config["input"]]
        self.outputs = [tensor["name"] for tensor in model_config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        threads = int(model_config.get("parameters", {}).get("threads", {}).get("string_value", "0"))
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            feeds = {}
            for name in self.inputs:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                # A per-sample scalar travels as [batch, 1] (config.pbtxt reshape); the graph wants [batch].
                feeds[name] = array.reshape(-1) if self.ranks[name] == 1 else array
            try:
                results = self.session.run(self.outputs, feeds)
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: "
                                                                                       f"{exc}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(self.outputs, results,
                                                                                           strict=True)]))
        return responses
