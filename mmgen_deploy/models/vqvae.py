"""VQ autoencoder in the taming-transformers / latent-diffusion layout.

Module and parameter names deliberately match taming's `Encoder`, `Decoder` and
`VQModel` (``encoder.down.0.block.0.norm1.weight``, ``quantize.embedding.weight``,
``quant_conv``...) so that public VQGAN / LDM-VQ checkpoints load weight for weight.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mmgen_deploy.config import FirstStageConfig, VQConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # taming uses GroupNorm(32, eps=1e-6); fewer groups only when channels are too few.
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming names the 1x1 projection of the skip path `nin_shortcut`.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (taming `AttnBlock`)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head, tokens are pixels.
        q = self.q(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        k = self.k(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        v = self.v(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (0, 1, 0, 1) padding as in taming, so weights transfer exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; a plain container so keys read `down.{i}.block.{j}`.

    `downsample` / `upsample` exist only on levels that change resolution (as in taming).
    """

    block: nn.ModuleList
    attn: nn.ModuleList
    downsample: Downsample
    upsample: Upsample

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid_attention(cfg: FirstStageConfig) -> bool:
    # diffusers' `mid_block_add_attention=False` (some KL autoencoders); taming always has it.
    return bool(getattr(cfg, "mid_attention", True))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float, attention: bool = True) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """`out_channels` defaults to z_channels; a KL autoencoder's encoder outputs mean and
    log-variance, 2 x z_channels (LDM's `double_z`)."""

    def __init__(self, cfg: FirstStageConfig, out_channels: int | None = None) -> None:
        super().__init__()
        ch, groups = cfg.base_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution = cfg.image_size
        block_in = ch
        for level, mult in enumerate(cfg.channel_mult):
            stage = _Level()
            block_out = ch * mult
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, groups, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != len(cfg.channel_mult) - 1:
                stage.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(stage)
        self.mid = _Mid(block_in, groups, cfg.dropout, _mid_attention(cfg))
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels or cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            level = cast(_Level, stage)
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: FirstStageConfig) -> None:
        super().__init__()
        ch, groups = cfg.base_channels, cfg.norm_groups
        block_in = ch * cfg.channel_mult[-1]
        resolution = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, groups, cfg.dropout, _mid_attention(cfg))
        # Built from the lowest resolution up, stored so that `up.{i}` matches `down.{i}`.
        levels: list[_Level] = []
        for level in reversed(range(len(cfg.channel_mult))):
            stage = _Level()
            block_out = ch * cfg.channel_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, groups, cfg.dropout))
                block_in = block_out
                if resolution in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            level = cast(_Level, stage)
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients and an EMA codebook.

    `quantize` is the deterministic inference path (the deployable quantizer);
    `forward` is the training path: it also returns the commitment loss and, in
    training mode with `use_ema`, updates the codebook and restarts dead codes.
    """

    ema_cluster_size: torch.Tensor
    ema_embed_sum: torch.Tensor

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, use_ema: bool = True,
                 ema_decay: float = 0.99, dead_code_threshold: float = 1.0) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.use_ema, self.ema_decay, self.dead_code_threshold = use_ema, ema_decay, dead_code_threshold
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if use_ema:
            self.embedding.weight.requires_grad_(False)
        # EMA statistics are training state; they are saved in checkpoints but not
        # needed (nor exported) for inference.
        self.register_buffer("ema_cluster_size", torch.zeros(n_embed), persistent=True)
        self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone(), persistent=True)

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance of each row of ``z_flat`` (N, D) to every code: (N, K)."""
        codes = self.embedding.weight
        return (
            z_flat.pow(2).sum(dim=1, keepdim=True)
            + codes.pow(2).sum(dim=1)[None, :]
            - 2.0 * z_flat @ codes.t()
        )

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, H, W) latents -> (codes (B, D, H, W), indices (B, H, W) int32)."""
        b, d, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        indices = torch.argmin(self.distances(z_flat), dim=1)
        z_q = self.embedding(indices).reshape(b, h, w, d).permute(0, 3, 1, 2)
        # int32 because TensorRT has no int64 tensors worth the name (it casts them down).
        return z_q, indices.reshape(b, h, w).to(torch.int32)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> code vectors (B, D, H, W)."""
        return self.embedding(indices.long()).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices = self.quantize(z)
        if self.training and self.use_ema:
            self._ema_update(z.detach(), indices)
            z_q = self.lookup(indices)
        commitment = F.mse_loss(z, z_q.detach())
        loss = self.beta * commitment
        if not self.use_ema:
            loss = loss + F.mse_loss(z_q, z.detach())  # codebook loss replaces the EMA update
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, loss, indices

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        onehot = F.one_hot(indices.reshape(-1).long(), self.n_embed).to(z_flat.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ z_flat
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by zero.
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + 1e-5) / (total + self.n_embed * 1e-5) * total
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])
        self._restart_dead_codes(z_flat)

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor) -> None:
        # `ema_cluster_size` is a moving average of how many latents of a batch picked each
        # code, so the threshold is in those units: below 1, a code wins less than once per
        # batch. (A threshold of 1e-3 needs ~700 unused steps at decay 0.99, longer than the
        # tiny recipe's 500: 26% of the codes then stayed dead, perplexity 34 instead of 164.)
        dead = self.ema_cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Re-seed dead codes on random encoder outputs of this batch (plus a little noise),
        # the usual remedy for codebook collapse.
        pick = torch.randint(0, z_flat.shape[0], (n_dead,), device=z_flat.device)
        fresh = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])
        self.embedding.weight[dead] = fresh
        self.ema_embed_sum[dead] = fresh
        self.ema_cluster_size[dead] = 1.0

    @torch.no_grad()
    def usage(self, indices: torch.Tensor) -> tuple[float, float]:
        """(fraction of codes used, perplexity) for a batch of indices."""
        counts = torch.bincount(indices.reshape(-1).long(), minlength=self.n_embed).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return float((counts > 0).float().mean()), float(perplexity)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.use_ema, cfg.ema_decay)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> pre-quantization latent h (the space the DiT works in)."""
        return self.quant_conv(self.encoder(image))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latent -> image in roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, quantizer loss, indices)."""
        z_q, q_loss, indices = self.quantize(self.encode(image))
        return self.decode(z_q), q_loss, indices
