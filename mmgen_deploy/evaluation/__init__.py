"""Measuring a run: VQ reconstruction PSNR, codebook use, and (on `shapes`) conditional accuracy."""

from mmgen_deploy.evaluation.checker import Verdict, judge
from mmgen_deploy.evaluation.metrics import codebook_usage, psnr_per_image, vq_metrics

__all__ = ["Verdict", "codebook_usage", "judge", "psnr_per_image", "vq_metrics"]
