"""Diffusion Transformer (Peebles & Xie), following facebookresearch/DiT `models.py`.

Parameter names match the official checkpoints (`x_embedder.proj`, `t_embedder.mlp.0`,
`blocks.{i}.adaLN_modulation.1`, ...). Differences from the original, all export-driven:
attention uses `scaled_dot_product_attention` (one ONNX Attention pattern / SDPA), the
class-label dropout is an explicit argument instead of hidden randomness, and unpatchify
uses reshape + permute (TensorRT handles Einsum poorly).
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmgen_deploy.config import DiTConfig
from mmgen_deploy.models.text_encoder import key_bias


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)] with f_i = exp(-ln(P) i / (dim/2 - shift)).

    t*f reaches ~1000 rad, where FP16 resolves only 0.5: this stays FP32 in every export.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# Guidance scales (about 1..10) are stretched to the timesteps' range before their sinusoidal
# embedding, so neighbouring scales get distinguishable embeddings.
GUIDANCE_EMBED_SCALE = 100.0


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size, self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: index `num_classes` is the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the prompt's token embeddings (keys/values)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(b, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float,
                 context_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if context_dim:
            # PixArt-alpha's placement: between self-attention and MLP, outside adaLN.
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_bias: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            assert context_bias is not None
            x = x + self.cross_attn(self.norm_cross(x), context, context_bias)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.timestep_freq_shift)
        if cfg.guidance_embed:
            self.g_embedder = TimestepEmbedder(cfg.hidden_size)
        if cfg.uses_text:
            if cfg.uses_pooled_text:
                self.text_pool_embedder = nn.Sequential(
                    nn.Linear(cfg.text_dim, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)
        grid = cfg.input_size // cfg.patch_size
        if self.x_embedder.proj.weight.is_meta:  # built for its shapes only (RunDir checks weights against them)
            pos = torch.empty(1, grid * grid, cfg.hidden_size)
        else:
            pos = torch.from_numpy(sincos_pos_embed_2d(cfg.hidden_size, grid)).float().unsqueeze(0)
        # A fixed table, kept as a (frozen) parameter so the official key `pos_embed` exists.
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.mlp_norm_eps,
                     context_dim=cfg.text_dim if cfg.uses_cross_attention else 0)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, and adaLN-Zero (a fresh model outputs exactly 0)."""

        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.x_embedder.proj.bias is not None:
            nn.init.zeros_(self.x_embedder.proj.bias)
        if not self.config.uses_text:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for index in (0, 2):
            nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[index]).weight, std=0.02)
        # adaLN-Zero: every modulation starts at zero, so each block starts as the identity.
        modulations = [cast(DiTBlock, b).adaLN_modulation for b in self.blocks]
        for modulation in [*modulations, self.final_layer.adaLN_modulation]:
            linear = cast(nn.Linear, modulation[-1])
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        # Cross-attention starts switched off too (zero output projection), as in PixArt.
        for block in self.blocks:
            cross = getattr(block, "cross_attn", None)
            if isinstance(cross, CrossAttention):
                nn.init.zeros_(cross.proj.weight)
                nn.init.zeros_(cross.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.config.guidance_embed:
            # A student starts as its teacher's conditional model: the guidance embedding adds 0.
            nn.init.zeros_(cast(nn.Linear, self.g_embedder.mlp[2]).weight)
            nn.init.zeros_(cast(nn.Linear, self.g_embedder.mlp[2]).bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W) with reshape + permute (no Einsum)."""
        c, p = self.config.out_channels, self.config.patch_size
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                drop_labels: torch.Tensor | None = None, *, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) float timesteps, and the condition: y (B,) class ids
        (num_classes = null) for a class DiT; for a text DiT the text encoder's outputs:
        text (B, L, D) and text_mask (B, L) for cross-attention, text_pooled (B, D) for adaLN.
        A guidance-distilled student also takes guidance (B,), the classifier-free guidance scale.
        """
        h, c = self.embed(x, t, y, drop_labels, text_pooled=text_pooled, guidance=guidance)
        context, bias = self.cross_context(text, text_mask)
        h = self.run_blocks(h, c, 0, len(self.blocks), context, bias)
        return self.finish(h, c)

    # The stages of `forward`, which the denoiser parts (models.components) run separately: the
    # embeddings, any contiguous range of blocks, and the final layer.
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
              drop_labels: torch.Tensor | None = None, *,
              text_pooled: torch.Tensor | None = None,
              guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch tokens h (B, N, D) and the adaLN input c (B, D): timestep + condition embedding
        (+ the guidance scale's embedding for a guidance-distilled student)."""
        cfg = self.config
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("a guidance-distilled DiT needs the guidance scale")
            c = c + self.g_embedder(guidance * GUIDANCE_EMBED_SCALE)
        if not cfg.uses_text:
            if y is None:
                raise ValueError("a class-conditioned DiT needs class ids y")
            c = c + self.y_embedder(y, drop_labels)
        elif cfg.uses_pooled_text:
            if text_pooled is None:
                raise ValueError("this DiT needs text_pooled")
            c = c + self.text_pool_embedder(text_pooled)
        return h, c

    def cross_context(self, text: torch.Tensor | None,
                      text_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the cross-attention blocks read: the prompt tokens and their key bias (None, None
        for a DiT without cross-attention)."""
        if not self.config.uses_cross_attention:
            return None, None
        if text is None or text_mask is None:
            raise ValueError("this DiT needs text and text_mask for cross-attention")
        return text, key_bias(text_mask)

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor, start: int, stop: int,
                   context: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks start..stop-1 on the tokens h."""
        for block in self.blocks[start:stop]:
            h = block(h, c, context, bias)
        return h

    def modulated_input(self, h: torch.Tensor, c: torch.Tensor, index: int) -> torch.Tensor:
        """What block `index` feeds its self-attention: LayerNorm(h) shifted and scaled by its adaLN
        modulation of c (TeaCache's indicator of how much the blocks' output will change)."""
        block = cast(DiTBlock, self.blocks[index])
        shift, scale = block.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(block.norm1(h), shift, scale)

    def finish(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final layer and unpatchify: tokens -> model output (B, C or 2C, H, W)."""
        return self.unpatchify(self.final_layer(h, c))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (grid_size**2, dim) as in MAE/DiT: half the width per axis."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in DiT

    def _axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([_axis(dim // 2, grid_w), _axis(dim // 2, grid_h)], axis=1).astype(np.float32)
