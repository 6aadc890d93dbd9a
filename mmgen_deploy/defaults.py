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
    cache: str = "none"  # step-caching policy (sampling.cache): none, every:N or adaptive:T
    # What a server accepts from one request by default (`triton-repo --max-steps` changes it):
    # larger values are refused, not clipped.
    max_steps: int = 250
    # The bounds every command that samples checks its numbers against (`check_sampling_numbers`),
    # so that a request that would run for days, fill the memory or return garbage is refused in
    # one line before anything is loaded. Values beyond them are refused, not clipped.
    max_cfg_scale: float = 50.0  # guidance beyond this only saturates the images; the server's range too
    # DDIM's eta above 1 would ask for more noise than the step has variance left
    # (sigma^2 > 1 - alpha_prev) and the images fall apart.
    max_eta: float = 1.0
    max_seed: int = 2**63 - 1  # seeds go to NumPy's default_rng and travel as Triton INT64
    max_batch_size: int = 1024  # images per denoiser call: beyond any engine profile and any gain
    # `generate` (and `client`, `eval`, `parity`) keep every image, and a grid of them, in memory
    # until they write the folder: at most this many images in one call.
    max_generate_images: int = 2048
    # `mmgen batch` writes images as they are made: a request line's "n" may be larger, and the
    # file as a whole holds one small job per image in memory.
    max_images_per_line: int = 10_000
    max_batch_images: int = 1_000_000


SAMPLING = SamplingDefaults()
