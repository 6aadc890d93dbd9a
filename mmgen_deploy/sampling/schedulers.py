"""Diffusion samplers in NumPy: DDPM (respaced), DDIM (eta) and DPM-Solver++ 2M.

No torch at run time: the device that runs the engines may not have it. Every
per-step coefficient is computed once in float64 when the scheduler is built; a
step is then a handful of in-place float32 array operations, so latents stay FP32
between steps whatever precision the denoiser runs in.

Respacing (DiT / improved-diffusion convention, also diffusers' "linspace"): with N
steps the model is called at t_i = round(i * (T - 1) / (N - 1)), visited from the
largest down, always with the original training timestep. The "previous" cumulative
alpha of the last step is 1 (the clean sample).
"""

from __future__ import annotations

import numpy as np

from mmgen_deploy.config import DiffusionConfig
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError

SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "dpmpp-2m")


def training_alphas_cumprod(diffusion: DiffusionConfig) -> np.ndarray:
    """Cumulative alpha products of the training schedule (float64, length T)."""
    T = diffusion.num_train_timesteps
    if diffusion.beta_schedule == "linear":
        betas = np.linspace(diffusion.beta_start, diffusion.beta_end, T, dtype=np.float64)
    elif diffusion.beta_schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        betas = np.linspace(diffusion.beta_start**0.5, diffusion.beta_end**0.5, T, dtype=np.float64) ** 2
    else:  # DiffusionConfig.validate already refuses others
        raise UsageError(f"unsupported beta schedule {diffusion.beta_schedule!r}")
    return np.cumprod(1.0 - betas)


