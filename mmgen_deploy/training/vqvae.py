"""Stage 1: the VQ autoencoder (reconstruction + commitment loss, EMA codebook, optional GAN)."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmgen_deploy.config import VQConfig
from mmgen_deploy.data.dataset import ImageData
from mmgen_deploy.errors import RunDirError
from mmgen_deploy.evaluation.metrics import reconstruct, vq_metrics
from mmgen_deploy.io_utils import write_json
from mmgen_deploy.models.vqvae import VQModel
from mmgen_deploy.numerics import save_grid, to_uint8
from mmgen_deploy.rundir import RunDir, writes_run
from mmgen_deploy.training.common import (
    StepCallback,
    interrupted,
    load_checkpoint,
    lr_at,
    progress_bar,
    restore_rng,
    rng_state,
    save_checkpoint,
    set_lr,
)


@dataclass(frozen=True)
class VQTrainSettings:
    steps: int = 700
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    sample_every: int = 250  # reconstruction grid PNG every N steps (0: only at the end)
    gan: bool = False
    gan_start: int = 200  # VQGAN switches the discriminator on after the autoencoder settles
    gan_weight: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (as in pix2pix / VQGAN): one real/fake logit per image patch."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 3, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def batch_to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def init_codebook_from_data(vq: VQModel, images: torch.Tensor, generator: torch.Generator) -> None:
    """Seed the codebook with encoder outputs (cheap k-means++-like start; avoids early collapse)."""
    latents = vq.encode(images).permute(0, 2, 3, 1).reshape(-1, vq.config.embed_dim)
    pick = torch.randint(0, latents.shape[0], (vq.config.n_embed,), generator=generator)
    codes = latents[pick] + 1e-3 * torch.randn(vq.config.n_embed, vq.config.embed_dim, generator=generator)
    quantizer = vq.quantize
    quantizer.embedding.weight.copy_(codes)
    _buffer(quantizer, "ema_embed_sum").copy_(codes)
    _buffer(quantizer, "ema_cluster_size").fill_(1.0)


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    """A registered buffer, typed as a tensor (attribute access on nn.Module is untyped)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


@torch.no_grad()
def standardize_latents_(vq: VQModel, images: torch.Tensor) -> dict[str, Any]:
    """Make the pre-quantization latents zero-mean and unit-variance, without changing the model.

    The DiT's noise schedule assumes data of roughly unit scale. With h' = (h - m) / s
    (m per channel, s one global scale), codes e' = (e - m) / s and a post-quant conv
    that maps e' back to what it saw before, every nearest-code choice and every decoded
    image stays the same: only the space the DiT works in is rescaled.
    """
    h = vq.encode(images)
    mean = h.mean(dim=(0, 2, 3))
    scale = float((h - mean[None, :, None, None]).std())
    qc, pqc, quantizer = vq.quant_conv, vq.post_quant_conv, vq.quantize
    qc.weight.div_(scale)
    assert qc.bias is not None and pqc.bias is not None
    qc.bias.sub_(mean).div_(scale)
    # post_quant_conv(s e' + m) = (s W) e' + (W m + b)
    pqc.bias.add_(pqc.weight[:, :, 0, 0] @ mean)
    pqc.weight.mul_(scale)
    quantizer.embedding.weight.sub_(mean).div_(scale)
    # The EMA sums are counts x codes: shift by counts x mean, then rescale.
    counts = _buffer(quantizer, "ema_cluster_size")
    _buffer(quantizer, "ema_embed_sum").sub_(counts[:, None] * mean).div_(scale)
    return {"latent_mean": mean.tolist(), "latent_scale": scale}


def _checkpoint_path(run: RunDir) -> Path:
    return run.checkpoint_path("vqvae")


