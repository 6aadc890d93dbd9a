"""The deployable components (`specs.COMPONENTS`) as separate modules with plain tensor I/O.

These wrappers are what gets exported, built and compared: each takes and returns
tensors only (no configs, no tuples of optional things), in the dtypes TensorRT wants
(timesteps float32, class ids and code indices int32).
"""

from __future__ import annotations

import torch
from torch import nn

from mmgen_deploy.config import AudioConfig
from mmgen_deploy.models.autoencoder_kl import AutoencoderKL
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.text_encoder import TextEncoder
from mmgen_deploy.models.vqvae import VectorQuantizer, VQModel
from mmgen_deploy.specs import Tensors, denoiser_condition_names, denoiser_split, has_denoiser_parts


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


class KLEncoderComponent(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> latent (B, C, h, w): the KL posterior mean, scaled
    ((mean - shift_factor) * scaling_factor: what the DiT denoises)."""

    def __init__(self, kl: AutoencoderKL) -> None:
        super().__init__()
        self.kl = kl

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.kl.encode(image)


class KLDecoderComponent(nn.Module):
    """latent (B, C, h, w), scaled -> image (B, 3, H, W), roughly in [-1, 1]."""

    def __init__(self, kl: AutoencoderKL) -> None:
        super().__init__()
        self.kl = kl

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.kl.decode(latent)


class DenoiserComponent(nn.Module):
    """(x_t (B, C, h, w), t (B,) float32, class_ids (B,) int32[, guidance_scale (B,) float32 for a
    guidance-distilled student]) -> model output (B, C or 2C, h, w)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit
        self.condition_names = denoiser_condition_names(dit.config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.condition_names, conditions, strict=True))
        return self.dit(x_t, t, given[Tensors.CLASS_IDS], guidance=given.get(Tensors.GUIDANCE_SCALE))


class TextDenoiserComponent(nn.Module):
    """(x_t, t, *text conditions) -> model output; the conditions are the text encoder's
    outputs this DiT uses (`denoiser_condition_names`), in that order."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit
        self.condition_names = denoiser_condition_names(dit.config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.condition_names, conditions, strict=True))
        return self.dit(x_t, t, text=given.get(Tensors.TEXT_EMBEDDINGS), text_mask=given.get(Tensors.TEXT_MASK),
                        text_pooled=given.get(Tensors.TEXT_POOLED), guidance=given.get(Tensors.GUIDANCE_SCALE))


class _DenoiserPart(nn.Module):
    """Shared by the parts: the DiT, which blocks this part runs, and how the conditions are named."""

    def __init__(self, dit: DiT, part: str) -> None:
        super().__init__()
        self.dit = dit
        self.blocks = denoiser_split(dit.config)[part]
        self.condition_names = denoiser_condition_names(dit.config)

    def context(self, conditions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prompt tokens and key bias of a cross-attention DiT (its text_embeddings and text_mask)."""
        if not self.dit.config.uses_cross_attention:
            return None, None
        return self.dit.cross_context(*conditions[:2])


class DenoiserHeadComponent(_DenoiserPart):
    """(x_t, t, *conditions as the whole denoiser takes them) -> (hidden (B, N, D): the tokens after the
    head's blocks, embedding (B, D): the adaLN input every later block and the final layer read,
    modulated_input (B, N, D): the body's first block's attention input, the adaptive cache signal)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__(dit, "denoiser_head")
        self.body_start = denoiser_split(dit.config)["denoiser_body"].start

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                *conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        given = dict(zip(self.condition_names, conditions, strict=True))
        h, c = self.dit.embed(x_t, t, given.get(Tensors.CLASS_IDS), text_pooled=given.get(Tensors.TEXT_POOLED),
                              guidance=given.get(Tensors.GUIDANCE_SCALE))
        context, bias = self.context(conditions)  # text_embeddings, text_mask come first
        h = self.dit.run_blocks(h, c, self.blocks.start, self.blocks.stop, context, bias)
        return h, c, self.dit.modulated_input(h, c, self.body_start)


class DenoiserBodyComponent(_DenoiserPart):
    """(hidden, embedding[, text_embeddings, text_mask]) -> body_residual (B, N, D): what the middle
    blocks add to the tokens (the part a cache policy reuses)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__(dit, "denoiser_body")

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        tokens, bias = self.context(context)
        out = self.dit.run_blocks(hidden, embedding, self.blocks.start, self.blocks.stop, tokens, bias)
        return out - hidden


class DenoiserTailComponent(_DenoiserPart):
    """(hidden, body_residual, embedding[, text_embeddings, text_mask]) -> model_output: the tail's
    blocks and the final layer on hidden + body_residual."""

    def __init__(self, dit: DiT) -> None:
        super().__init__(dit, "denoiser_tail")

    def forward(self, hidden: torch.Tensor, body_residual: torch.Tensor, embedding: torch.Tensor,
                *context: torch.Tensor) -> torch.Tensor:
        tokens, bias = self.context(context)
        h = self.dit.run_blocks(hidden + body_residual, embedding, self.blocks.start, self.blocks.stop, tokens, bias)
        return self.dit.finish(h, embedding)


class TextEncoderComponent(nn.Module):
    """input_ids (B, L) int32 -> (text_embeddings (B, L, D), text_mask (B, L), text_pooled (B, D))."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.text_encoder(input_ids)


def build_components(first_stage: VQModel | AutoencoderKL, dit: DiT,
                     text_encoder: TextEncoder | None = None, *, parts: bool = False,
                     audio: AudioConfig | None = None) -> dict[str, nn.Module]:
    """All deployable components in eval mode, sharing weights with the models: the first
    stage's (VQ: encoder, quantizer, decoder; KL: encoder, decoder), the denoiser, the text encoder,
    the vocoder of an audio model (`audio`: its transform, `ModelConfig.audio`);
    with `parts`, the denoiser's parts after the denoiser when the DiT has them
    (`specs.component_names(config, parts=True)`)."""
    if dit.config.uses_text and text_encoder is None:
        raise ValueError("a text-conditioned DiT needs its text encoder")
    comps: dict[str, nn.Module]
    if isinstance(first_stage, AutoencoderKL):
        comps = {"encoder": KLEncoderComponent(first_stage), "decoder": KLDecoderComponent(first_stage)}
    else:
        comps = {"encoder": EncoderComponent(first_stage), "quantizer": QuantizerComponent(first_stage),
                 "decoder": DecoderComponent(first_stage)}
    comps["denoiser"] = TextDenoiserComponent(dit) if dit.config.uses_text else DenoiserComponent(dit)
    if parts and has_denoiser_parts(dit.config):
        comps.update({"denoiser_head": DenoiserHeadComponent(dit), "denoiser_body": DenoiserBodyComponent(dit),
                      "denoiser_tail": DenoiserTailComponent(dit)})
    if text_encoder is not None:
        comps["text_encoder"] = TextEncoderComponent(text_encoder)
    if audio is not None:
        from mmgen_deploy.models.vocoder import GriffinLimVocoder

        comps["vocoder"] = GriffinLimVocoder(audio)
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
