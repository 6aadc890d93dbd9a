"""DiT layouts: the official facebookresearch/DiT state dict and diffusers' DiTTransformer2DModel.

The native `DiT` already uses the official parameter names, so an official checkpoint
only needs its architecture read from tensor shapes. diffusers stores the same weights
under other names (q/k/v split, embedders copied into every block) and differs in two
numerical details that `DiTConfig` reproduces: timestep frequencies divided by
(half - 1) instead of half, and eps 1e-5 in the LayerNorm before the MLP.
"""

from __future__ import annotations

import math
import re
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgen_deploy.config import DiTConfig
from mmgen_deploy.errors import ConfigError
from mmgen_deploy.importers.safe_load import CheckpointError
from mmgen_deploy.importers.statedict import StateDict, count_indexed, fit_state, require
from mmgen_deploy.models.dit import DiT, sincos_pos_embed_2d

OFFICIAL_LAYOUT = "official DiT"
DIFFUSERS_LAYOUT = "diffusers DiTTransformer2DModel"

# Heads cannot be read from shapes (qkv is (3D, D) for any head count): the paper's sizes.
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
_HEADS_BY_NAME = {"S": 6, "B": 12, "L": 16, "XL": 16}
# The official model's sinusoidal timestep features are 256 wide; the native model too.
_FREQ_DIM = 256
# The stored pos_embed is a float32 rounding of a float64 table: differences beyond this are real.
_POS_EMBED_ATOL = 1e-5


@dataclass
class ImportedDiT:
    config: DiTConfig
    model: DiT
    layout: str
    source: str
    notes: list[str] = field(default_factory=list)


