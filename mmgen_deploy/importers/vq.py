"""VQ autoencoder layouts: taming-transformers / latent-diffusion checkpoints and diffusers' VQModel.

The native `VQModel` uses taming's parameter names, so a taming/LDM checkpoint only
needs unwrapping (Lightning dict, `first_stage_model.` prefix, `loss.*` dropped) and its
architecture read from shapes. diffusers' VQModel is the same network under other names
(`down_blocks.{i}.resnets.{j}`, attention as Linear layers, decoder levels stored in
reverse order); it is renamed and checked tensor by tensor.

The image size is not stored in either layout (the network is fully convolutional); the
caller supplies it, since it fixes the latent size and where attention sits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgen_deploy.config import VQConfig
from mmgen_deploy.errors import ConfigError
from mmgen_deploy.importers.safe_load import CheckpointError
from mmgen_deploy.importers.statedict import StateDict, count_indexed, fit_state, require
from mmgen_deploy.models.vqvae import VQModel

TAMING_LAYOUT = "taming/LDM VQ"
DIFFUSERS_LAYOUT = "diffusers VQModel"
# taming and diffusers both default to 32 groups; GroupNorm stores no group count.
DEFAULT_NORM_GROUPS = 32


@dataclass
class VQArchitecture:
    """Everything about a VQ model except the image size it will run at."""

    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # resolution levels (0 = full size) that have attention
    z_channels: int
    embed_dim: int
    n_embed: int
    norm_groups: int
    state: StateDict  # native (taming) names
    layout: str
    source: str
    default_image_size: int | None = None
    notes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def config(self, image_size: int) -> VQConfig:
        factor = 2 ** (len(self.channel_mult) - 1)
        try:
            return VQConfig(image_size=image_size, in_channels=self.in_channels, base_channels=self.base_channels,
                            channel_mult=self.channel_mult, num_res_blocks=self.num_res_blocks,
                            attn_resolutions=tuple(image_size // 2**level for level in self.attn_levels),
                            z_channels=self.z_channels, embed_dim=self.embed_dim, n_embed=self.n_embed,
                            norm_groups=self.norm_groups, use_ema=False)
        except ConfigError as exc:
            raise CheckpointError(f"{self.source}: {exc.message}",
                                  f"pick an image size divisible by the downsampling factor {factor}") from None

    def build(self, image_size: int) -> tuple[VQConfig, VQModel]:
        config = self.config(image_size)
        model = VQModel(config)
        state = dict(self.state)
        # EMA statistics are training state that these layouts do not have; start them from
        # the codebook (what a fresh EMA quantizer holds) so that fine-tuning here is sane.
        codes = state["quantize.embedding.weight"]
        state.setdefault("quantize.ema_embed_sum", codes.detach().clone())
        state.setdefault("quantize.ema_cluster_size", torch.zeros(codes.shape[0]))
        fit_state(model, state, self.source, layout=self.layout)
        return config, model.eval()


def unwrap_taming(state: StateDict, source: str) -> tuple[StateDict, list[str]]:
    """Keep the first-stage (VQ) tensors of a taming / LDM state dict, without prefix and loss."""
    notes = []
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        others = sum(not k.startswith(prefix) for k in state)
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if others:
            notes.append(f"kept the {len(state)} first_stage_model.* tensors, ignored {others} others "
                         "(the rest of the latent-diffusion model)")
    ema = {k[len("model_ema."):]: v for k, v in state.items() if k.startswith("model_ema.")}
    if ema:
        # latent-diffusion's LitEma keeps a copy of every parameter under its name without dots.
        state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
        replaced = 0
        for key in state:
            flat = key.replace(".", "")
            if flat in ema and ema[flat].shape == state[key].shape:
                state[key] = ema[flat]
                replaced += 1
        notes.append(f"using the EMA copy (model_ema.*) of {replaced} tensors")
    dropped = [k for k in state if k.startswith("loss.")]
    if dropped:
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        notes.append(f"dropped {len(dropped)} loss.* tensors (training-only discriminator / perceptual loss)")
    return state, notes


@dataclass(frozen=True)
class EncoderTrunk:
    """What the taming / LDM encoder's shapes say about the resolution levels, shared by VQ models
    and KL autoencoders (the decoder mirrors it)."""

    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # levels (0 = full size) with attention besides the mid block


def read_encoder_trunk(state: StateDict, source: str, layout: str) -> EncoderTrunk:
    """The encoder's levels, widths, res blocks and attention, read from taming-named tensor shapes."""
    conv_in = require(state, "encoder.conv_in.weight", source, layout)
    base, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = count_indexed(state, "encoder.down.", ".block.0.conv1.weight")
    if levels == 0:
        raise CheckpointError(f"{source} has no encoder.down.0.block.0.conv1.weight: not a {layout} model")
    mult = []
    for level in range(levels):
        width = int(require(state, f"encoder.down.{level}.block.0.conv2.weight", source, layout).shape[0])
        if width % base:
            raise CheckpointError(f"{source}: encoder level {level} has {width} channels, not a multiple of "
                                  f"the base width {base}")
        mult.append(width // base)
    return EncoderTrunk(in_channels=in_channels, base_channels=base, channel_mult=tuple(mult),
                        num_res_blocks=count_indexed(state, "encoder.down.0.block.", ".conv1.weight"),
                        attn_levels=tuple(lv for lv in range(levels) if f"encoder.down.{lv}.attn.0.q.weight" in state))


def read_taming_architecture(state: StateDict, source: str, *, norm_groups: int = DEFAULT_NORM_GROUPS,
                             layout: str = TAMING_LAYOUT) -> VQArchitecture:
    """Architecture of a VQ model in native (taming) names, read from tensor shapes."""
    def need(key: str) -> torch.Tensor:
        return require(state, key, source, layout)

    if "quantize.embedding.weight" not in state and "encoder.conv_in.weight" in state:
        raise CheckpointError(f"{source} has an encoder but no codebook (quantize.embedding.weight): it looks "
                              "like a KL autoencoder, not a VQ model", "import a VQ (VQGAN / LDM VQ-f4/f8) model")
    codes = need("quantize.embedding.weight")
    trunk = read_encoder_trunk(state, source, layout)
    in_channels, base, mult = trunk.in_channels, trunk.base_channels, trunk.channel_mult
    num_res_blocks, attn_levels = trunk.num_res_blocks, trunk.attn_levels
    z_channels = int(need("encoder.conv_out.weight").shape[0])
    embed_dim, quant_in = (int(s) for s in need("quant_conv.weight").shape[:2])
    if quant_in != z_channels:
        raise CheckpointError(f"{source}: quant_conv.weight takes {quant_in} channels but the encoder outputs "
                              f"{z_channels} (a KL autoencoder's doubled output?)")
    n_embed = int(codes.shape[0])
    if int(codes.shape[1]) != embed_dim:
        raise CheckpointError(f"{source}: quantize.embedding.weight {tuple(codes.shape)} does not match "
                              f"quant_conv's {embed_dim} output channels")
    notes = [f"{layout}: base width {base}, channel_mult {mult}, {num_res_blocks} res blocks per level, "
             f"attention at levels {attn_levels or 'none'} (+ mid), z {z_channels}, codebook {n_embed}x{embed_dim}, "
             f"GroupNorm groups {norm_groups}"]
    return VQArchitecture(in_channels=in_channels, base_channels=base, channel_mult=mult,
                          num_res_blocks=num_res_blocks, attn_levels=attn_levels, z_channels=z_channels,
                          embed_dim=embed_dim, n_embed=n_embed, norm_groups=norm_groups, state=state,
                          layout=layout, source=source, notes=notes)


def import_taming_vq(state: StateDict, source: str, *, norm_groups: int = DEFAULT_NORM_GROUPS) -> VQArchitecture:
    state, notes = unwrap_taming(state, source)
    arch = read_taming_architecture(state, source, norm_groups=norm_groups)
    arch.notes = notes + arch.notes
    return arch


# diffusers name -> taming name, applied in order to every key (first match wins).
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               # names of diffusers' deprecated attention block, still found in old files
               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "nin_shortcut"}


