"""PyTorch eager backend: the reference every other backend is compared against."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy.errors import NotAvailableError, UsageError
from mmgen_deploy.runtime.base import check_feeds
from mmgen_deploy.specs import component_specs

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.models import DiT, TextEncoder, VQModel


# Precisions eager PyTorch runs: FP32, or BF16 through autocast (the fair eager peer of
# OpenVINO bf16: oneDNN runs autocast's BF16 matmuls and convolutions on AMX / AVX-512 BF16).
TORCH_PRECISIONS = ("fp32", "bf16")


class TorchRunner:
    """Runs the components (four, or five with a text encoder) eagerly in PyTorch on CPU or CUDA:
    FP32, or `precision="bf16"` under `torch.autocast(device, torch.bfloat16)`. Components the
    spec keeps FP32 (the quantizer) run FP32 at every precision; outputs are always FP32."""

    backend = "torch"

    def __init__(self, vq: VQModel, dit: DiT, device: str = "cpu", *, config: ModelConfig | None = None,
                 text_encoder: TextEncoder | None = None, precision: str = "fp32") -> None:
        import torch

        if precision not in TORCH_PRECISIONS:
            raise UsageError(f"the torch backend runs {' or '.join(TORCH_PRECISIONS)}, not {precision!r}",
                             "use --backend onnxruntime --precision fp16 or --backend tensorrt for FP16")
        self.precision = precision

        from mmgen_deploy.config import ModelConfig
        from mmgen_deploy.models import build_components

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NotAvailableError(f"device {device!r} requested but torch sees no CUDA device",
                                    "use --device cpu")
        if not (device == "cpu" or device.startswith("cuda")):
            raise UsageError(f"unknown torch device {device!r}", "use cpu, cuda or cuda:N")
        self.device = device
        self._torch = torch
        self.config = config or ModelConfig(vq=vq.config, dit=dit.config,
                                            text=text_encoder.config if text_encoder is not None else None)
        self.specs = component_specs(self.config)
        self.components = {name: module.to(device)
                           for name, module in build_components(vq, dit, text_encoder).items()}

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str], device: str = "cpu", precision: str = "fp32",
                     **options: Any) -> TorchRunner:
        from mmgen_deploy.rundir import RunDir

        run = RunDir(run_dir)
        config, vq, dit = run.load_models()
        text_encoder = run.load_text_encoder(config) if config.uses_text else None
        return cls(vq, dit, device, config=config, text_encoder=text_encoder, precision=precision, **options)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs.get(component)
        if spec is None:
            raise UsageError(f"unknown component {component!r}", f"one of {', '.join(self.specs)}")
        check_feeds(spec, feeds)
        torch = self._torch
        module = self.components[component]
        bf16 = self.precision == "bf16" and not spec.keep_fp32
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
        with torch.inference_mode(), autocast:
            args = [torch.from_numpy(feeds[name]).to(self.device) for name in spec.input_names]
            result = module(*args)
        outputs = result if isinstance(result, tuple) else (result,)
        return {t.name: out.to(getattr(torch, t.dtype)).cpu().numpy()
                for t, out in zip(spec.outputs, outputs, strict=True)}

    def close(self) -> None:
        self.components.clear()
