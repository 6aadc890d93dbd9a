"""A diffusers `scheduler_config.json` -> the run's noise schedule and sampler flags.

The flags that change what a sampler computes are honoured (`DiffusionConfig` carries them and
`sampling.schedulers.sampler_schedule` applies them): `timestep_spacing`, `steps_offset`,
`set_alpha_to_one` (DDIM), `final_sigmas_type` (DPM-Solver++), `clip_sample` /
`clip_sample_range` (DDIM, DDPM) and `variance_type` (DDPM). A key the file leaves out takes the
default of the scheduler class it names, as diffusers does. Options the NumPy samplers do not
implement (v-prediction, thresholding, Karras sigmas, solver order 3, ...) are refused by name
rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmgen_deploy.config import DiffusionConfig
from mmgen_deploy.errors import ConfigError
from mmgen_deploy.importers.safe_load import CheckpointError, read_json_object

# The diffusers defaults of the flags we honour, per scheduler class (diffusers 0.2x-0.4x).
_DDIM_LIKE = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
              "clip_sample": True, "clip_sample_range": 1.0}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": _DDIM_LIKE,
    "DDPMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
                      "clip_sample_range": 1.0, "variance_type": "fixed_small"},
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace", "steps_offset": 0,
                                    "final_sigmas_type": "zero"},
}
# The sampler (`--sampler`) that reproduces each scheduler class.
CLASS_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp-2m"}

# option -> (the only values supported, why)
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "thresholding": ((False, None), "dynamic thresholding"),
    "rescale_betas_zero_snr": ((False, None), "zero-SNR rescaled betas"),
    "use_karras_sigmas": ((False, None), "Karras sigmas"),
    "use_exponential_sigmas": ((False, None), "exponential sigmas"),
    "use_beta_sigmas": ((False, None), "beta sigmas"),
    "use_lu_lambdas": ((False, None), "Lu lambdas"),
    "use_flow_sigmas": ((False, None), "flow sigmas"),
    "euler_at_final": ((False, None), "an Euler final step"),
    "algorithm_type": (("dpmsolver++", None), "DPM-Solver variants other than dpmsolver++"),
    "solver_order": ((2, None), "DPM-Solver orders other than 2"),
    "solver_type": (("midpoint", None), "the Heun solver type"),
    "lower_order_final": ((True, None), "lower_order_final=false"),
    "variance_type": (("fixed_small", "fixed_large", "learned_range", None), "that DDPM variance type"),
}


def diffusion_from_scheduler(cfg: dict[str, Any], source: str) -> tuple[DiffusionConfig, dict[str, Any]]:
    """A scheduler config dict -> (DiffusionConfig, what was read, for the run's import record)."""
    cls = str(cfg.get("_class_name") or "")
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{source}: explicit trained_betas are not supported (linear or scaled_linear only)")
    problems = [f"{key}={cfg[key]!r} ({why})" for key, (ok, why) in _UNSUPPORTED.items()
                if key in cfg and cfg[key] not in ok]
    if problems:
        raise CheckpointError(f"{source}: unsupported scheduler option(s): {'; '.join(problems)}",
                              "the samplers here are DDIM, DDPM and DPM-Solver++ 2M with epsilon prediction")
    defaults = CLASS_DEFAULTS.get(cls, {})

    def get(key: str, fallback: Any) -> Any:
        value = cfg.get(key)
        return defaults.get(key, fallback) if value is None else value

    try:
        diffusion = DiffusionConfig(
            num_train_timesteps=int(get("num_train_timesteps", 1000)),
            beta_start=float(get("beta_start", 1e-4)), beta_end=float(get("beta_end", 0.02)),
            beta_schedule=str(get("beta_schedule", "linear")), prediction_type=str(get("prediction_type", "epsilon")),
            timestep_spacing=str(get("timestep_spacing", "leading")), steps_offset=int(get("steps_offset", 0)),
            set_alpha_to_one=bool(get("set_alpha_to_one", True)),
            final_sigmas_type=str(get("final_sigmas_type", "zero")), clip_sample=bool(get("clip_sample", False)),
            clip_sample_range=float(get("clip_sample_range", 1.0)),
            variance_type=str(get("variance_type", "fixed_small")))
        diffusion.validate()
    except (ConfigError, TypeError, ValueError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc)
        raise CheckpointError(f"{source}: {message}",
                              "the samplers here support linear / scaled_linear betas with epsilon prediction"
                              ) from None
    honoured = {k: getattr(diffusion, k) for k in ("timestep_spacing", "steps_offset", "set_alpha_to_one",
                                                   "final_sigmas_type", "clip_sample", "clip_sample_range",
                                                   "variance_type")}
    info = {"class": cls or None, "sampler": CLASS_SAMPLERS.get(cls), "flags": honoured,
            "variance_type": cfg.get("variance_type")}
    return diffusion, info


def read_scheduler(path: Path) -> tuple[DiffusionConfig, dict[str, Any]]:
    """A diffusers scheduler_config.json (or its folder) -> the noise schedule and sampler flags."""
    file = path / "scheduler_config.json" if path.is_dir() else path
    diffusion, info = diffusion_from_scheduler(read_json_object(file), str(file))
    return diffusion, {"path": str(file), **info}
