from __future__ import annotations

import math

import numpy as np

from mmgen_deploy.numerics import index_agreement, psnr, ssim, tensor_diff
from mmgen_deploy.parity.report import Check, ParityReport


def test_tensor_diff_measures() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8)).astype(np.float32)
    d = tensor_diff(ref, ref)
    assert d.max_abs == 0 and d.rel_l2 == 0 and math.isclose(d.cosine, 1.0)
    noisy = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    d = tensor_diff(ref, noisy)
    assert 0.005 < d.rel_l2 < 0.02 and d.cosine > 0.999 and d.nonfinite == 0
    bad = noisy.copy()
    bad[0, 0] = np.nan
    d = tensor_diff(ref, bad)
    assert d.nonfinite == 1 and math.isinf(d.rel_l2) and math.isinf(d.min_passing_rel_l2)


def test_index_agreement_flags_near_ties() -> None:
    codebook = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    # Point exactly between codes 0 and 1 (a tie), and a point clearly at code 2.
    latents = np.array([[0.5, 10.0], [0.0, 10.0]]).reshape(1, 2, 1, 2)  # (B, D, h, w)
    ref = np.array([[[0, 2]]])
    tie_flip = np.array([[[1, 2]]])
    real_flip = np.array([[[0, 0]]])
    a = index_agreement(ref, tie_flip, latents, codebook)
    assert a.disagreements == 1 and a.near_ties == 1 and a.agreement == 0.5
    b = index_agreement(ref, real_flip, latents, codebook)
    assert b.disagreements == 1 and b.near_ties == 0 and b.worst_gap > 1


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert math.isinf(psnr(img, img)) and math.isclose(ssim(img, img), 1.0)
    noisy = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    assert 35 < psnr(img, noisy) < 50
    other = rng.integers(0, 256, img.shape).astype(np.uint8)
    assert psnr(img, other) < 10 and ssim(img, other) < 0.1 < ssim(img, noisy)


def test_report_verdict() -> None:
    report = ParityReport("t")
    report.add(Check("encoder", "h rel_l2", 1e-6, 1e-5, "<="))
    assert report.passed and report.verdict().startswith("PASSED")
    report.add(Check("end-to-end", "image PSNR", 20.0, 30.0, ">="))
    report.add(Check("decoder", "nan", float("nan"), 0.0, "<="))
    assert not report.passed and "end-to-end: image PSNR" in report.verdict()
    assert [c.passed for c in report.checks] == [True, False, False]
