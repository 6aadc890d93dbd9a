"""One sampling loop for every backend: noise -> denoise loop -> decode chain -> uint8.

The decode chain is what the specs say turns the run's latent into an image
(`specs.decode_components`): quantizer then decoder for a VQ first stage, the decoder alone for a
KL autoencoder; each component gets its predecessor's outputs by name.

The loop only talks to a `Runner` (mmgen_deploy.runtime.base), so PyTorch, ONNX Runtime
and TensorRT run exactly the same arithmetic around the model calls:

- initial noise comes from a seeded NumPy generator (identical on every backend);
- classifier-free guidance is one doubled batch: [cond; uncond] with the null condition
  (the null label, or the empty prompt's text encoding: see `conditioning`);
- latents stay FP32 between steps, whatever precision the denoiser runs in;
- scheduler coefficients are precomputed once; per step, only in-place array updates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.numerics import to_uint8
from mmgen_deploy.sampling.cache import CachedDenoiser, CachePolicy, CacheStats, parse_cache_policy
from mmgen_deploy.sampling.conditioning import Conditioning, class_conditioning
from mmgen_deploy.sampling.schedulers import SAMPLERS, make_scheduler, sampler_kind
from mmgen_deploy.specs import GUIDANCE_BATCH_MULTIPLIER, Tensors, component_specs, decode_components, latent_name

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.runtime.base import Runner

ProgressCallback = Callable[[int, int], None]  # (denoising steps done, total steps over all batches)


@dataclass
class SampleResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    latents: np.ndarray  # float32 (N, C, h, w): the denoised latent (VQ: h, before quantization)
    indices: np.ndarray | None  # int32 (N, h, w): the code indices the decoder saw (None: no quantizer)
    class_ids: list[int]  # class models (empty for text models)
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    batch_size: int
    eta: float = SAMPLING.eta  # DDIM's noise (ddim only)
    backend: str = ""
    precision: str = ""
    device: str = ""
    model_seconds: float = 0.0  # all runner.run calls (denoiser and the decode chain)
    denoise_seconds: float = 0.0  # wall time of the denoising loops
    denoise_model_seconds: float = 0.0  # the denoiser calls within those loops
    total_seconds: float = 0.0  # everything, from noise to uint8 images
    timesteps: list[int] = field(default_factory=list)
    # With return_trajectory: the latent after every step, (steps, N, C, h, w).
    trajectory: np.ndarray | None = None
    prompts: list[str] = field(default_factory=list)  # text models (empty for class models)
    text_encoder_seconds: float = 0.0  # encoding the prompts (once each), before the loops
    # The step-caching policy that ran, its recompute steps and the DiT block evaluations it kept.
    cache: CacheStats = field(default_factory=CacheStats)
    # An audio model's waveforms, float32 (N, samples) at `ModelConfig.audio.sample_rate` (the vocoder's
    # output; `images` then holds the spectrograms it heard). None for image models.
    audio: np.ndarray | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.total_seconds if self.total_seconds > 0 else float("inf")

    @property
    def loop_overhead_fraction(self) -> float:
        """Share of the denoising loop's time spent outside the denoiser calls."""
        if self.denoise_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.denoise_model_seconds / self.denoise_seconds)

    def timing(self) -> dict[str, float]:
        return {"total_seconds": self.total_seconds, "model_seconds": self.model_seconds,
                "denoise_seconds": self.denoise_seconds, "denoise_model_seconds": self.denoise_model_seconds,
                "loop_overhead_fraction": self.loop_overhead_fraction,
                "images_per_second": self.images_per_second}


