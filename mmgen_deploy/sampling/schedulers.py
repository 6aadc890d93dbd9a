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

from typing import Literal

import numpy as np

from mmgen_deploy.config import DiffusionConfig
from mmgen_deploy.errors import UsageError

SamplerName = Literal["ddpm", "ddim", "dpmpp-2m"]
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm", "dpmpp-2m")


def training_alphas_cumprod(diffusion: DiffusionConfig) -> np.ndarray:
    """Cumulative alpha products of the training schedule (float64, length T)."""
    if diffusion.beta_schedule != "linear":  # DiffusionConfig.validate already refuses others
        raise UsageError(f"unsupported beta schedule {diffusion.beta_schedule!r}")
    betas = np.linspace(diffusion.beta_start, diffusion.beta_end, diffusion.num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def respaced_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The N training timesteps a respaced sampler visits, largest first (int64).

    t_i = round(i * (T - 1) / (N - 1)); N = 1 means a single step from t = T - 1.
    """
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if steps > num_train_timesteps:
        raise UsageError(f"steps {steps} exceeds the {num_train_timesteps} training timesteps",
                         f"use --steps <= {num_train_timesteps}")
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
        if timesteps is None:
            timesteps = respaced_timesteps(diffusion.num_train_timesteps, steps)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        if timesteps.ndim != 1 or len(timesteps) < 1 or np.any(np.diff(timesteps) >= 0):
            raise UsageError("timesteps must be a non-empty, strictly decreasing list")
        if timesteps[0] >= diffusion.num_train_timesteps or timesteps[-1] < 0:
            raise UsageError(f"timesteps must lie in [0, {diffusion.num_train_timesteps - 1}]")
        self.timesteps = timesteps
        # The model takes float32 timesteps (specs.py); precomputed once.
        self.model_timesteps = timesteps.astype(np.float32)
        self.alpha_t = abar[timesteps]
        # The cumulative alpha after each step: the next timestep's, or 1 after the last.
        self.alpha_prev = np.append(abar[timesteps[1:]], 1.0)
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

    def __init__(self, diffusion: DiffusionConfig, steps: int, *, eta: float = 0.0,
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

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        tmp = self._linear_update(index, eps, x)
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
        var_post = np.maximum(beta * (1 - a_prev) / (1 - a_t), 1e-20)  # diffusers' clamp for the t=0 step
        self.std = [float(s) for s in np.sqrt(var_post)]
        self.log_var_post = [float(s) for s in np.log(var_post)]
        self.log_beta = [float(s) for s in np.log(beta)]
        self.add_noise = [i < len(self.timesteps) - 1 and int(t) > 0 for i, t in enumerate(self.timesteps)]

    def step(self, index: int, eps: np.ndarray, x: np.ndarray, *, v: np.ndarray | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        tmp = self._linear_update(index, eps, x)
        if not self.add_noise[index]:
            return x
        if noise is None:
            raise ValueError("DDPM needs noise")
        if v is None:
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
        h = np.append(lam[1:] - lam[:-1], np.inf)
        # Second order where a previous x0 exists and the step is not the last one.
        self.second_order = [0 < i < n - 1 for i in range(n)]
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


def make_scheduler(name: str, diffusion: DiffusionConfig, steps: int, *, eta: float = 0.0,
                   timesteps: np.ndarray | None = None) -> Scheduler:
    """Build a sampler by CLI name: "ddim", "ddpm" or "dpmpp-2m"."""
    if name == "ddim":
        return DDIMScheduler(diffusion, steps, eta=eta, timesteps=timesteps)
    if name == "ddpm":
        return DDPMScheduler(diffusion, steps, timesteps=timesteps)
    if name in ("dpmpp-2m", "dpm++2m", "dpmpp_2m"):
        return DPMSolverPP2MScheduler(diffusion, steps, timesteps=timesteps)
    raise UsageError(f"unknown sampler {name!r}", f"choose one of: {', '.join(SAMPLERS)}")