def _spaced(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """diffusers' DDIM/DDPM timesteps for `n` steps (largest first)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def _spaced_dpm(spacing: str, T: int, n: int, offset: int) -> np.ndarray:
    """diffusers' DPMSolverMultistep timesteps (n + 1 points, the last one dropped)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(T, 0, -T / n).round().astype(np.int64) - 1  # trailing


def sampler_schedule(sampler: str, diffusion: DiffusionConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps visited, largest first; the cumulative alpha each step lands on), per sampler.

    "respaced" (DiT): `respaced_timesteps`, every step lands on the next visited timestep and the
    last on the clean sample (alpha 1). The diffusers spacings reproduce that scheduler's
    `set_timesteps` and its notion of the previous timestep:
    - DDIM: t_prev = t - T // N (not necessarily the next visited one under "linspace"); below 0
      the final alpha is 1 with `set_alpha_to_one`, else alpha_0;
    - DDPM: the next visited timestep, then alpha 1;
    - DPM-Solver++: N + 1 points with the last dropped; the next visited timestep, then sigma 0
      (`final_sigmas_type` "zero") or sigma_min (alpha_0).
    """
    T = diffusion.num_train_timesteps
    if steps < 1:
        raise UsageError(f"{{steps}} must be >= 1, got {steps}", params=["steps"])
    if steps > T:
        raise UsageError(f"{{steps}} {steps} exceeds the {T} training timesteps", f"use {{steps}} <= {T}",
                         params=["steps"])
    abar = training_alphas_cumprod(diffusion)
    spacing, kind = diffusion.timestep_spacing, sampler_kind(sampler)
    if spacing == "respaced":
        timesteps = respaced_timesteps(T, steps)
        return timesteps, np.append(abar[timesteps[1:]], 1.0)
    if kind == "dpmpp-2m":
        timesteps = _spaced_dpm(spacing, T, steps, diffusion.steps_offset)
        final = 1.0 if diffusion.final_sigmas_type == "zero" else float(abar[0])
        return timesteps, np.append(abar[timesteps[1:]], final)
    timesteps = _spaced(spacing, T, steps, diffusion.steps_offset)
    if kind == "ddpm":
        return timesteps, np.append(abar[timesteps[1:]], 1.0)
    final = 1.0 if diffusion.set_alpha_to_one else float(abar[0])
    prev = timesteps - T // steps
    return timesteps, np.where(prev >= 0, abar[np.maximum(prev, 0)], final)


def sampler_kind(name: str) -> str:
    """The canonical sampler name ("ddim", "ddpm", "dpmpp-2m") of a CLI spelling."""
    if name in ("dpmpp-2m", "dpm++2m", "dpmpp_2m"):
        return "dpmpp-2m"
    if name in ("ddim", "ddpm"):
        return name
    raise UsageError(f"unknown sampler {name!r}", f"choose one of: {', '.join(SAMPLERS)}")


def respaced_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The N training timesteps a respaced sampler visits, largest first (int64).

    t_i = round(i * (T - 1) / (N - 1)); N = 1 means a single step from t = T - 1.
    """
    if steps < 1:
        raise UsageError(f"{{steps}} must be >= 1, got {steps}", params=["steps"])
    if steps > num_train_timesteps:
        raise UsageError(f"{{steps}} {steps} exceeds the {num_train_timesteps} training timesteps",
                         f"use {{steps}} <= {num_train_timesteps}", params=["steps"])
    if steps == 1:
        return np.array([num_train_timesteps - 1], dtype=np.int64)
    return np.linspace(0, num_train_timesteps - 1, steps).round()[::-1].astype(np.int64)


class Scheduler:
    """Base class: the timestep list, the cumulative alphas along it, scratch buffers.

    Usage per batch: `reset()`, then for i in range(len(timesteps)):
    `x = step(i, eps, x, v=..., noise=...)` (x is updated in place and returned).
    `eps` is the (guided) noise prediction; `v` the learned-variance channels (DDPM only).
    """

    name: str = ""
    needs_noise: bool = False  # True when step() consumes fresh Gaussian noise
    coef_x: list[float]  # set by the samplers that use _linear_update
    coef_eps: list[float]

    def __init__(self, diffusion: DiffusionConfig, steps: int, *, timesteps: np.ndarray | None = None) -> None:
        self.diffusion = diffusion
        abar = training_alphas_cumprod(diffusion)
        alpha_prev: np.ndarray | None = None
        if timesteps is None:
            timesteps, alpha_prev = sampler_schedule(self.name, diffusion, steps)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        if timesteps.ndim != 1 or len(timesteps) < 1 or np.any(np.diff(timesteps) >= 0):
            raise UsageError("timesteps must be a non-empty, strictly decreasing list")
        if timesteps[0] >= diffusion.num_train_timesteps or timesteps[-1] < 0:
            raise UsageError(f"timesteps must lie in [0, {diffusion.num_train_timesteps - 1}]")
        self.timesteps = timesteps
        # The model takes float32 timesteps (specs.py); precomputed once.
        self.model_timesteps = timesteps.astype(np.float32)
        self.alpha_t = abar[timesteps]
        # The cumulative alpha after each step: the next timestep's, or 1 after the last (given
        # timesteps); `sampler_schedule` says where each step lands otherwise.
        self.alpha_prev = np.append(abar[timesteps[1:]], 1.0) if alpha_prev is None else alpha_prev
        # diffusers' clip_sample: x0 is clipped before it is used (then the update is not linear).
        self.clip = float(diffusion.clip_sample_range) if diffusion.clip_sample else None
        self._scratch: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        """Forget multistep history before a new batch."""

    def _buffer(self, key: str, like: np.ndarray) -> np.ndarray:
        buf = self._scratch.get(key)
        if buf is None or buf.shape != like.shape:
            buf = np.empty_like(like)
            self._scratch[key] = buf
        return buf

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def _linear_update(self, index: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x <- coef_x[i] x + coef_eps[i] eps, in place: the deterministic part of DDIM and DDPM
        (both fold x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t) into two coefficients per step).
        Returns the scratch buffer, free for the caller's noise term."""
        tmp = self._buffer("eps", x)
        np.multiply(eps, self.coef_eps[index], out=tmp)
        x *= self.coef_x[index]
        x += tmp
        return tmp


class DDIMScheduler(Scheduler):
    """DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev); eta = 0 is deterministic."""

    name = "ddim"

    def __init__(self, diffusion: DiffusionConfig, steps: int, *, eta: float = SAMPLING.eta,
                 timesteps: np.ndarray | None = None) -> None:
        super().__init__(diffusion, steps, timesteps=timesteps)
        if eta < 0:
            raise UsageError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        self.needs_noise = eta > 0
        a_t, a_prev = self.alpha_t, self.alpha_prev
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        # x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), folded into x_prev = cx x + ce eps + sigma z.
        self.coef_x = [float(c) for c in np.sqrt(a_prev / a_t)]
        self.coef_eps = [float(c) for c in np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0))
                         - np.sqrt(a_prev) * np.sqrt(1 - a_t) / np.sqrt(a_t)]
        self.sigma = [float(s) for s in sigma]
        # With clip_sample: x_prev = sqrt(a_prev) clip(x0) + sqrt(1 - a_prev - sigma^2) eps + sigma z.
        self.x0_coef_x = [float(c) for c in 1 / np.sqrt(a_t)]
        self.x0_coef_eps = [float(c) for c in -np.sqrt(1 - a_t) / np.sqrt(a_t)]
        self.sqrt_a_prev = [float(c) for c in np.sqrt(a_prev)]
        self.dir_eps = [float(c) for c in np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0))]

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        if self.clip is None:
            tmp = self._linear_update(index, eps, x)
        else:
            tmp = self._buffer("eps", x)
            x *= self.x0_coef_x[index]
            np.multiply(eps, self.x0_coef_eps[index], out=tmp)
            x += tmp
            np.clip(x, -self.clip, self.clip, out=x)
            x *= self.sqrt_a_prev[index]
            np.multiply(eps, self.dir_eps[index], out=tmp)
            x += tmp
        if self.sigma[index] > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs noise")
            np.multiply(noise, self.sigma[index], out=tmp)
            x += tmp
        return x