def check_seed(seed: int, name: str = "seed") -> None:
    """A seed NumPy's default_rng and the Triton server (INT64) both take: an integer in 0..max_seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SAMPLING.max_seed:
        raise UsageError(f"{{{name}}} must be an integer in 0..{SAMPLING.max_seed} (2^63 - 1), got {seed!r}",
                         params=[name])


def check_sampling_numbers(*, steps: int, sampler: str, cfg_scale: float, batch_size: int,
                           eta: float = SAMPLING.eta, seed: int = 0) -> None:
    """The model-independent checks of the sampling arguments, against the bounds in `defaults.SAMPLING`
    (the CLI runs them before reading a run). Messages name the arguments by their parameter names,
    which a caller can word its own way (`MMGenError.describe`)."""
    if steps < 1:
        raise UsageError(f"{{steps}} must be >= 1, got {steps}", params=["steps"])
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown {{sampler}} {sampler!r}", f"choose one of: {', '.join(SAMPLERS)}",
                         params=["sampler"])
    if not (np.isfinite(cfg_scale) and 0 <= cfg_scale <= SAMPLING.max_cfg_scale):
        raise UsageError(f"{{cfg_scale}} must be in 0..{SAMPLING.max_cfg_scale:g}, got {cfg_scale}",
                         "1 disables guidance; DiT uses 4.0 for pictures", params=["cfg_scale"])
    if not 1 <= batch_size <= SAMPLING.max_batch_size:
        raise UsageError(f"{{batch_size}} must be in 1..{SAMPLING.max_batch_size}, got {batch_size}",
                         params=["batch_size"])
    if not (np.isfinite(eta) and 0 <= eta <= SAMPLING.max_eta):
        raise UsageError(f"{{eta}} must be in 0..{SAMPLING.max_eta:g}, got {eta}",
                         "0 is deterministic DDIM, 1 adds as much noise as DDPM", params=["eta"])
    if eta != 0 and sampler_kind(sampler) != "ddim":
        raise UsageError(f"{{eta}} applies to the ddim sampler only, not {sampler}",
                         "leave {eta} out or use {sampler} ddim", params=["eta", "sampler"])
    check_seed(seed)


def validate_sampling_args(config: ModelConfig, class_ids: list[int] | None, *, steps: int, sampler: str,
                           cfg_scale: float, batch_size: int, eta: float) -> None:
    """Refuse bad arguments up front, before any model is loaded or run (class ids: None for prompts).
    The one validation of sampling arguments: `sample` runs it, and so does `generate` before loading."""
    if class_ids is not None:
        class_conditioning(config, class_ids)
    check_sampling_numbers(steps=steps, sampler=sampler, cfg_scale=cfg_scale, batch_size=batch_size, eta=eta)
    if steps > config.diffusion.num_train_timesteps:
        raise UsageError(f"{{steps}} {steps} exceeds the {config.diffusion.num_train_timesteps} "
                         "training timesteps", params=["steps"])
    check_student_settings(config, steps=steps, sampler=sampler, cfg_scale=cfg_scale, eta=eta)


def check_student_settings(config: ModelConfig, *, steps: int, sampler: str, cfg_scale: float, eta: float) -> None:
    """A distilled student samples only as it was trained: its own steps, DDIM without noise, and
    guidance scales within its distilled range."""
    student = config.student
    if student is None:
        return
    if steps != student.steps:
        raise UsageError(f"this student was distilled for {student.steps} steps, not {{steps}} {steps}",
                         f"use {{steps}} {student.steps} (or leave it out)", params=["steps"])
    if sampler_kind(sampler) != student.sampler:
        raise UsageError(f"this student samples with {student.sampler}, not {{sampler}} {sampler}",
                         f"use {{sampler}} {student.sampler} (or leave it out)", params=["sampler"])
    if eta != 0:
        raise UsageError(f"this student was distilled for deterministic steps, not {{eta}} {eta:g}",
                         "leave {eta} out", params=["eta"])
    if not student.accepts_cfg_scale(cfg_scale):
        raise UsageError(f"this student was distilled for guidance scales {student.guidance_min:g}.."
                         f"{student.guidance_max:g}, not {{cfg_scale}} {cfg_scale:g}",
                         f"choose {{cfg_scale}} in that range (default {student.default_cfg_scale:g})",
                         params=["cfg_scale"])


def run_sampling_defaults(config: ModelConfig) -> dict[str, int | float | str]:
    """The steps, sampler and guidance scale a run samples with when none are given: a distilled
    student's own, otherwise `defaults.SAMPLING`."""
    student = config.student
    if student is not None:
        return {"steps": student.steps, "sampler": student.sampler, "cfg_scale": student.default_cfg_scale}
    return {"steps": SAMPLING.steps, "sampler": SAMPLING.sampler, "cfg_scale": SAMPLING.cfg_scale}


