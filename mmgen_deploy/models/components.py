"""The four deployable components as separate modules with plain tensor I/O.

These wrappers are what gets exported, built and compared: each takes and returns
tensors only (no configs, no tuples of optional things), in the dtypes TensorRT wants
(timesteps float32, class ids and code indices int32).
"""

from __future__ import annotations

import torch
from torch import nn

from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.vqvae import VectorQuantizer, VQModel


class EncoderComponent(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> h (B, D, h, w): the pre-quantization latent."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vq.encoder, vq.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(image))


class QuantizerComponent(nn.Module):
    """h (B, D, h, w) -> (z_q (B, D, h, w), indices (B, h, w) int32)."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.quantize = vq.quantize

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize.quantize(h)


class DecoderComponent(nn.Module):
    """z_q (B, D, h, w) -> image (B, 3, H, W), roughly in [-1, 1]."""

    def __init__(self, vq: VQModel) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder = vq.post_quant_conv, vq.decoder

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))


class DenoiserComponent(nn.Module):
    """(x_t (B, C, h, w), t (B,) float32, class_ids (B,) int32) -> model output (B, C or 2C, h, w)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.dit(x_t, t, class_ids)


COMPONENT_NAMES = ("encoder", "quantizer", "decoder", "denoiser")


def build_components(vq: VQModel, dit: DiT) -> dict[str, nn.Module]:
    """All deployable components in eval mode, sharing weights with `vq` and `dit`."""
    comps: dict[str, nn.Module] = {
        "encoder": EncoderComponent(vq),
        "quantizer": QuantizerComponent(vq),
        "decoder": DecoderComponent(vq),
        "denoiser": DenoiserComponent(dit),
    }
    return {name: module.eval() for name, module in comps.items()}


@torch.no_grad()
def rerandomize_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give zero-initialised tensors random values, in place.

    A fresh DiT outputs exactly zero (adaLN-Zero) and a fresh codebook is a tiny
    uniform blob, so comparing two runtimes on fresh weights proves nothing. Parity
    tests call this first. Every all-zero parameter is redrawn; the VQ codebook is
    redrawn as N(0, 1) so code distances are well separated.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):
            continue
        if torch.count_nonzero(param) == 0:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    for module in model.modules():
        if isinstance(module, VectorQuantizer):
            codes = torch.randn(module.embedding.weight.shape, generator=gen)
            module.embedding.weight.copy_(codes)
            module.ema_embed_sum.copy_(codes)
    return model
