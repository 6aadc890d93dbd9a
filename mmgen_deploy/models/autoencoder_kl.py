"""KL autoencoder (Stable Diffusion's VAE) in the latent-diffusion / diffusers layout.

The encoder and decoder are the VQ model's (taming/LDM `Encoder` / `Decoder`, same parameter
names); the encoder outputs mean and log-variance (`double_z`), `quant_conv` maps them to
2 x embed_dim moments and `post_quant_conv` maps a latent back. Parameter names match LDM's
`AutoencoderKL` (``encoder.down.0.block.0.norm1.weight``, ``quant_conv.weight``...), so LDM
`.ckpt` first stages load weight for weight; diffusers folders are renamed on import.

The DiT works on the *scaled* latent `(mean - shift_factor) * scaling_factor` (0.18215 and no
shift for Stable Diffusion's VAE): `encode` returns it and `decode` takes it, so the scaling is
part of the deployable encoder and decoder graphs and never a separate step a runtime could
forget.
"""

from __future__ import annotations

import torch
from torch import nn

from mmgen_deploy.config import KLConfig
from mmgen_deploy.models.vqvae import Decoder, Encoder


class AutoencoderKL(nn.Module):
    """image -> moments (mean, logvar) -> scaled latent; scaled latent -> image. No quantizer."""

    quant_conv: nn.Module
    post_quant_conv: nn.Module

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg, out_channels=2 * cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1) if cfg.use_quant_conv \
            else nn.Identity()
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1) if cfg.use_post_quant_conv \
            else nn.Identity()

    def moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> (mean, log-variance) of the unscaled latent, each (B, embed_dim, h, w)."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> the scaled latent mean (the space the DiT works in)."""
        mean = self.quant_conv(self.encoder(image))[:, : self.config.embed_dim]
        return (mean - self.config.shift_factor) * self.config.scaling_factor

    def sample_latent(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent drawn from the posterior (what latent-diffusion training uses)."""
        mean, logvar = self.moments(image)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in roughly [-1, 1]."""
        z = latent / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(self.post_quant_conv(z))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(image))