def sample(runner: Runner, config: ModelConfig, condition: Sequence[int] | Conditioning, *,
           steps: int = SAMPLING.steps, sampler: str = SAMPLING.sampler, cfg_scale: float = SAMPLING.cfg_scale,
           seed: int = 0, batch_size: int = SAMPLING.batch_size, eta: float = SAMPLING.eta,
           progress: ProgressCallback | None = None, seeds: Sequence[int] | None = None,
           image_indices: Sequence[int] | None = None, return_trajectory: bool = False,
           cache: str | CachePolicy = SAMPLING.cache) -> SampleResult:
    """Generate one image per entry of `condition` with `runner`: class ids, or a
    `Conditioning` (`text_conditioning(...)` for prompts).

    Every image has its own NumPy generator, `default_rng([seed, i])` for image index i (or
    `default_rng([seeds[i], image_indices[i]])` when per-image `seeds` are given, the indices defaulting to
    0: image k of `generate --seed S` is seeds[i] = S, image_indices[i] = k), for its initial noise and
    for any per-step noise (DDPM, DDIM eta > 0). An image therefore depends only on its seed,
    index, class and the sampler settings: never on the batch size or on the other images
    in the batch, on every backend alike.
    `cfg_scale` 1 skips the unconditional half (plain conditional sampling).
    `return_trajectory` keeps the latent after every step (for parity drift reports).
    `cache`: a step-caching policy (`sampling.cache`: none, every:N, adaptive:T); any but none runs the
    denoiser's parts, which the runner must have (`mmgen export --components denoiser_parts`).
    """
    start_total = time.perf_counter()
    conditioning = condition if isinstance(condition, Conditioning) else class_conditioning(config, condition)
    validate_sampling_args(config, None, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           batch_size=batch_size, eta=eta)
    policy = parse_cache_policy(cache)
    cache_stats = CacheStats(policy=policy.spec)
    student = config.student
    scheduler = make_scheduler(sampler, config.diffusion, steps, eta=eta,
                               timesteps=None if student is None else np.asarray(student.timesteps))
    channels, size = config.dit.in_channels, config.dit.input_size
    learned_sigma = config.dit.learn_sigma
    # A guidance-distilled student takes the scale as an input: one evaluation per image, no pair.
    guidance_input = config.dit.guidance_embed
    guided = cfg_scale != 1.0 and not guidance_input
    cfg = float(cfg_scale)

    n = len(conditioning)
    check_seed(seed)
    for image_seed in seeds or ():
        check_seed(int(image_seed))
    if seeds is not None and len(seeds) != n:
        raise UsageError(f"{len(seeds)} seeds for {n} images", "give one seed per image")
    if image_indices is not None and (seeds is None or len(image_indices) != n):
        raise UsageError(f"{len(image_indices)} image indices for {n} images", "give one seed and one index per image")
    if seeds is None:
        image_rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    else:
        image_rngs = [np.random.default_rng([int(seeds[i]), 0 if image_indices is None else int(image_indices[i])])
                      for i in range(n)]
    noise = np.empty((n, channels, size, size), dtype=np.float32)
    for i, rng in enumerate(image_rngs):
        rng.standard_normal(dtype=np.float32, out=noise[i])
    trajectory = np.empty((len(scheduler), *noise.shape), dtype=np.float32) if return_trajectory else None
    latents = np.empty_like(noise)
    specs = component_specs(config, parts=policy.enabled)
    chain = [(name, specs[name].input_names) for name in decode_components(config)]
    first_input = latent_name(config)
    indices: np.ndarray | None = None
    images: np.ndarray | None = None  # uint8 as each batch is decoded: a quarter of the float images' memory
    audio: np.ndarray | None = None
    num_batches = (n + batch_size - 1) // batch_size
    total_steps = num_batches * len(scheduler)
    done = 0
    model_s = denoise_s = denoise_model_s = 0.0

    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        b = stop - start
        mult = GUIDANCE_BATCH_MULTIPLIER if guided else 1
        # Per-batch buffers, reused by every step of the batch.
        x = noise[start:stop].copy()
        x_in = np.empty((mult * b, channels, size, size), dtype=np.float32)
        t_in = np.empty((mult * b,), dtype=np.float32)
        feeds = {Tensors.X_T: x_in, Tensors.T: t_in}
        for name, values in conditioning.feeds.items():  # constant over the steps of the batch
            both = np.empty((mult * b, *values.shape[1:]), dtype=values.dtype)
            both[:b] = values[start:stop]
            if guided:
                both[b:] = conditioning.null_feeds[name]
            feeds[name] = both
        if guidance_input:
            feeds[Tensors.GUIDANCE_SCALE] = np.full((b,), cfg, dtype=np.float32)
        eps = np.empty_like(x)
        step_noise = np.empty_like(x) if scheduler.needs_noise else None
        scheduler.reset()
        if policy.enabled:
            denoise = CachedDenoiser(runner, specs, config.dit, policy, len(scheduler), b, cache_stats)
        else:
            cache_stats.count_whole(config.dit, b, len(scheduler))

        loop_start = time.perf_counter()
        for i in range(len(scheduler)):
            x_in[:b] = x
            if guided:
                x_in[b:] = x
            t_in.fill(scheduler.model_timesteps[i])
            call_start = time.perf_counter()
            if policy.enabled:
                out = denoise(i, feeds)
            else:
                out = runner.run("denoiser", feeds)[Tensors.MODEL_OUTPUT]
            denoise_model_s += time.perf_counter() - call_start
            if guided:
                # eps = eps_uncond + s (eps_cond - eps_uncond), on the noise channels only.
                np.subtract(out[:b, :channels], out[b:, :channels], out=eps)
                eps *= cfg
                eps += out[b:, :channels]
            else:
                np.copyto(eps, out[:b, :channels])
            # Learned sigma: the variance channels of the conditional half (as DiT does).
            v = out[:b, channels:] if learned_sigma else None
            if step_noise is not None:
                for j in range(b):
                    image_rngs[start + j].standard_normal(dtype=np.float32, out=step_noise[j])
            scheduler.step(i, eps, x, v=v, noise=step_noise)
            if trajectory is not None:
                trajectory[i, start:stop] = x
            done += 1
            if progress is not None:
                progress(done, total_steps)
        denoise_s += time.perf_counter() - loop_start
        if policy.enabled:
            denoise.finish()

        call_start = time.perf_counter()
        produced: dict[str, np.ndarray] = {first_input: x}
        for component, inputs in chain:  # each takes what its predecessors produced, by name
            produced.update(runner.run(component, {name: produced[name] for name in inputs}))
        decoded = produced[Tensors.IMAGE]
        model_s += time.perf_counter() - call_start
        decoded_uint8 = to_uint8(decoded)
        if images is None:
            images = np.empty((n, *decoded_uint8.shape[1:]), dtype=np.uint8)
        if Tensors.INDICES in produced:
            if indices is None:
                indices = np.empty((n, *produced[Tensors.INDICES].shape[1:]), dtype=np.int32)
            indices[start:stop] = produced[Tensors.INDICES]
        latents[start:stop] = x
        images[start:stop] = decoded_uint8
        if Tensors.AUDIO in produced:
            if audio is None:
                audio = np.empty((n, *produced[Tensors.AUDIO].shape[1:]), dtype=np.float32)
            audio[start:stop] = produced[Tensors.AUDIO]

    assert images is not None
    total_s = time.perf_counter() - start_total
    return SampleResult(
        images=images, latents=latents, indices=indices, class_ids=list(conditioning.class_ids), seed=seed,
        steps=steps,
        sampler=sampler, cfg_scale=cfg, batch_size=batch_size, eta=float(eta),
        backend=getattr(runner, "backend", ""), precision=getattr(runner, "precision", ""),
        device=getattr(runner, "device", ""), model_seconds=model_s + denoise_model_s,
        denoise_seconds=denoise_s, denoise_model_seconds=denoise_model_s, total_seconds=total_s,
        timesteps=[int(t) for t in scheduler.timesteps], trajectory=trajectory,
        prompts=list(conditioning.prompts), text_encoder_seconds=conditioning.encode_seconds, cache=cache_stats,
        audio=audio,
    )