@writes_run("train the VQ-VAE")
def train_vqvae(run: RunDir, train: ImageData, val: ImageData, settings: VQTrainSettings, *,
                resume: bool = False, callback: StepCallback | None = None,
                show_progress: bool = True) -> dict[str, Any]:
    """Train the VQ-VAE of `run` and write its weights, checkpoint, grids and report.

    Returns the validation metrics (PSNR, codebook usage, perplexity) and timings.
    """
    config = run.load_config()
    if not isinstance(config.first_stage, VQConfig):
        raise RunDirError(f"{run.root} has a KL autoencoder as its first stage: there is no VQ-VAE to train",
                          "train the DiT on it with `mmgen train dit`")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    vq = VQModel(config.first_stage)
    trainable = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=settings.lr, betas=(0.5, 0.9))
    disc = PatchDiscriminator() if settings.gan else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=settings.lr / 2, betas=(0.5, 0.9)) if disc else None
    images = torch.from_numpy(train.images)  # uint8, converted per batch to keep memory small
    checkpoint = _checkpoint_path(run)
    start = 0
    if resume:
        state = load_checkpoint(checkpoint)
        if state.get("config") != config.first_stage.to_dict():
            raise RunDirError(f"{checkpoint} belongs to a different VQ configuration",
                              "train without {resume} (add {overwrite} to replace the run)",
                              params=["resume", "overwrite"])
        saved = dict(state.get("settings", {}))
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in settings.to_dict().items()
                                                               if k != "steps"}:
            raise RunDirError(f"{checkpoint} was trained with other settings ({saved})",
                              "resume with the same options (only {steps} may grow)", params=["steps"])
        vq.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if disc is not None and disc_opt is not None:
            disc.load_state_dict(state["discriminator"])
            disc_opt.load_state_dict(state["discriminator_optimizer"])
        restore_rng(state["rng"], generator)
        start = int(state["step"])
    else:
        vq.eval()
        first = images[torch.randint(0, len(images), (min(512, len(images)),), generator=generator)]
        init_codebook_from_data(vq, batch_to_float(first), generator)
    fixed = batch_to_float(torch.from_numpy(val.images[:32]))
    last_saved = start if resume else None
    metrics: dict[str, float] = {}
    started = time.perf_counter()

    def _save(step: int) -> None:
        state = {"step": step, "model": vq.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_state(generator), "config": config.first_stage.to_dict(), "settings": settings.to_dict()}
        if disc is not None and disc_opt is not None:
            state["discriminator"] = disc.state_dict()
            state["discriminator_optimizer"] = disc_opt.state_dict()
        save_checkpoint(checkpoint, state)

    try:
        with progress_bar("VQ-VAE", settings.steps, start, show_progress) as advance:
            for step in range(start, settings.steps):
                vq.train()
                set_lr(optimizer, lr_at(step, base_lr=settings.lr, warmup=settings.warmup, total=settings.steps))
                batch = batch_to_float(images[torch.randint(0, len(images), (settings.batch_size,),
                                                            generator=generator)])
                recon, q_loss, _ = vq(batch)
                rec_loss = F.mse_loss(recon, batch)
                loss = rec_loss + q_loss
                use_gan = disc is not None and step >= settings.gan_start
                if use_gan:
                    assert disc is not None and disc_opt is not None
                    g_loss = -disc(recon).mean()  # hinge generator loss
                    loss = loss + settings.gan_weight * g_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                metrics = {"loss": loss.item(), "rec": rec_loss.item(), "commit": q_loss.item()}
                if use_gan:
                    assert disc is not None and disc_opt is not None
                    d_loss = (F.relu(1 - disc(batch)).mean() + F.relu(1 + disc(recon.detach())).mean()) / 2
                    disc_opt.zero_grad(set_to_none=True)
                    d_loss.backward()
                    disc_opt.step()
                    metrics["disc"] = d_loss.item()
                done = step + 1
                if done % settings.checkpoint_every == 0 or done == settings.steps:
                    _save(done)
                    last_saved = done
                if settings.sample_every and done % settings.sample_every == 0 and done != settings.steps:
                    _recon_grid(vq, fixed, run.samples_dir / "train" / f"vqvae_step{done:06d}.png")
                advance(loss=metrics["loss"], rec=metrics["rec"])
                if callback is not None:
                    callback(done, metrics)
    except KeyboardInterrupt:
        raise interrupted("VQ-VAE", checkpoint, last_saved) from None
    train_seconds = time.perf_counter() - started

    # The deployable model: same function, latents standardized for the DiT.
    deploy = copy.deepcopy(vq).eval()
    sample = batch_to_float(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:2048]])
    latent_stats = standardize_latents_(deploy, sample)
    run.save_weights("vqvae", deploy)
    grid = _recon_grid(deploy, fixed, run.samples_dir / "vqvae_reconstructions.png")
    result = {"stage": "vqvae", "steps": settings.steps, "resumed_from": start if resume else None,
              "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
              "final_loss": metrics.get("loss"), **vq_metrics(deploy, val.images), **latent_stats,
              "settings": settings.to_dict(), "reconstruction_grid": str(grid)}
    write_json(run.train_report_path("vqvae"), result)
    training = dict(run.read_meta().get("training", {}))
    training["vqvae"] = {k: result[k] for k in ("steps", "train_seconds", "psnr_db", "codebook_usage", "perplexity")}
    run.update_meta(training=training)
    return result


@torch.no_grad()
def _recon_grid(vq: VQModel, images: torch.Tensor, path: Path) -> Path:
    """Originals and reconstructions in alternating rows of eight."""
    was_training = vq.training
    originals = to_uint8(images.detach().cpu().numpy())
    recon, _ = reconstruct(vq, originals)
    vq.train(was_training)
    rows = []
    for start in range(0, len(originals), 8):
        rows.extend([originals[start:start + 8], recon[start:start + 8]])
    return save_grid(np.concatenate(rows), path)
