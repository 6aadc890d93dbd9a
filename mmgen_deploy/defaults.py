"""The sampling defaults and limits, written once.

Library signatures (`sample`, `GenerateRequest`, `BatchSettings`, `EvalSettings`, ...), the CLI's
options, the Triton repository's parameters and the docs all read `SAMPLING`; a test checks
that no other module spells these values out again. This module imports nothing, so the CLI can
read it while it builds its options without loading numpy or a backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 50  # denoising steps (respaced from the training schedule)
    cfg_scale: float = 4.0  # classifier-free guidance scale (DiT's setting for pictures; 1 disables guidance)
    sampler: str = "ddim"
    eta: float = 0.0  # DDIM's noise: 0 is deterministic DDIM, 1 is DDPM-like
    batch_size: int = 16  # images per denoiser call (the Triton model's largest merged batch too)
    # What a server accepts from one request: larger values are refused, not clipped.
    max_steps: int = 250
    max_cfg_scale: float = 50.0


SAMPLING = SamplingDefaults()
