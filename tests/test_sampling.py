"""The sampling loop on the PyTorch runner (and, further down, ONNX Runtime against it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen_deploy.errors import UsageError
from mmgen_deploy.runtime import Runner
from mmgen_deploy.runtime.torch_runner import TorchRunner
from mmgen_deploy.sampling import sample
from mmgen_deploy.sampling.schedulers import training_alphas_cumprod


@pytest.fixture()
def torch_runner(random_models) -> TorchRunner:
    config, vq, dit = random_models
    return TorchRunner(vq, dit, "cpu", config=config)


def test_torch_runner_implements_the_protocol(torch_runner: TorchRunner) -> None:
    assert isinstance(torch_runner, Runner)
    assert (torch_runner.backend, torch_runner.precision, torch_runner.device) == ("torch", "fp32", "cpu")


def test_sample_shapes_dtypes_and_determinism(random_models, torch_runner: TorchRunner) -> None:
    config = random_models[0]
    calls: list[tuple[int, int]] = []
    result = sample(torch_runner, config, [0, 5, 17], steps=4, sampler="ddim", seed=3, batch_size=2,
                    progress=lambda done, total: calls.append((done, total)))
    assert result.images.shape == (3, 32, 32, 3) and result.images.dtype == np.uint8
    assert result.latents.shape == (3, 4, 8, 8) and result.latents.dtype == np.float32
    assert result.indices.shape == (3, 8, 8) and result.indices.dtype == np.int32
    assert result.timesteps == [999, 666, 333, 0]
    assert calls[-1] == (8, 8) and len(calls) == 8  # 2 batches x 4 steps
    assert result.images.std() > 0  # a real, non-constant picture
    assert 0 < result.denoise_model_seconds <= result.denoise_seconds <= result.total_seconds
    again = sample(torch_runner, config, [0, 5, 17], steps=4, sampler="ddim", seed=3, batch_size=2)
    assert np.array_equal(again.images, result.images)
    # Deterministic samplers do not depend on the batch split (noise is drawn up front).
    one_batch = sample(torch_runner, config, [0, 5, 17], steps=4, sampler="ddim", seed=3, batch_size=8)
    np.testing.assert_allclose(one_batch.latents, result.latents, rtol=1e-4, atol=1e-4)
    other_seed = sample(torch_runner, config, [0, 5, 17], steps=4, sampler="ddim", seed=4, batch_size=2)
    assert not np.allclose(other_seed.latents, result.latents)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m"])
def test_other_samplers_run_and_are_seeded(random_models, torch_runner: TorchRunner, sampler: str) -> None:
    config = random_models[0]
    a = sample(torch_runner, config, [1, 2], steps=3, sampler=sampler, seed=0, batch_size=2)
    b = sample(torch_runner, config, [1, 2], steps=3, sampler=sampler, seed=0, batch_size=2)
    assert np.array_equal(a.latents, b.latents) and np.isfinite(a.latents).all()


def test_loop_matches_an_independent_torch_reference(random_models, torch_runner: TorchRunner) -> None:
    """The NumPy loop against a plain PyTorch loop with diffusers' DPM-Solver++ and CFG in torch."""
    diffusers = pytest.importorskip("diffusers")
    config, vq, dit = random_models
    classes, steps, scale, seed = [3, 9], 5, 4.0, 11
    ours = sample(torch_runner, config, classes, steps=steps, sampler="dpmpp-2m", cfg_scale=scale, seed=seed)

    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                                      algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero")
    scheduler.alphas_cumprod = torch.from_numpy(training_alphas_cumprod(config.diffusion))
    scheduler.set_timesteps(timesteps=ours.timesteps)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, 4, 8, 8), dtype=np.float32))
    y = torch.tensor(classes + [config.dit.num_classes] * 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = dit(torch.cat([x, x]), torch.full((4,), float(t)), y)
            cond, uncond = out[:2, :4], out[2:, :4]
            x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
        z_q, idx = vq.quantize.quantize(x)
        image = vq.decode(z_q)
    np.testing.assert_allclose(ours.latents, x.numpy(), rtol=1e-4, atol=1e-4)
    assert np.array_equal(ours.indices, idx.numpy())
    expected = np.rint(np.clip((image.numpy() + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(ours.images.astype(int) - expected.astype(int)).max() <= 1


def test_cfg_scale_one_runs_a_single_batch(random_models, torch_runner: TorchRunner) -> None:
    config = random_models[0]
    seen: list[int] = []
    real_run = torch_runner.run

    def counting_run(component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component == "denoiser":
            seen.append(len(feeds["x_t"]))
        return real_run(component, feeds)

    torch_runner.run = counting_run  # type: ignore[method-assign]
    sample(torch_runner, config, [0, 1, 2], steps=2, cfg_scale=1.0)
    sample(torch_runner, config, [0, 1, 2], steps=2, cfg_scale=4.0)
    assert seen == [3, 3, 6, 6]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"cfg_scale": -1.0}, "cfg scale"),
    ({"batch_size": 0}, "batch size"),
    ({"sampler": "euler"}, "unknown sampler"),
])
def test_bad_numbers_are_refused(random_models, torch_runner: TorchRunner, kwargs, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sample(torch_runner, random_models[0], [0], **kwargs)
    with pytest.raises(UsageError, match="out of range"):
        sample(torch_runner, random_models[0], [18])
