"""What a stage will cost before it runs: FLOPs per sample, weight bytes, memory, threads.

The costs are counted on a copy of the model built on torch's `meta` device (no memory, no
arithmetic: well under a second even for a DiT-XL/2), so every decision here is a function
of the architecture alone and the same on every machine: validation batch sizes and
calibration sample counts (by FLOPs), and the memory check before a stage (by bytes).

Memory estimates are peaks of the whole process, measured on the 2-core 24 GB machine
with a DiT-XL/2 + 256 px VQ-f8 pair (docs/design/export-memory.md) and written
as multiples of the component's FP32 weight bytes plus a fixed base; they are meant to be
pessimistic by ~15 %, so that a refusal comes before the kernel's OOM killer and not
instead of a run that would have fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.memory import GB, InsufficientMemoryError, available_bytes, check_memory, rss_bytes

__all__ = ["GB", "InsufficientMemoryError", "available_bytes", "check_memory", "rss_bytes"]

# Everything an mmgen process holds before any model: torch, onnx, onnxruntime, ModelOpt.
BASE_BYTES = int(1.0 * GB)
# Calibration / validation cost targets (GFLOP), see `calibration_samples` and validate.py.
CALIBRATION_GFLOP_BUDGET = 2000.0
MIN_CALIBRATION_SAMPLES = 4


# A CPU moves ~16x fewer bytes per second than it does FLOPs: a memory-bound component (the
# quantizer's 1024 x 16384 distance table per 256 px image) costs time the FLOP count misses.
FLOP_PER_BYTE_WRITTEN = 16.0


@dataclass(frozen=True)
class ComponentCost:
    name: str
    gflop_per_sample: float  # one forward of one batch row (2 FLOPs per multiply-add)
    weight_bytes: int  # FP32 parameters and buffers
    bytes_written_per_sample: int = 0  # every op's outputs of one forward of one batch row

    @property
    def cost_gflop(self) -> float:
        """What decides batch sizes and sample counts: FLOPs plus the memory traffic, in GFLOP."""
        return self.gflop_per_sample + FLOP_PER_BYTE_WRITTEN * self.bytes_written_per_sample / 1e9

    @property
    def heavy(self) -> bool:
        """Worth more than one thread (a tiny component runs fastest on one)."""
        return self.cost_gflop >= 1.0


def component_costs(config: ModelConfig) -> dict[str, ComponentCost]:
    """Per component of `config` (the denoiser's parts too): GFLOP per sample and FP32 weight bytes,
    counted on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen_deploy.config import KLConfig
    from mmgen_deploy.models import AutoencoderKL, DiT, TextEncoder, VQModel, build_components
    from mmgen_deploy.specs import component_specs

    with torch.device("meta"):
        first = config.first_stage
        vq: VQModel | AutoencoderKL = AutoencoderKL(first) if isinstance(first, KLConfig) else VQModel(first)
        dit = DiT(config.dit)
        text = TextEncoder(config.text) if config.uses_text and config.text is not None else None
    # Buffers made from NumPy tables (position embeddings) are created on the CPU: move them too.
    vq, dit = vq.to("meta").eval(), dit.to("meta").eval()
    if text is not None:
        text = text.to("meta").eval()
    # The vocoder's DFT bases are made on the CPU when it is built: to meta with the rest.
    modules = {name: module.to("meta") for name, module in
               build_components(vq, dit, text, parts=True, audio=config.audio).items()}
    specs = component_specs(config, parts=True)
    costs = {}
    for name, module in modules.items():
        spec = specs[name]
        feeds = spec.make_inputs(1, np.random.default_rng(0))
        args = [torch.from_numpy(feeds[n]).to("meta") for n in spec.input_names]
        counter, written = FlopCounterMode(display=False), _BytesWritten()
        with torch.no_grad(), counter, written:
            module(*args)
        weight = sum(p.numel() * p.element_size() for p in module.parameters())
        weight += sum(b.numel() * b.element_size() for b in module.buffers())
        costs[name] = ComponentCost(name, counter.get_total_flops() / 1e9, int(weight), written.total)
    return costs


def _bytes_written_mode() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    class BytesWritten(TorchDispatchMode):  # type: ignore[misc]
        """Sums the bytes of every op's tensor outputs (works on meta tensors)."""

        def __init__(self) -> None:
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            import torch

            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor):
                    self.total += tensor.numel() * tensor.element_size()
            return out

    return BytesWritten


def _BytesWritten() -> Any:
    return _bytes_written_mode()()


def calibration_samples(cost: ComponentCost, available: int) -> int:
    """How many of the `available` calibration samples the FP16 range analysis of a component runs:
    all of them for cheap components, fewer (never under 4) when that would cost over
    CALIBRATION_GFLOP_BUDGET (a 256 px VQ decoder: 622 GFLOP per image)."""
    if cost.cost_gflop <= 0:
        return available
    affordable = int(CALIBRATION_GFLOP_BUDGET // cost.cost_gflop)
    return max(min(available, MIN_CALIBRATION_SAMPLES), min(available, affordable))


CALIBRATION_ACTIVATION_BUDGET = 1 << 30  # bytes of intermediate tensors one range-analysis batch may hold


def calibration_batch(cost: ComponentCost, most: int) -> int:
    """Samples per range-analysis batch: as many as keep every intermediate tensor of the batch
    (counted on the torch side: ONNX shape inference loses the spatial sizes after a GroupNorm's
    reshape) under ~1 GB. One 256 px image for a VQ-f8 encoder or decoder."""
    per_sample = max(1, cost.bytes_written_per_sample)
    return max(1, min(most, CALIBRATION_ACTIVATION_BUDGET // per_sample))


def threads_for(cost: ComponentCost) -> int:
    """ONNX Runtime / torch threads for a component: one for tiny graphs, every core for large ones."""
    return max(1, min(os.cpu_count() or 1, 8)) if cost.heavy else 1


# Stage peaks as multiples of the component's FP32 weights, on top of BASE_BYTES. Fitted on the
# DiT-XL/2 + VQ-f8 export (2.7 GB denoiser; per-stage peaks sampled once a second; benchmarks/RESULTS.md,
# "DiT-XL/2 + VQ-f8 pair") and rounded up by ~15 %, so a refusal comes before the OOM killer, not instead of a fit.
# torch export: the module plus the exporter's copy of the weights during constant folding
# (XL denoiser: 4.4 GB with the VQ still loaded, i.e. ~1.3x).
EXPORT_WEIGHT_FACTOR = 1.6
# ONNX Runtime validation: the session's weights (FP32 graph; the FP16 graph's weights are cast
# back to FP32 by ORT's CPU provider, so about the same), the torch module already freed.
SESSION_WEIGHT_FACTOR = 1.6
# AutoCast: its model, the converter's deep copy and the FP16 initializers it makes (XL denoiser:
# 7.3 GB, i.e. ~2.3x; before its shape inference ran on weightless views, 17 GB).
AUTOCAST_WEIGHT_FACTOR = 2.6