def _rename_diffusers_vq_key(key: str, levels: int) -> str | None:
    """One diffusers VQModel key in taming names, or None when it is not part of the layout."""
    tail = r"\.(weight|bias)$"
    for side in ("encoder", "decoder"):
        if key in (f"{side}.conv_in.weight", f"{side}.conv_in.bias", f"{side}.conv_out.weight",
                   f"{side}.conv_out.bias"):
            return key
        m = re.match(rf"{side}\.conv_norm_out{tail}", key)
        if m:
            return f"{side}.norm_out.{m.group(1)}"
        m = re.match(rf"{side}\.mid_block\.resnets\.([01])\.(\w+){tail}", key)
        if m and m.group(2) in _RESNET_NAMES:
            return f"{side}.mid.block_{int(m.group(1)) + 1}.{_RESNET_NAMES[m.group(2)]}.{m.group(3)}"
        m = re.match(rf"{side}\.mid_block\.attentions\.0\.([\w.]+?){tail}", key)
        if m and m.group(1) in _ATTN_NAMES:
            return f"{side}.mid.attn_1.{_ATTN_NAMES[m.group(1)]}.{m.group(2)}"
        blocks, native, sampler = (("down_blocks", "down", "downsamplers") if side == "encoder"
                                   else ("up_blocks", "up", "upsamplers"))
        m = re.match(rf"{side}\.{blocks}\.(\d+)\.(resnets|attentions|{sampler})\.(\d+)\.([\w.]+?){tail}", key)
        if not m:
            continue
        index, kind, j, name, suffix = int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
        # diffusers stores decoder blocks lowest resolution first; taming by level (level 0 = full size).
        level = index if side == "encoder" else levels - 1 - index
        if kind == "resnets" and name in _RESNET_NAMES:
            return f"{side}.{native}.{level}.block.{j}.{_RESNET_NAMES[name]}.{suffix}"
        if kind == "attentions" and name in _ATTN_NAMES:
            return f"{side}.{native}.{level}.attn.{j}.{_ATTN_NAMES[name]}.{suffix}"
        if kind == sampler and j == "0" and name == "conv":
            return f"{side}.{native}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{suffix}"
    if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
               "quantize.embedding.weight"):
        return key
    return None


