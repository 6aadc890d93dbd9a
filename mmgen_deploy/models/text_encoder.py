"""A small pre-LayerNorm transformer text encoder, trained jointly with the DiT.

input_ids (B, L) -> token embeddings (B, L, D), a key mask (B, L) (1 for real tokens,
0 for padding) and a pooled embedding (B, D) (the mean over real tokens). The mask is
an output so the denoiser's cross-attention gets it from the same place as the
embeddings: the sampling loop just forwards the encoder's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmgen_deploy.config import TextConfig
from mmgen_deploy.text.tokenizer import PAD

# Added to attention logits of padding keys. Large enough to zero their softmax weight,
# small enough to stay finite in FP16 (max 65504), unlike -inf or float32's minimum.
MASK_BIAS = -1e4


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 key mask -> (B, 1, 1, L) additive attention bias."""
    return ((1.0 - mask) * MASK_BIAS)[:, None, None, :]


class MaskedSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TextBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = MaskedSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.hidden_size))
        self.blocks = nn.ModuleList(TextBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.norm_final = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids (B, L) integers -> (embeddings (B, L, D), mask (B, L) float, pooled (B, D))."""
        mask = (input_ids != PAD).float()
        bias = key_bias(mask)
        x = self.token_embedding(input_ids.long()) + self.position_embedding
        for block in self.blocks:
            x = block(x, bias)
        x = self.norm_final(x)
        weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        pooled = (x * weights[:, :, None]).sum(dim=1)
        return x, mask, pooled
