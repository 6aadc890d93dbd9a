"""PyTorch eager backend: the reference every other backend is compared against."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy.errors import NotAvailableError, UsageError
from mmgen_deploy.runtime.base import BaseRunner
from mmgen_deploy.specs import ComponentSpec

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.models import AutoencoderKL, DiT, TextEncoder, VQModel
    from mmgen_deploy.rundir import RunDir


class TorchRunner(BaseRunner):
    """Runs the components (the first stage's, the denoiser, the text encoder) eagerly in PyTorch, FP32,
    on CPU or CUDA.

    Built from in-memory models (training, parity's reference) or, like every backend, with
    `from_run_dir(run, precision, device, threads=...)`.
    """

    backend = "torch"
    precisions = ("fp32",)
    precision_hint = "it runs FP32 only: use --backend onnxruntime --precision fp16 or --backend tensorrt"

    def __init__(self, vq: VQModel | AutoencoderKL, dit: DiT, device: str = "cpu", *, config: ModelConfig | None = None,
                 text_encoder: TextEncoder | None = None) -> None:
        import torch

        from mmgen_deploy.config import ModelConfig
        from mmgen_deploy.models import build_components

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NotAvailableError(f"device {device!r} requested but torch sees no CUDA device",
                                    "use --device cpu")
        if not (device == "cpu" or device.startswith("cuda")):
            raise UsageError(f"unknown torch device {device!r}", "use cpu, cuda or cuda:N")
        super().__init__(config or ModelConfig(vq=vq.config, dit=dit.config,
                                               text=text_encoder.config if text_encoder is not None else None),
                         "fp32", device)
        self._torch = torch
        self.modules = {name: module.to(device)
                        for name, module in build_components(vq, dit, text_encoder).items()}

    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, threads: int | None = None,
              **_other: Any) -> TorchRunner:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        parts = run.load_deployable()
        return cls(parts.vq, parts.dit, device, config=parts.config, text_encoder=parts.text_encoder)

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        module = self.modules[spec.name]
        with torch.inference_mode():
            args = [torch.from_numpy(feeds[name]).to(self.device) for name in spec.input_names]
            result = module(*args)
        outputs = result if isinstance(result, tuple) else (result,)
        return {name: out.cpu().numpy() for name, out in zip(spec.output_names, outputs, strict=True)}

    def close(self) -> None:
        self.modules.clear()
