"""Shared numerics and image helpers (NumPy only; Pillow for writing PNGs): the low module that
export validation, parity, sampling, training and evaluation all use.

- comparing a tested output with a reference: `tensor_diff`, `index_agreement`, and
  `compare_output` (the one comparison of an output against its tolerance, used by export
  validation and parity alike); `psnr`, `psnr_per_image`, `ssim` for images;
- images: `to_uint8` (model range [-1, 1] -> uint8), `make_grid`, `save_grid`;
- batches: `take_batch` (the first `batch` samples of a set, cycled when it has fewer).

Every comparison takes the reference first and the tested output second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorDiff:
    """How far `test` is from `ref`, in the measures a deployer asks for."""

    max_abs: float
    mean_abs: float
    rel_l2: float  # ||test - ref|| / ||ref||
    cosine: float
    nonfinite: int  # NaN/Inf count in the tested output
    ref_nonfinite: int

    @property
    def min_passing_rel_l2(self) -> float:
        """The smallest relative-L2 tolerance this output would pass (inf if not finite)."""
        return self.rel_l2 if self.nonfinite == 0 else float("inf")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def tensor_diff(ref: np.ndarray, test: np.ndarray) -> TensorDiff:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs tested {test.shape}")
    r = ref.astype(np.float64).ravel()
    t = test.astype(np.float64).ravel()
    nonfinite = int((~np.isfinite(t)).sum())
    ref_nonfinite = int((~np.isfinite(r)).sum())
    if nonfinite or ref_nonfinite:
        # Every measure is meaningless with NaN/Inf in play: report them as infinitely bad.
        inf = float("inf")
        return TensorDiff(inf, inf, inf, float("nan"), nonfinite, ref_nonfinite)
    diff = t - r
    ref_norm = float(np.linalg.norm(r))
    diff_norm = float(np.linalg.norm(diff))
    test_norm = float(np.linalg.norm(t))
    if ref_norm == 0.0:
        rel = 0.0 if diff_norm == 0.0 else float("inf")
    else:
        rel = diff_norm / ref_norm
    cosine = 1.0 if ref_norm == 0.0 and test_norm == 0.0 else float(r @ t / max(ref_norm * test_norm, 1e-300))
    return TensorDiff(
        max_abs=float(np.abs(diff).max(initial=0.0)),
        mean_abs=float(np.abs(diff).mean()) if diff.size else 0.0,
        rel_l2=rel,
        cosine=cosine,
        nonfinite=nonfinite,
        ref_nonfinite=ref_nonfinite,
    )


@dataclass(frozen=True)
class IndexAgreement:
    """Code-index agreement of the quantizer, with near-tie analysis of the disagreements."""

    agreement: float  # fraction of identical indices
    disagreements: int
    near_ties: int  # disagreements whose two codes are within `tie_tolerance` in distance
    worst_gap: float  # largest relative distance gap among disagreements (0 if none)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def index_agreement(ref_idx: np.ndarray, test_idx: np.ndarray, latents: np.ndarray | None = None,
                    codebook: np.ndarray | None = None, tie_tolerance: float = 1e-3) -> IndexAgreement:
    """Compare code indices; with `latents` (B, D, h, w) and `codebook` (K, D), say for each
    disagreement whether the two codes were a near-tie: |d(test) - d(ref)| <= tol * d(ref)."""
    if ref_idx.shape != test_idx.shape:
        raise ValueError(f"shape mismatch: reference {ref_idx.shape} vs tested {test_idx.shape}")
    same = ref_idx == test_idx
    n_diff = int((~same).sum())
    near, worst = 0, 0.0
    if n_diff and latents is not None and codebook is not None:
        vectors = np.moveaxis(latents, 1, -1)[~same].astype(np.float64)  # (n_diff, D)
        codes = codebook.astype(np.float64)
        d_ref = ((vectors - codes[ref_idx[~same]]) ** 2).sum(-1)
        d_test = ((vectors - codes[test_idx[~same]]) ** 2).sum(-1)
        gap = np.abs(d_test - d_ref) / np.maximum(d_ref, 1e-12)
        near = int((gap <= tie_tolerance).sum())
        worst = float(gap.max())
    return IndexAgreement(float(same.mean()) if same.size else 1.0, n_diff, near, worst)


@dataclass(frozen=True)
class OutputComparison:
    """One output against its tolerance: relative L2 (float outputs, must be <= the limit) or the
    fraction of identical elements (integer outputs such as code indices, must be >= the limit)."""

    metric: str  # "rel_l2" or "agreement"
    value: float
    limit: float
    max_abs: float
    details: dict[str, Any] = field(default_factory=dict)  # TensorDiff / IndexAgreement fields

    @property
    def direction(self) -> str:
        return "<=" if self.metric == "rel_l2" else ">="

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.metric == "rel_l2" else self.value >= self.limit


def compare_output(ref: np.ndarray, test: np.ndarray, *, is_float: bool, rel_l2: float, min_agreement: float,
                   latents: np.ndarray | None = None, codebook: np.ndarray | None = None) -> OutputComparison:
    """Compare one output with its reference (export validation and parity use this one comparison).
    For code indices, `latents` and `codebook` add the near-tie analysis of the disagreements."""
    if is_float:
        diff = tensor_diff(ref, test)
        return OutputComparison("rel_l2", diff.rel_l2, rel_l2, diff.max_abs, diff.to_dict())
    agree = index_agreement(ref, test, latents, codebook)
    max_abs = float(np.abs(ref.astype(np.int64) - test.astype(np.int64)).max(initial=0))
    return OutputComparison("agreement", agree.agreement, min_agreement, max_abs, agree.to_dict())


def psnr(ref: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two images (uint8 or float in the same range); inf when identical."""
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * np.log10(peak * peak / mse)


def _gaussian_kernel(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter over the two spatial axes of (N, H, W, C)."""
    out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 1, img)
    out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 2, out)
    return out


def ssim(ref: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004, 7x7 Gaussian window, sigma 1.5) over (N, H, W, C) images."""
    a = ref.astype(np.float64)
    b = test.astype(np.float64)
    if a.ndim == 3:
        a, b = a[None], b[None]
    k = _gaussian_kernel(size=min(7, a.shape[1], a.shape[2]))
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _blur(a, k), _blur(b, k)
    var_a = _blur(a * a, k) - mu_a**2
    var_b = _blur(b * b, k) - mu_b**2
    cov = _blur(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def psnr_per_image(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 (N, H, W, 3) pair (peak 255); identical images give 100 dB."""
    diff = reference.astype(np.float64) - reconstruction.astype(np.float64)
    mse = (diff * diff).reshape(len(reference), -1).mean(axis=1)
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)


# -- batches ----------------------------------------------------------------------------

def take_batch(tensors: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` samples of every array, cycling through them when there are fewer."""
    return {name: np.ascontiguousarray(array[np.arange(batch) % len(array)]) for name, array in tensors.items()}


# -- images -----------------------------------------------------------------------------

def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    scaled = np.clip((images.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def make_grid(images: np.ndarray, columns: int, *, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, C) image; `fill` between tiles."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def to_pil(array: np.ndarray) -> Any:
    """A (H, W, C) uint8 array as a Pillow image (C = 1: greyscale)."""
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(images: np.ndarray, path: Path, *, columns: int = 8, upscale: int = 2) -> Path:
    """Tile (N, H, W, 3) uint8 images, thin grey lines between them, into one PNG (written atomically)."""
    from PIL import Image

    from mmgen_deploy.io_utils import atomic_path

    picture = to_pil(make_grid(images, columns, pad=1, fill=40))
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