def official_dit_keys(depth: int) -> list[str]:
    """Every key of an official DiT state dict (facebookresearch/DiT models.py), in module order."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"]
    for name in ("linear", "adaLN_modulation.1"):
        keys += [f"final_layer.{name}.weight", f"final_layer.{name}.bias"]
    return keys


def _heads(hidden: int, num_heads: int | None, args: Namespace | None, source: str) -> tuple[int, str]:
    if num_heads is not None:
        return num_heads, "num_heads as given"
    model_name = str(getattr(args, "model", "") or "")
    match = re.fullmatch(r"DiT-(S|B|L|XL)/\d+", model_name)
    if match:
        return _HEADS_BY_NAME[match.group(1)], f"from the checkpoint's args.model {model_name!r}"
    if hidden in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[hidden], f"from the paper's configuration for width {hidden}"
    raise CheckpointError(f"{source}: cannot tell the number of attention heads of a width-{hidden} DiT "
                          "from its tensors (only the paper's widths 384/768/1024/1152 are known)",
                          "pass {num_heads} N", params=["num_heads"])


def import_official_dit(state: StateDict, source: str, *, num_heads: int | None = None,
                        args: Namespace | None = None) -> ImportedDiT:
    """Build a native DiT from an official-layout state dict, architecture read from shapes."""
    def need(key: str) -> torch.Tensor:
        return require(state, key, source, OFFICIAL_LAYOUT)

    patch_w = need("x_embedder.proj.weight")
    if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has shape {tuple(patch_w.shape)}, "
                              "expected (width, channels, patch, patch)")
    hidden, in_channels, patch = (int(s) for s in patch_w.shape[:3])
    pos = need("pos_embed")
    tokens = int(pos.shape[1]) if pos.ndim == 3 else -1
    grid = math.isqrt(max(tokens, 0))
    if pos.ndim != 3 or grid * grid != tokens or pos.shape[2] != hidden:
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(pos.shape)}, expected (1, grid*grid, {hidden})")
    depth = count_indexed(state, "blocks.", ".attn.qkv.weight")
    if depth == 0:
        raise CheckpointError(f"{source} has no blocks.0.attn.qkv.weight: not an {OFFICIAL_LAYOUT} checkpoint")
    mlp_hidden = int(need("blocks.0.mlp.fc1.weight").shape[0])
    table_rows = int(need("y_embedder.embedding_table.weight").shape[0])
    out_features = int(need("final_layer.linear.weight").shape[0])
    freq_dim = int(need("t_embedder.mlp.0.weight").shape[1])
    if freq_dim != _FREQ_DIM:
        raise CheckpointError(f"{source}: t_embedder.mlp.0.weight takes {freq_dim} timestep features; "
                              f"the DiT here uses {_FREQ_DIM}")
    out_channels, rest = divmod(out_features, patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source}: final_layer.linear.weight has {out_features} outputs; expected "
                              f"patch^2 x {in_channels} or patch^2 x {2 * in_channels} (learned sigma)")
    heads, heads_note = _heads(hidden, num_heads, args, source)
    try:
        config = DiTConfig(input_size=grid * patch, in_channels=in_channels, patch_size=patch, hidden_size=hidden,
                           depth=depth, num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=table_rows - 1,
                           learn_sigma=out_channels == 2 * in_channels)
        config.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the architecture read from its tensors is invalid: {exc.message}") from None
    if int(hidden * config.mlp_ratio) != mlp_hidden:
        raise CheckpointError(f"{source}: MLP width {mlp_hidden} is not a whole multiple of width {hidden}")
    # The position table is fixed, not learned: a different one means another model (or layout).
    expected_pos = torch.from_numpy(sincos_pos_embed_2d(hidden, grid)).unsqueeze(0)
    pos_error = float((pos.float() - expected_pos).abs().max())
    if pos_error > _POS_EMBED_ATOL:
        raise CheckpointError(f"{source}: the stored pos_embed differs from the 2-D sin-cos table of a "
                              f"{grid}x{grid} grid by up to {pos_error:.3g}; the native DiT cannot reproduce it",
                              "this is not a standard DiT position table")
    model = DiT(config)
    fit_state(model, state, source, layout=OFFICIAL_LAYOUT)
    notes = [f"{OFFICIAL_LAYOUT}: {depth} blocks, width {hidden}, {heads} heads ({heads_note}), patch {patch}, "
             f"latent {in_channels}x{grid * patch}x{grid * patch}, {table_rows - 1} classes, "
             f"learned sigma {config.learn_sigma}; pos_embed matches the sin-cos table (max diff {pos_error:.2g})"]
    return ImportedDiT(config, model.eval(), OFFICIAL_LAYOUT, source, notes)


class _Renamer:
    """Takes tensors out of a source state dict under native names, remembering what was used."""

    def __init__(self, state: StateDict) -> None:
        self.state = state
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.out: StateDict = {}

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.state[key]

    def move(self, src: str, dst: str) -> None:
        for suffix in (".weight", ".bias"):
            tensor = self.get(src + suffix)
            if tensor is not None:
                self.out[dst + suffix] = tensor

    @property
    def unknown(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _diffusers_dit_config(cfg: dict[str, Any], source: str) -> DiTConfig:
    def opt(name: str, default: Any) -> Any:
        return cfg.get(name, default) if cfg.get(name) is not None else default

    unsupported = []
    if opt("norm_type", "ada_norm_zero") != "ada_norm_zero":
        unsupported.append(f"norm_type={cfg['norm_type']!r} (only 'ada_norm_zero' is a DiT)")
    if opt("activation_fn", "gelu-approximate") != "gelu-approximate":
        unsupported.append(f"activation_fn={cfg['activation_fn']!r} (DiT uses 'gelu-approximate')")
    if opt("norm_elementwise_affine", False):
        unsupported.append("norm_elementwise_affine=true (DiT's LayerNorms have no affine parameters)")
    if not opt("attention_bias", True):
        unsupported.append("attention_bias=false (DiT's qkv has a bias)")
    if cfg.get("patch_size") is None:
        unsupported.append("no patch_size (not a patch-based DiT)")
    if cfg.get("cross_attention_dim") is not None:
        unsupported.append("cross_attention_dim set (DiT has no cross attention)")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported diffusers DiT option(s): {'; '.join(unsupported)}")
    heads, head_dim = int(opt("num_attention_heads", 16)), int(opt("attention_head_dim", 72))
    in_channels = int(opt("in_channels", 4))
    out_channels = int(opt("out_channels", in_channels))
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source}: out_channels {out_channels} is neither in_channels {in_channels} "
                              f"nor 2 x in_channels (learned sigma)")
    try:
        config = DiTConfig(input_size=int(opt("sample_size", 32)), in_channels=in_channels,
                           patch_size=int(cfg["patch_size"]), hidden_size=heads * head_dim,
                           depth=int(opt("num_layers", 28)), num_heads=heads, mlp_ratio=4.0,
                           num_classes=int(opt("num_embeds_ada_norm", 1000)),
                           learn_sigma=out_channels == 2 * in_channels,
                           timestep_freq_shift=1.0, mlp_norm_eps=float(opt("norm_eps", 1e-5)))
        config.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{source}: invalid DiT configuration: {exc.message}") from None
    return config


def _check_shared_embedders(state: StateDict, depth: int, source: str) -> None:
    """diffusers copies the timestep/class embedders into every block; the native DiT has one."""
    prefix0 = "transformer_blocks.0.norm1.emb."
    names = [k[len(prefix0):] for k in state if k.startswith(prefix0)]
    for i in range(1, depth):
        for name in names:
            key = f"transformer_blocks.{i}.norm1.emb.{name}"
            if key not in state:
                raise CheckpointError(f"{source}: {key} is missing (block 0 has it)")
            if not torch.equal(state[key], state[prefix0 + name]):
                diff = float((state[key].float() - state[prefix0 + name].float()).abs().max())
                raise CheckpointError(
                    f"{source}: the timestep/class embedder of block {i} ({key}) differs from block 0's "
                    f"by up to {diff:.3g}; the DiT here has one shared embedder, so this model cannot be imported")


def import_diffusers_dit(cfg: dict[str, Any], state: StateDict, source: str) -> ImportedDiT:
    """diffusers DiTTransformer2DModel (config.json dict + state dict) -> native DiT."""
    config = _diffusers_dit_config(cfg, source)
    _check_shared_embedders(state, config.depth, source)
    r = _Renamer(state)
    # Embedders: block 0's copy (the others were checked to be identical, and are consumed).
    emb = "transformer_blocks.0.norm1.emb."
    r.move(emb + "timestep_embedder.linear_1", "t_embedder.mlp.0")
    r.move(emb + "timestep_embedder.linear_2", "t_embedder.mlp.2")
    table = r.get(emb + "class_embedder.embedding_table.weight")
    if table is not None:
        r.out["y_embedder.embedding_table.weight"] = table
    r.used.update(k for k in state if re.match(r"transformer_blocks\.\d+\.norm1\.emb\.", k))
    r.move("pos_embed.proj", "x_embedder.proj")
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            pieces = [r.get(f"{src}attn1.to_{n}.{suffix}") for n in "qkv"]
            present = [p for p in pieces if p is not None]
            if len(present) < 3:
                continue
            if len({tuple(p.shape) for p in present}) != 1:
                shapes = ", ".join(f"to_{n} {tuple(p.shape)}" for n, p in zip("qkv", present, strict=True))
                raise CheckpointError(f"{source}: {src}attn1 q/k/v {suffix}s differ in shape ({shapes})")
            r.out[f"{dst}attn.qkv.{suffix}"] = torch.cat(present, dim=0)
        r.move(src + "attn1.to_out.0", dst + "attn.proj")
        r.move(src + "ff.net.0.proj", dst + "mlp.fc1")
        r.move(src + "ff.net.2", dst + "mlp.fc2")
        r.move(src + "norm1.linear", dst + "adaLN_modulation.1")
    r.move("proj_out_1", "final_layer.adaLN_modulation.1")
    r.move("proj_out_2", "final_layer.linear")
    # pos_embed is a non-persistent buffer in diffusers (recomputed); an explicit copy must match ours.
    r.used.discard("pos_embed.pos_embed")
    model = DiT(config)
    if "pos_embed.pos_embed" in state:
        r.used.add("pos_embed.pos_embed")
        stored = state["pos_embed.pos_embed"].float().reshape(model.pos_embed.shape)
        if float((stored - model.pos_embed).abs().max()) > _POS_EMBED_ATOL:
            raise CheckpointError(f"{source}: pos_embed.pos_embed differs from the 2-D sin-cos table")
    if r.missing or r.unknown:
        parts = []
        if r.missing:
            parts.append(f"missing keys {', '.join(r.missing[:8])}" + (" ..." if len(r.missing) > 8 else ""))
        if r.unknown:
            parts.append(f"unknown keys {', '.join(r.unknown[:8])}" + (" ..." if len(r.unknown) > 8 else ""))
        raise CheckpointError(f"{source} does not fit the {DIFFUSERS_LAYOUT} described by its config.json: "
                              + "; ".join(parts))
    r.out["pos_embed"] = model.pos_embed.detach().clone()
    fit_state(model, r.out, source, layout=DIFFUSERS_LAYOUT)
    notes = [f"{DIFFUSERS_LAYOUT}: {config.depth} blocks, width {config.hidden_size}, {config.num_heads} heads, "
             f"patch {config.patch_size}, latent {config.in_channels}x{config.input_size}x{config.input_size}, "
             f"{config.num_classes} classes; diffusers numerics kept (timestep_freq_shift=1, "
             f"mlp_norm_eps={config.mlp_norm_eps:g}); the per-block embedder copies are identical and were merged"]
    return ImportedDiT(config, model.eval(), DIFFUSERS_LAYOUT, source, notes)
