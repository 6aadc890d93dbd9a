"""Real inputs for every component, derived from dataset images.

Both the FP16 conversion (which activations overflow FP16?) and the "real data"
validation need inputs that look like deployment traffic, per component:
encoder = images; quantizer = the encoder's latents h of those images; decoder = their
quantized codes z_q; denoiser = h noised to random timesteps with the forward process
x_t = sqrt(a_t) h + sqrt(1 - a_t) eps, with the images' class ids.
Without images, the spec's dummy inputs stand in (and the manifest says so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.sampling.schedulers import training_alphas_cumprod
from mmgen_deploy.specs import ComponentSpec

CALIBRATION_SAMPLES = 16  # enough for the activation range check, cheap on 2 cores


@dataclass(frozen=True)
class CalibrationData:
    """Images (N, C, H, W) float32 in [-1, 1] and optional class ids (N,)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = "images"


CalibrationSource = CalibrationData | np.ndarray | str | os.PathLike[str] | None


def load_calibration(source: CalibrationSource, config: ModelConfig) -> CalibrationData | None:
    """Accept a CalibrationData, an image array, or an .npz with `images` (and optionally
    `labels`); check shapes and range against the config."""
    if source is None:
        return None
    if isinstance(source, CalibrationData):
        data = source
    elif isinstance(source, np.ndarray):
        data = CalibrationData(images=source, source="array")
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"calibration file {path} does not exist", "pass an .npz holding an `images` array")
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "images" not in npz:
                    raise UsageError(f"{path} has no `images` array (it has: {', '.join(npz.files) or 'nothing'})",
                                     "save it with np.savez(path, images=..., labels=...)")
                labels = np.asarray(npz["labels"]) if "labels" in npz else None
                data = CalibrationData(images=np.asarray(npz["images"]), labels=labels, source=str(path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read calibration file {path}: {exc}", "pass a NumPy .npz file") from None
    vq = config.vq
    expected = (vq.in_channels, vq.image_size, vq.image_size)
    images = data.images
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        want = ", ".join(map(str, expected))
        raise UsageError(f"calibration images have shape {tuple(images.shape)}, expected (N, {want})",
                         "give images of the model's size, channels first")
    if images.dtype == np.uint8:  # accept raw pixels, as a dataset stores them
        images = images.astype(np.float32) / 127.5 - 1.0
    images = images.astype(np.float32)
    if not np.isfinite(images).all() or np.abs(images).max() > 1.0 + 1e-3:
        raise UsageError("calibration images must be finite and scaled to [-1, 1]", "scale pixels as x / 127.5 - 1")
    labels = data.labels
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        if labels.shape[0] != images.shape[0] or labels.min() < 0 or labels.max() > config.dit.num_classes:
            raise UsageError(f"calibration labels must be {images.shape[0]} ids in [0, {config.dit.num_classes}]")
    return CalibrationData(images=images[:CALIBRATION_SAMPLES],
                           labels=None if labels is None else labels[:CALIBRATION_SAMPLES], source=data.source)


def dataset_calibration(meta: dict[str, Any]) -> tuple[CalibrationData | None, str]:
    """The first images of the run's validation split (run.json `data`), or None and why not."""
    described = meta.get("data") or {}
    if not isinstance(described, dict) or "name" not in described:
        return None, "the run records no dataset"
    from mmgen_deploy.data import DataSpec, load_split

    spec = DataSpec.from_dict(described)
    if spec.name == "shapes":  # generated: ask for just the samples needed (same deterministic stream)
        spec = replace(spec, num_val=CALIBRATION_SAMPLES)
    try:
        data = load_split(spec, "val")
    except (MMGenError, OSError, ValueError) as exc:
        return None, f"dataset unavailable: {exc}"
    if len(data) == 0:
        return None, "the dataset's validation split is empty"
    count = min(len(data), CALIBRATION_SAMPLES)
    images = np.ascontiguousarray(data.images[:count].transpose(0, 3, 1, 2))  # NHWC uint8 -> NCHW
    return CalibrationData(images=images, labels=np.asarray(data.labels[:count]),
                           source=f"{spec.name} validation split"), ""


def component_inputs(data: CalibrationData | None, config: ModelConfig, specs: dict[str, ComponentSpec],
                     modules: dict[str, nn.Module], seed: int = 0,
                     why_no_data: str = "no images given") -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """Per-component real inputs, and a word saying where they came from."""
    rng = np.random.default_rng(seed)
    if data is None:
        n = CALIBRATION_SAMPLES
        return {name: spec.make_inputs(n, rng) for name, spec in specs.items()}, f"spec dummy inputs ({why_no_data})"
    images = data.images
    n = images.shape[0]
    with torch.no_grad():
        encoder = modules.get("encoder")
        quantizer = modules.get("quantizer")
        if encoder is None or quantizer is None:
            raise ValueError("deriving real inputs needs the encoder and quantizer modules")
        h = encoder(torch.from_numpy(images))
        z_q, _ = quantizer(h)
    h_np = h.numpy().astype(np.float32)
    a = training_alphas_cumprod(config.diffusion)
    t = np.asarray(rng.integers(0, config.diffusion.num_train_timesteps, size=n))
    noise = rng.standard_normal(h_np.shape)
    scale = np.sqrt(a[t])[:, None, None, None]
    x_t = (scale * h_np + np.sqrt(1.0 - a[t])[:, None, None, None] * noise).astype(np.float32)
    labels = np.asarray(data.labels if data.labels is not None
                        else rng.integers(0, config.dit.num_classes + 1, size=n))
    return {
        "encoder": {"image": images},
        "quantizer": {"h": h_np},
        "decoder": {"z_q": z_q.numpy().astype(np.float32)},
        "denoiser": {"x_t": x_t, "t": t.astype(np.float32), "class_ids": labels.astype(np.int32)},
    }, f"dataset images ({data.source}, {n} samples)"