def _diffusers_vq_options(cfg: dict[str, Any], source: str) -> list[str]:
    """Refuse options the native model cannot express; return notes on the ones recorded only."""
    problems = []
    levels = len(cfg.get("block_out_channels") or (64,))
    down = list(cfg.get("down_block_types") or ["DownEncoderBlock2D"] * levels)
    up = list(cfg.get("up_block_types") or ["UpDecoderBlock2D"] * levels)
    bad_down = [t for t in down if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")]
    bad_up = [t for t in up if t not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")]
    if bad_down or bad_up:
        problems.append(f"block types {bad_down + bad_up}")
    elif [t.startswith("Attn") for t in down] != [t.startswith("Attn") for t in reversed(up)]:
        problems.append("attention at different levels in encoder and decoder")
    if cfg.get("norm_type", "group") != "group":
        problems.append(f"norm_type={cfg['norm_type']!r} (MoVQ spatial norm)")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={cfg['act_fn']!r}")
    if not cfg.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=false")
    if cfg.get("out_channels", 3) != cfg.get("in_channels", 3):
        problems.append("out_channels != in_channels")
    if problems:
        raise CheckpointError(f"{source}: unsupported diffusers VQModel option(s): {'; '.join(problems)}",
                              "the native VQ model is the taming architecture; these variants are not")
    notes = []
    scaling = cfg.get("scaling_factor", 0.18215)
    notes.append(f"diffusers scaling_factor {scaling} recorded but not applied: the DiT here runs on the "
                 "unscaled VQ latent (scale 1.0)")
    for name in ("lookup_from_codebook", "force_upcast"):
        if cfg.get(name):
            notes.append(f"{name}=true recorded (no effect on the FP32 reference)")
    return notes


def rename_diffusers_autoencoder(cfg: dict[str, Any], state: StateDict, source: str, layout: str, *,
                                 codebook: bool) -> StateDict:
    """A diffusers VQModel's or AutoencoderKL's weights in taming / LDM names (the two share their
    encoder and decoder); a key outside the layout (a codebook where `codebook` is false) is refused."""
    levels = len(cfg.get("block_out_channels") or (64,))
    renamed: StateDict = {}
    unknown = []
    for key, tensor in state.items():
        new = _rename_diffusers_vq_key(key, levels)
        if new is None or (new.startswith("quantize.") and not codebook):
            unknown.append(key)
            continue
        # diffusers' attention projections are Linear (C, C); taming's are 1x1 convs (C, C, 1, 1).
        if re.search(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", new) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        renamed[new] = tensor
    if unknown:
        raise CheckpointError(f"{source}: keys that are not part of a {layout}: "
                              f"{', '.join(sorted(unknown)[:8])}" + (" ..." if len(unknown) > 8 else ""))
    return renamed


def check_trunk_matches_config(base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                               cfg: dict[str, Any], source: str) -> None:
    """Refuse a diffusers config.json whose widths or blocks per level disagree with its weights."""
    widths = tuple(int(c) for c in cfg.get("block_out_channels") or (64,))
    found = tuple(base_channels * m for m in channel_mult)
    if found != widths:
        raise CheckpointError(f"{source}: block_out_channels {widths} in config.json does not match the "
                              f"weights ({found})")
    if num_res_blocks != int(cfg.get("layers_per_block", 1)):
        raise CheckpointError(f"{source}: layers_per_block {cfg.get('layers_per_block')} in config.json "
                              f"does not match the weights ({num_res_blocks})")


def import_diffusers_vq(cfg: dict[str, Any], state: StateDict, source: str) -> VQArchitecture:
    """diffusers VQModel (config.json dict + state dict) -> architecture with taming-named weights."""
    notes = _diffusers_vq_options(cfg, source)
    renamed = rename_diffusers_autoencoder(cfg, state, source, DIFFUSERS_LAYOUT, codebook=True)
    arch = read_taming_architecture(renamed, source, norm_groups=int(cfg.get("norm_num_groups", 32)),
                                    layout=DIFFUSERS_LAYOUT)
    check_trunk_matches_config(arch.base_channels, arch.channel_mult, arch.num_res_blocks, cfg, source)
    arch.default_image_size = int(cfg["sample_size"]) if cfg.get("sample_size") else None
    arch.notes = arch.notes + notes
    arch.extras = {"scaling_factor": cfg.get("scaling_factor", 0.18215),
                   "lookup_from_codebook": bool(cfg.get("lookup_from_codebook", False)),
                   "force_upcast": bool(cfg.get("force_upcast", False))}
    return arch
