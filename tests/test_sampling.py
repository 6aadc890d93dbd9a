"""The sampling loop on the PyTorch runner (and, further down, ONNX Runtime against it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen_deploy.errors import UsageError
from mmgen_deploy.models import DiT, rerandomize_
from mmgen_deploy.models.load import load_dit
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
    # Images do not depend on the batch split: every image has its own noise generator.
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
    # Per-step noise (DDPM) is per image too, so splitting the batch changes nothing...
    split = sample(torch_runner, config, [1, 2], steps=3, sampler=sampler, seed=0, batch_size=1)
    np.testing.assert_allclose(split.latents, a.latents, rtol=1e-4, atol=1e-4)
    # ...and per-image seeds reproduce the image a single-image run with that seed makes.
    alone = sample(torch_runner, config, [2], steps=3, sampler=sampler, seed=5, batch_size=1)
    mixed = sample(torch_runner, config, [1, 2], steps=3, sampler=sampler, seeds=[9, 5], batch_size=2)
    np.testing.assert_allclose(mixed.latents[1], alone.latents[0], rtol=1e-4, atol=1e-4)


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
    # Each image's noise comes from its own generator, default_rng([seed, index]).
    x = torch.from_numpy(np.stack([np.random.default_rng([seed, i]).standard_normal((4, 8, 8), dtype=np.float32)
                                   for i in range(2)]))
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


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_ddpm_loop_matches_diffusers_ddpm_scheduler_loop(random_models, learned_sigma: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole DDPM run (ancestral noise every step, guidance, learned sigma from the conditional half)
    against a plain PyTorch loop driving diffusers' DDPMScheduler, fed the same per-image noise."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    config, vq, dit = random_models
    if learned_sigma:
        config = config.replace(dit=config.dit.replace(learn_sigma=True))
        torch.manual_seed(0)
        dit = rerandomize_(DiT(config.dit), seed=3).eval()
    classes, steps, scale, seed = [3, 9], 6, 4.0, 11
    ours = sample(TorchRunner(vq, dit, "cpu", config=config), config, classes, steps=steps, sampler="ddpm",
                  cfg_scale=scale, seed=seed)

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", timestep_spacing="linspace", clip_sample=False,
                                        variance_type="learned_range" if learned_sigma else "fixed_small")
    scheduler.alphas_cumprod = torch.from_numpy(training_alphas_cumprod(config.diffusion))
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == ours.timesteps
    # Each image's generator, default_rng([seed, index]), gives its initial noise and then one draw
    # per step; diffusers takes its step noise from randn_tensor, so hand it those draws.
    rngs = [np.random.default_rng([seed, i]) for i in range(2)]
    x = torch.from_numpy(np.stack([r.standard_normal((4, 8, 8), dtype=np.float32) for r in rngs]))
    step_noise: list[torch.Tensor] = []
    taken: list[int] = []

    def next_noise(shape: tuple[int, ...], **_: object) -> torch.Tensor:
        taken.append(int(t))
        return step_noise.pop()

    monkeypatch.setattr(ddpm_module, "randn_tensor", next_noise)
    y = torch.tensor(classes + [config.dit.num_classes] * 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            step_noise[:] = [torch.from_numpy(np.stack([r.standard_normal((4, 8, 8), dtype=np.float32)
                                                        for r in rngs]))]
            out = dit(torch.cat([x, x]), torch.full((4,), float(t)), y)
            cond, uncond = out[:2, :4], out[2:, :4]
            model_output = uncond + scale * (cond - uncond)
            if learned_sigma:
                model_output = torch.cat([model_output, out[:2, 4:]], dim=1)
            x = scheduler.step(model_output, t, x).prev_sample
        assert taken == scheduler.timesteps.tolist()[:-1]  # every step but the last (t = 0) took its noise
        _, idx = vq.quantize.quantize(x)
    np.testing.assert_allclose(ours.latents, x.numpy(), rtol=1e-4, atol=1e-4)
    assert np.array_equal(ours.indices, idx.numpy())


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
    ({"cfg_scale": -1.0}, "cfg_scale must be in 0..50"),
    ({"batch_size": 0}, "batch_size must be in 1.."),
    ({"sampler": "euler"}, "unknown sampler"),
])
def test_bad_numbers_are_refused(random_models, torch_runner: TorchRunner, kwargs, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sample(torch_runner, random_models[0], [0], **kwargs)
    with pytest.raises(UsageError, match="out of range"):
        sample(torch_runner, random_models[0], [18])


# -- ONNX Runtime against PyTorch ------------------------------------------------------------------

def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from mmgen_deploy.numerics import psnr

    return psnr(a, b)


def test_ort_runner_components_match_torch(exported_tiny_run) -> None:
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.specs import component_specs

    config = exported_tiny_run.load_config()
    ort_runner, _ = open_runner(exported_tiny_run.root, "onnxruntime", "fp32", threads=1)
    torch_runner, _ = open_runner(exported_tiny_run.root, "torch")
    assert isinstance(ort_runner, Runner)
    assert (ort_runner.backend, ort_runner.precision, ort_runner.device) == ("onnxruntime", "fp32", "cpu")
    rng = np.random.default_rng(0)
    for name in ("denoiser", "quantizer", "decoder"):
        spec = component_specs(config)[name]
        for batch in (1, 3):  # the dynamic batch axis, and a rebinding of the preallocated outputs
            feeds = spec.make_inputs(batch, rng)
            got, want = ort_runner.run(name, feeds), torch_runner.run(name, feeds)
            for out in spec.output_names:
                assert got[out].shape == want[out].shape and got[out].dtype == want[out].dtype
                if out == "indices":
                    assert np.array_equal(got[out], want[out])
                else:
                    rel = np.linalg.norm(got[out] - want[out]) / np.linalg.norm(want[out])
                    assert rel < 1e-5, (name, out, rel)
    ort_runner.close()


def test_torch_and_ort_fp32_images_agree(exported_tiny_run) -> None:
    """Same seed on both backends: PSNR >= 40 dB (re-randomised tiny model; trained figures: benchmarks/RESULTS.md)."""
    from mmgen_deploy.runtime import open_runner

    config = exported_tiny_run.load_config()
    kwargs = dict(steps=5, sampler="ddim", cfg_scale=4.0, seed=7, batch_size=4)
    ref = sample(open_runner(exported_tiny_run.root, "torch")[0], config, [0, 4, 9, 17], **kwargs)
    ort = sample(open_runner(exported_tiny_run.root, "onnxruntime", "fp32")[0], config, [0, 4, 9, 17], **kwargs)
    assert ort.backend == "onnxruntime" and ref.backend == "torch"
    assert _psnr(ref.images, ort.images) >= 40.0
    assert (ref.indices == ort.indices).mean() >= 0.99


def test_auto_backend_prefers_onnx_runtime_when_exported(exported_tiny_run, tmp_path, random_models) -> None:
    from conftest import cpu_auto_choice

    from mmgen_deploy.rundir import save_run
    from mmgen_deploy.runtime import resolve_backend

    choice = resolve_backend("auto", exported_tiny_run.root)
    assert (choice.backend, choice.precision) == cpu_auto_choice()
    fp32 = resolve_backend("auto", exported_tiny_run.root, "fp32")
    assert (fp32.backend, fp32.precision) == ("onnxruntime", "fp32")
    assert any(s.startswith("tensorrt") for s in choice.skipped)
    config, vq, dit = random_models
    bare = save_run(tmp_path / "bare", config, vq, dit)
    fallback = resolve_backend("auto", bare.root)
    assert fallback.backend == "torch" and "nothing exported" in fallback.reason
    with pytest.raises(UsageError, match=r"torch backend runs fp32 or bf16, not 'fp16'"):
        resolve_backend("torch", bare.root, "fp16")
    with pytest.raises(UsageError, match="unknown backend"):
        resolve_backend("tvm", bare.root)


def test_ort_path_does_not_import_torch(exported_tiny_run) -> None:
    """The deployment path (NumPy loop + ONNX Runtime) must run where torch is not installed."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from mmgen_deploy.runtime import open_runner\n"
            "from mmgen_deploy.sampling import sample\n"
            f"r, _ = open_runner({str(exported_tiny_run.root)!r}, 'onnxruntime', 'fp32', threads=1)\n"
            "sample(r, r.config, [1], steps=2, cfg_scale=4.0)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_stale_onnx_is_refused(exported_tiny_run, tmp_path) -> None:
    import shutil

    from mmgen_deploy.errors import RunDirError
    from mmgen_deploy.runtime.ort_runner import OrtRunner

    copy = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, copy)
    weights = copy / "dit" / "model.safetensors"
    from mmgen_deploy.rundir import RunDir

    dit = load_dit(RunDir(copy))
    with torch.no_grad():
        dit.final_layer.linear.bias.add_(1.0)
    RunDir(copy).save_weights("dit", dit)
    assert weights.is_file()
    with pytest.raises(RunDirError, match="exported from other weights"):
        OrtRunner(copy, "fp32")


@pytest.mark.slow
def test_fp16_onnx_images_close_to_torch_fp32(exported_tiny_run, tmp_path) -> None:
    """FP16 ONNX (ModelOpt AutoCast) vs torch FP32 with the same seed: PSNR >= 30 dB."""
    import shutil

    from mmgen_deploy.export import export_run
    from mmgen_deploy.runtime import open_runner

    copy = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, copy)
    export_run(copy, precisions=("fp16",), components=("denoiser", "quantizer", "decoder"))
    config = exported_tiny_run.load_config()
    kwargs = dict(steps=5, sampler="ddim", cfg_scale=4.0, seed=7, batch_size=4)
    ref = sample(open_runner(copy, "torch")[0], config, [0, 4, 9, 17], **kwargs)
    fp16 = sample(open_runner(copy, "onnxruntime", "fp16")[0], config, [0, 4, 9, 17], **kwargs)
    assert fp16.precision == "fp16"
    assert _psnr(ref.images, fp16.images) >= 30.0
