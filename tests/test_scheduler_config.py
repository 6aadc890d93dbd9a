"""Imported diffusers scheduler configs are honoured: our NumPy samplers built from a
scheduler_config.json follow diffusers' own scheduler step for step (timesteps and samples)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmgen_deploy.config import DiffusionConfig
from mmgen_deploy.importers.safe_load import CheckpointError
from mmgen_deploy.importers.scheduler import diffusion_from_scheduler, read_scheduler
from mmgen_deploy.sampling.schedulers import make_scheduler, training_alphas_cumprod

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 8, 8)
SAMPLER = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp-2m"}


def _fake_model(x: np.ndarray, t: int) -> np.ndarray:
    """A deterministic stand-in for the denoiser that depends on x and t (large enough to clip)."""
    return (0.7 * x + 0.002 * (t % 97) - 0.3 * np.tanh(3 * x)).astype(np.float32)


def _run_both(cls_name: str, options: dict[str, Any], steps: int) -> tuple[list[int], list[int], float]:
    cls = getattr(diffusers, cls_name)
    oracle = cls(**options)
    cfg = dict(oracle.config)
    cfg["_class_name"] = cls_name
    diffusion, _ = diffusion_from_scheduler(cfg, "test")
    # diffusers keeps alphas_cumprod in float32; ours is float64 (as DiT's). Give the oracle ours.
    oracle.alphas_cumprod = torch.from_numpy(training_alphas_cumprod(diffusion))
    if hasattr(oracle, "final_alpha_cumprod"):
        oracle.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if oracle.config.set_alpha_to_one
                                      else oracle.alphas_cumprod[0])
    oracle.set_timesteps(steps)
    if cls_name == "DPMSolverMultistepScheduler":  # its sigmas were made from the float32 alphas
        a = oracle.alphas_cumprod.numpy()
        ts = oracle.timesteps.numpy()
        last = 0.0 if diffusion.final_sigmas_type == "zero" else float(((1 - a[0]) / a[0]) ** 0.5)
        oracle.sigmas = torch.from_numpy(np.append(((1 - a[ts]) / a[ts]) ** 0.5, last))
    ours = make_scheduler(SAMPLER[cls_name], diffusion, steps)
    x0 = np.random.default_rng(0).standard_normal(SHAPE)
    x_ours = x0.astype(np.float32)
    x_ref = torch.from_numpy(x0.copy())
    for i, t in enumerate(oracle.timesteps.tolist()):
        ours.step(i, _fake_model(x_ours, int(ours.timesteps[i])), x_ours)
        eps = torch.from_numpy(_fake_model(x_ref.numpy(), t).astype(np.float64))
        x_ref = oracle.step(eps, t, x_ref).prev_sample
    ref = x_ref.numpy()
    err = float(np.linalg.norm(x_ours - ref) / np.linalg.norm(ref))
    return [int(t) for t in ours.timesteps], oracle.timesteps.tolist(), err


CASES = [
    ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                       "clip_sample": False}),
    ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                       "clip_sample": True, "clip_sample_range": 0.5}),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "clip_sample": False}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}),
]


@pytest.mark.parametrize(("cls_name", "options"), CASES)
@pytest.mark.parametrize("steps", [7, 20])
def test_scheduler_flags_match_diffusers(cls_name: str, options: dict[str, Any], steps: int) -> None:
    ours_t, ref_t, err = _run_both(cls_name, options, steps)
    assert ours_t == ref_t
    assert err < 1e-5, f"{cls_name} {options}: rel L2 {err:.2e} after {steps} steps"


def test_ddpm_clip_sample_matches_diffusers_mean() -> None:
    """DDPM with clip_sample on its last step (no noise there): the clipped-x0 mean is diffusers'."""
    oracle = diffusers.DDPMScheduler(clip_sample=True, clip_sample_range=0.3, timestep_spacing="trailing")
    cfg = {**dict(oracle.config), "_class_name": "DDPMScheduler"}
    diffusion, _ = diffusion_from_scheduler(cfg, "test")
    oracle.alphas_cumprod = torch.from_numpy(training_alphas_cumprod(diffusion))
    oracle.set_timesteps(10)
    ours = make_scheduler("ddpm", diffusion, 10)
    assert [int(t) for t in ours.timesteps] == oracle.timesteps.tolist()
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    last = len(ours) - 1
    t = int(ours.timesteps[last])
    eps = _fake_model(x, t)
    ref = oracle.step(torch.from_numpy(eps.astype(np.float64)), t, torch.from_numpy(x.astype(np.float64))).prev_sample
    got = ours.step(last, eps, x.copy())
    assert np.allclose(got, ref.numpy(), atol=1e-5)


def test_missing_keys_take_the_class_defaults(tmp_path: Path) -> None:
    """DiT-XL-2-256's scheduler_config.json names no timestep_spacing: diffusers' DDIM default
    ('leading') applies, not the DiT respacing."""
    file = tmp_path / "scheduler_config.json"
    file.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                                "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                                "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0,
                                "trained_betas": None}))
    diffusion, info = read_scheduler(tmp_path)
    assert diffusion.timestep_spacing == "leading" and info["sampler"] == "ddim"
    assert make_scheduler("ddim", diffusion, 50).timesteps[0] == 980
    assert make_scheduler("ddim", DiffusionConfig(), 50).timesteps[0] == 999


@pytest.mark.parametrize(("option", "value"), [("thresholding", True), ("use_karras_sigmas", True),
                                               ("solver_order", 3), ("prediction_type", "v_prediction")])
def test_unsupported_scheduler_options_are_named(option: str, value: object) -> None:
    with pytest.raises(CheckpointError, match=option if option != "prediction_type" else "v_prediction"):
        diffusion_from_scheduler({"_class_name": "DPMSolverMultistepScheduler", option: value}, "cfg.json")
