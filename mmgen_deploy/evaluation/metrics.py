"""Reconstruction (and, for a VQ autoencoder, codebook) measurements of a first stage."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmgen_deploy.models.autoencoder_kl import AutoencoderKL
from mmgen_deploy.models.vqvae import VQModel
from mmgen_deploy.numerics import psnr_per_image, to_uint8


@torch.no_grad()
def reconstruct(vq: VQModel, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> (uint8 reconstructions through the quantizer, code indices (N, h, w))."""
    vq.eval()
    outputs, codes = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z_q, indices = vq.quantize.quantize(vq.encode(batch))
        outputs.append(to_uint8(vq.decode(z_q).cpu().numpy()))
        codes.append(indices.numpy())
    return np.concatenate(outputs), np.concatenate(codes)


def codebook_usage(indices: np.ndarray, n_embed: int) -> dict[str, float]:
    """Fraction of the codebook used at least once, and the perplexity of code use."""
    counts = np.bincount(indices.reshape(-1).astype(np.int64), minlength=n_embed).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    return {"codebook_usage": float((counts > 0).mean()), "codes_used": int((counts > 0).sum()),
            "codebook_size": int(n_embed), "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum()))}


def vq_metrics(vq: VQModel, images: np.ndarray) -> dict[str, Any]:
    """Mean per-image PSNR (uint8 round trip, as a user sees it) and codebook use on `images`."""
    recon, indices = reconstruct(vq, images)
    psnr = psnr_per_image(images, recon)
    return {"psnr_db": float(psnr.mean()), "psnr_db_min": float(psnr.min()), "num_images": len(images),
            **codebook_usage(indices, vq.config.n_embed)}


@torch.no_grad()
def kl_metrics(kl: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> dict[str, Any]:
    """Mean per-image PSNR of the uint8 round trip through a KL autoencoder (posterior mean)."""
    kl.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        outputs.append(to_uint8(kl.decode(kl.encode(batch)).cpu().numpy()))
    psnr = psnr_per_image(images, np.concatenate(outputs))
    return {"psnr_db": float(psnr.mean()), "psnr_db_min": float(psnr.min()), "num_images": len(images)}


def first_stage_metrics(model: VQModel | AutoencoderKL, images: np.ndarray) -> dict[str, Any]:
    """`vq_metrics` or `kl_metrics`, whichever the first stage is."""
    return kl_metrics(model, images) if isinstance(model, AutoencoderKL) else vq_metrics(model, images)