class DDPMScheduler(Scheduler):
    """Ancestral DDPM on the respaced chain (respaced beta_t = 1 - a_t / a_prev).

    Variance: the posterior variance beta_t (1 - a_prev)/(1 - a_t), or, with a learned
    sigma v in [-1, 1], exp(f log beta_t + (1 - f) log var_posterior), f = (v + 1)/2.
    No noise is added on the last step.
    """

    name = "ddpm"
    needs_noise = True

    def __init__(self, diffusion: DiffusionConfig, steps: int, *, timesteps: np.ndarray | None = None) -> None:
        super().__init__(diffusion, steps, timesteps=timesteps)
        a_t, a_prev = self.alpha_t, self.alpha_prev
        beta = 1 - a_t / a_prev
        c_x0_x, c_x0_eps = 1 / np.sqrt(a_t), -np.sqrt(1 / a_t - 1)
        m_x0 = beta * np.sqrt(a_prev) / (1 - a_t)
        m_x = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a_t)
        self.coef_x = [float(c) for c in m_x0 * c_x0_x + m_x]
        self.coef_eps = [float(c) for c in m_x0 * c_x0_eps]
        # With clip_sample: mean = m_x0 clip(x0) + m_x x.
        self.x0_coef_x, self.x0_coef_eps = [float(c) for c in c_x0_x], [float(c) for c in c_x0_eps]
        self.m_x0, self.m_x = [float(c) for c in m_x0], [float(c) for c in m_x]
        var_post = np.maximum(beta * (1 - a_prev) / (1 - a_t), 1e-20)  # diffusers' clamp for the t=0 step
        self.learned = diffusion.variance_type == "learned_range"
        fixed = beta if diffusion.variance_type == "fixed_large" else var_post
        self.std = [float(s) for s in np.sqrt(fixed)]
        self.log_var_post = [float(s) for s in np.log(var_post)]
        self.log_beta = [float(s) for s in np.log(beta)]
        self.add_noise = [i < len(self.timesteps) - 1 and int(t) > 0 for i, t in enumerate(self.timesteps)]

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        if self.clip is None:
            tmp = self._linear_update(index, eps, x)
        else:
            tmp = self._buffer("eps", x)
            x0 = self._buffer("x0", x)
            np.multiply(x, self.x0_coef_x[index], out=x0)
            np.multiply(eps, self.x0_coef_eps[index], out=tmp)
            x0 += tmp
            np.clip(x0, -self.clip, self.clip, out=x0)
            x *= self.m_x[index]
            x0 *= self.m_x0[index]
            x += x0
        if not self.add_noise[index]:
            return x
        if noise is None:
            raise ValueError("DDPM needs noise")
        if v is None or not self.learned:
            np.multiply(noise, self.std[index], out=tmp)
        else:
            # std = exp(0.5 * (f log beta + (1 - f) log var_post)), f = (v + 1) / 2,
            # i.e. exp(a v + b) with a = (log beta - log var_post) / 4, b = (log beta + log var_post) / 4.
            lb, lp = self.log_beta[index], self.log_var_post[index]
            np.multiply(v, (lb - lp) / 4, out=tmp)
            tmp += (lb + lp) / 4
            np.exp(tmp, out=tmp)
            tmp *= noise
        x += tmp
        return x


