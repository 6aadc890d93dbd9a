"""KL autoencoder layouts: latent-diffusion / Stable Diffusion `.ckpt` first stages and diffusers'
`AutoencoderKL` folders.

The native `AutoencoderKL` uses LDM's parameter names, so an LDM checkpoint only needs
unwrapping (Lightning dict, `first_stage_model.` prefix, `loss.*` dropped: the same as a VQ
checkpoint, see `vq.unwrap_taming`) and its architecture read from shapes. A diffusers
AutoencoderKL has the same encoder and decoder as its VQModel (renamed the same way) and no
codebook. The image size is not stored in either layout; the DiT it pairs with fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmgen_deploy.config import KLConfig
from mmgen_deploy.errors import ConfigError
from mmgen_deploy.importers.safe_load import CheckpointError
from mmgen_deploy.importers.statedict import StateDict, fit_state, require
from mmgen_deploy.importers.vq import (
    DEFAULT_NORM_GROUPS,
    check_trunk_matches_config,
    read_encoder_trunk,
    rename_diffusers_autoencoder,
    unwrap_taming,
)
from mmgen_deploy.models.autoencoder_kl import AutoencoderKL

LDM_KL_LAYOUT = "LDM AutoencoderKL"
DIFFUSERS_KL_LAYOUT = "diffusers AutoencoderKL"
KL_CLASSES = ("AutoencoderKL",)
# Stable Diffusion's VAE (sd-vae-ft-ema / -mse, and the one every DiT checkpoint was trained on).
SD_SCALING_FACTOR = 0.18215


@dataclass
class KLArchitecture:
    """Everything about a KL autoencoder except the image size it will run at."""

    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # resolution levels (0 = full size) with attention (besides the mid block)
    z_channels: int
    embed_dim: int
    norm_groups: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_attention: bool
    state: StateDict  # native (LDM) names
    layout: str
    source: str
    default_image_size: int | None = None
    notes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def config(self, image_size: int) -> KLConfig:
        try:
            return KLConfig(image_size=image_size, in_channels=self.in_channels, base_channels=self.base_channels,
                            channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
                            attn_resolutions=tuple(image_size // 2**level for level in self.attn_levels),
                            z_channels=self.z_channels, embed_dim=self.embed_dim, norm_groups=self.norm_groups,
                            scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
                            use_quant_conv=self.use_quant_conv, use_post_quant_conv=self.use_post_quant_conv,
                            mid_attention=self.mid_attention)
        except ConfigError as exc:
            raise CheckpointError(f"{self.source}: {exc.message}",
                                  f"pick an image size divisible by the downsampling factor "
                                  f"{self.downsample_factor}") from None

    def build(self, image_size: int) -> tuple[KLConfig, AutoencoderKL]:
        config = self.config(image_size)
        model = AutoencoderKL(config)
        fit_state(model, dict(self.state), self.source, layout=self.layout)
        return config, model.eval()


def read_kl_architecture(state: StateDict, source: str, *, norm_groups: int = DEFAULT_NORM_GROUPS,
                         layout: str = LDM_KL_LAYOUT, scaling_factor: float = SD_SCALING_FACTOR,
                         shift_factor: float = 0.0) -> KLArchitecture:
    """Architecture of a KL autoencoder in native (LDM) names, read from tensor shapes."""
    def need(key: str) -> torch.Tensor:
        return require(state, key, source, layout)

    if "quantize.embedding.weight" in state:
        raise CheckpointError(f"{source} has a codebook (quantize.embedding.weight): it is a VQ model, "
                              "not a KL autoencoder")
    trunk = read_encoder_trunk(state, source, layout)
    in_channels, base, mult = trunk.in_channels, trunk.base_channels, trunk.channel_mult
    num_res_blocks, attn_levels = trunk.num_res_blocks, trunk.attn_levels
    moments = int(need("encoder.conv_out.weight").shape[0])
    if moments % 2:
        raise CheckpointError(f"{source}: encoder.conv_out.weight has {moments} output channels; a KL "
                              "encoder outputs mean and log-variance (an even number)")
    z_channels = moments // 2
    use_quant_conv = "quant_conv.weight" in state
    use_post_quant_conv = "post_quant_conv.weight" in state
    embed_dim = int(state["quant_conv.weight"].shape[0]) // 2 if use_quant_conv else z_channels
    if use_post_quant_conv and int(state["post_quant_conv.weight"].shape[1]) != embed_dim:
        raise CheckpointError(f"{source}: post_quant_conv.weight takes {int(state['post_quant_conv.weight'].shape[1])} "
                              f"channels but quant_conv makes {embed_dim}-channel latents")
    mid_attention = "encoder.mid.attn_1.q.weight" in state
    notes = [f"{layout}: base width {base}, channel_mult {mult}, {num_res_blocks} res blocks per level, "
             f"attention at levels {attn_levels or 'none'}{' (+ mid)' if mid_attention else ''}, "
             f"latent {embed_dim} channels (z {z_channels}), GroupNorm groups {norm_groups}, "
             f"latent scale {scaling_factor}" + (f", shift {shift_factor}" if shift_factor else "")]
    return KLArchitecture(in_channels=in_channels, base_channels=base, channel_mult=mult,
                          num_res_blocks=num_res_blocks, attn_levels=attn_levels, z_channels=z_channels,
                          embed_dim=embed_dim, norm_groups=norm_groups, scaling_factor=scaling_factor,
                          shift_factor=shift_factor, use_quant_conv=use_quant_conv,
                          use_post_quant_conv=use_post_quant_conv, mid_attention=mid_attention, state=state,
                          layout=layout, source=source, notes=notes)


def is_ldm_kl_state(state: StateDict) -> bool:
    """An LDM-layout first stage without a codebook (checked after unwrapping)."""
    keys = set(state)
    prefixed = any(k.startswith("first_stage_model.encoder.conv_in.") for k in keys)
    plain = any(k.startswith("encoder.conv_in.") for k in keys)
    codebook = any(k.endswith("quantize.embedding.weight") for k in keys)
    return (prefixed or plain) and not codebook


def import_ldm_kl(state: StateDict, source: str, *, norm_groups: int = DEFAULT_NORM_GROUPS,
                  scaling_factor: float | None = None) -> KLArchitecture:
    """An LDM / Stable Diffusion `.ckpt` (whole model or first stage only) -> KL architecture."""
    state, notes = unwrap_taming(state, source)
    scale = SD_SCALING_FACTOR if scaling_factor is None else scaling_factor
    arch = read_kl_architecture(state, source, norm_groups=norm_groups, scaling_factor=scale)
    if scaling_factor is None:
        notes.append(f"LDM checkpoints do not store the latent scale: using Stable Diffusion's {SD_SCALING_FACTOR}")
    arch.notes = notes + arch.notes
    return arch


def _diffusers_kl_options(cfg: dict[str, Any], source: str) -> list[str]:
    """Refuse options the native model cannot express; return notes on the ones recorded only."""
    problems = []
    levels = len(cfg.get("block_out_channels") or (64,))
    down = list(cfg.get("down_block_types") or ["DownEncoderBlock2D"] * levels)
    up = list(cfg.get("up_block_types") or ["UpDecoderBlock2D"] * levels)
    bad = [t for t in down + up if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
    if bad:
        problems.append(f"block types {bad}")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={cfg['act_fn']!r}")
    if cfg.get("out_channels", 3) != cfg.get("in_channels", 3):
        problems.append("out_channels != in_channels")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        problems.append("per-channel latents_mean / latents_std")
    if problems:
        raise CheckpointError(f"{source}: unsupported diffusers AutoencoderKL option(s): {'; '.join(problems)}",
                              "the native KL autoencoder is the LDM architecture; these variants are not")
    notes = []
    if cfg.get("force_upcast", True):
        notes.append("force_upcast=true recorded: the FP16 decoder keeps FP32 what overflows (see the export "
                     "manifest)")
    return notes


def import_diffusers_kl(cfg: dict[str, Any], state: StateDict, source: str) -> KLArchitecture:
    """diffusers AutoencoderKL (config.json dict + state dict) -> architecture with LDM-named weights."""
    notes = _diffusers_kl_options(cfg, source)
    renamed = rename_diffusers_autoencoder(cfg, state, source, DIFFUSERS_KL_LAYOUT, codebook=False)
    scaling = float(cfg.get("scaling_factor") or SD_SCALING_FACTOR)
    shift = float(cfg.get("shift_factor") or 0.0)
    arch = read_kl_architecture(renamed, source, norm_groups=int(cfg.get("norm_num_groups", 32)),
                                layout=DIFFUSERS_KL_LAYOUT, scaling_factor=scaling, shift_factor=shift)
    check_trunk_matches_config(arch.base_channels, arch.channel_mult, arch.num_res_blocks, cfg, source)
    for flag, have in (("use_quant_conv", arch.use_quant_conv), ("use_post_quant_conv", arch.use_post_quant_conv),
                       ("mid_block_add_attention", arch.mid_attention)):
        if bool(cfg.get(flag, True)) != have:
            raise CheckpointError(f"{source}: {flag}={cfg.get(flag, True)} in config.json does not match the "
                                  f"weights ({'present' if have else 'absent'})")
    arch.default_image_size = int(cfg["sample_size"]) if cfg.get("sample_size") else None
    arch.notes = arch.notes + notes
    arch.extras = {"scaling_factor": scaling, "shift_factor": shift,
                   "force_upcast": bool(cfg.get("force_upcast", True))}
    return arch
