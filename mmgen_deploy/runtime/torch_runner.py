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
    """Runs the components (the first stage's, the denoiser, the text encoder) eagerly in PyTorch on CPU
    or CUDA: FP32, or `precision="bf16"` under `torch.autocast(device, torch.bfloat16)` (the fair eager
    peer of OpenVINO bf16: oneDNN runs autocast's BF16 matmuls and convolutions on AMX / AVX-512 BF16).
    Components the spec keeps FP32 (the quantizer) run FP32 at every precision; outputs are FP32.

    Built from in-memory models (training, parity's reference) or, like every backend, with
    `from_run_dir(run, precision, device, threads=...)`.
    """

    def __init__(self, vq: VQModel | AutoencoderKL, dit: DiT, device: str = "cpu", *, config: ModelConfig | None = None,
                 text_encoder: TextEncoder | None = None, precision: str = "fp32") -> None:
        import torch

        from mmgen_deploy.config import ModelConfig
        from mmgen_deploy.models import build_components

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NotAvailableError(f"device {device!r} requested but torch sees no CUDA device",
                                    "use {device} cpu", params=["device"])
        if not (device == "cpu" or device.startswith("cuda")):
            raise UsageError(f"unknown torch device {device!r}", "use cpu, cuda or cuda:N")
        super().__init__(config or ModelConfig(first_stage=vq.config, dit=dit.config,
                                               text=text_encoder.config if text_encoder is not None else None),
                         precision, device)
        self._torch = torch
        self.modules = {name: module.to(device)
                        for name, module in build_components(vq, dit, text_encoder, parts=True,
                                                             audio=self.config.audio).items()}

    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, threads: int | None = None,
              **_other: Any) -> TorchRunner:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from mmgen_deploy.models.load import load_deployable

        parts = load_deployable(run)
        return cls(parts.first_stage, parts.dit, device, config=parts.config, text_encoder=parts.text_encoder,
                   precision=precision)

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        module = self.modules[spec.name]
        bf16 = self.precision == "bf16" and not spec.keep_fp32
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
        with torch.inference_mode(), autocast:
            args = [torch.from_numpy(feeds[name]).to(self.device) for name in spec.input_names]
            result = module(*args)
        outputs = result if isinstance(result, tuple) else (result,)
        return {t.name: out.to(getattr(torch, t.dtype)).cpu().numpy()
                for t, out in zip(spec.outputs, outputs, strict=True)}

    def close(self) -> None:
        self.modules.clear()