class DPMSolverPP2MScheduler(Scheduler):
    """DPM-Solver++ (2M, midpoint), data prediction, first order on the first and last step.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), h = lambda_next - lambda_now:
    x_next = (sigma_next / sigma_now) x + alpha_next (1 - exp(-h)) (D0 + D1 / 2),
    D0 = x0_now, D1 = (x0_now - x0_prev) / r, r = h_prev / h. The last step lands on
    sigma = 0 (diffusers' final_sigmas_type="zero"), which returns x0 itself.
    """

    name = "dpmpp-2m"

    def __init__(self, diffusion: DiffusionConfig, steps: int, *, timesteps: np.ndarray | None = None) -> None:
        super().__init__(diffusion, steps, timesteps=timesteps)
        a_now, a_next = self.alpha_t, self.alpha_prev
        alpha_now, sigma_now = np.sqrt(a_now), np.sqrt(1 - a_now)
        alpha_next, sigma_next = np.sqrt(a_next), np.sqrt(1 - a_next)
        # exp(-h) = (sigma_next / alpha_next) / (sigma_now / alpha_now): exactly 0 on the final
        # step instead of exp(-inf), so no infinities are ever formed.
        exp_neg_h = (sigma_next * alpha_now) / (alpha_next * sigma_now)
        self.x0_coef_x = [float(c) for c in 1 / alpha_now]
        self.x0_coef_eps = [float(c) for c in -sigma_now / alpha_now]
        self.ratio = [float(c) for c in sigma_next / sigma_now]
        self.phi = [float(c) for c in alpha_next * (1 - exp_neg_h)]
        n = len(self.timesteps)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha_now / sigma_now)
        with np.errstate(divide="ignore"):
            lam_next = np.log(alpha_next / sigma_next)
        h = lam_next - lam
        # Second order where a previous x0 exists and the step is not the last one (diffusers:
        # first order on the last step when it lands on sigma 0 or with fewer than 15 steps).
        last_first_order = diffusion.final_sigmas_type == "zero" or n < 15 or bool(a_next[-1] >= 1.0)
        self.second_order = [i > 0 and (i < n - 1 or not last_first_order) for i in range(n)]
        self.inv_r = [float(h[i] / h[i - 1]) if self.second_order[i] else 0.0 for i in range(n)]
        self._has_prev = False

    def reset(self) -> None:
        self._has_prev = False

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        x0 = self._buffer("x0", x)
        x0_prev = self._buffer("x0_prev", x)
        tmp = self._buffer("tmp", x)
        np.multiply(x, self.x0_coef_x[index], out=x0)
        np.multiply(eps, self.x0_coef_eps[index], out=tmp)
        x0 += tmp
        x *= self.ratio[index]
        phi = self.phi[index]
        if self.second_order[index] and self._has_prev:
            # D0 + D1/2 = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
            half_inv_r = 0.5 * self.inv_r[index]
            np.multiply(x0, phi * (1 + half_inv_r), out=tmp)
            x += tmp
            np.multiply(x0_prev, -phi * half_inv_r, out=tmp)
            x += tmp
        else:
            np.multiply(x0, phi, out=tmp)
            x += tmp
        # Keep this step's x0 for the next one (swap the buffers, no copy).
        self._scratch["x0"], self._scratch["x0_prev"] = x0_prev, x0
        self._has_prev = True
        return x


def make_scheduler(name: str, diffusion: DiffusionConfig, steps: int, *, eta: float = SAMPLING.eta,
                   timesteps: np.ndarray | None = None) -> Scheduler:
    """Build a sampler by CLI name: "ddim", "ddpm" or "dpmpp-2m"."""
    kind = sampler_kind(name)
    if kind == "ddim":
        return DDIMScheduler(diffusion, steps, eta=eta, timesteps=timesteps)
    if kind == "ddpm":
        return DDPMScheduler(diffusion, steps, timesteps=timesteps)
    return DPMSolverPP2MScheduler(diffusion, steps, timesteps=timesteps)
