"""Engine execution on a CUDA GPU with TensorRT 10.x/11.x or TensorRT-RTX (skipped elsewhere, with the reason).

- building with classic `tensorrt` (needs the GPU it builds for);
- every engine vs PyTorch FP32 within the component spec's FP16 tolerances;
- the whole sampling loop (DDIM + classifier-free guidance, quantize, decode) vs PyTorch: PSNR >= 30 dB;
- CUDA-graph replay of the denoiser step equals the eager run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from engine_helpers import make_tiny_run

from mmgen_deploy.cli.app import main
from mmgen_deploy.engines.flavour import installed_flavours
from mmgen_deploy.engines.manifest import MANIFEST_NAME, TIMING_CACHE_NAME, check_engine_dir, current_gpu
from mmgen_deploy.io_utils import read_json
from mmgen_deploy.models import build_components
from mmgen_deploy.models.load import load_models
from mmgen_deploy.numerics import psnr, tensor_diff
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.specs import component_specs

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]


def _usable_runtimes() -> list[str]:
    found = [f.runtime for f in installed_flavours()]
    gpu = current_gpu() if torch.cuda.is_available() else None
    if gpu is not None and gpu.compute_capability == "9.0" and "tensorrt-rtx" in found:
        found.remove("tensorrt-rtx")  # TensorRT-RTX has no Hopper (SM90) support
    return found


RUNTIMES = [pytest.param(r, id=r) for r in ("tensorrt", "tensorrt-rtx")]


def _require(runtime: str) -> None:
    if runtime not in _usable_runtimes():
        pytest.skip(f"{runtime} is not installed or does not support this GPU")


def _build(run: RunDir, runtime: str, *extra: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["build-engine", str(run.root), "--runtime", runtime, "--json", str(run.root / "build.json"), *extra])
    assert info.value.code in (0, None)
    return read_json(run.root / "build.json")


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """The real FP16 export (AutoCast) of a re-randomised tiny model, shared by both runtimes' builds."""
    return make_tiny_run(tmp_path_factory.mktemp("gpu") / "run", real_export=True)


@pytest.fixture(scope="module", params=RUNTIMES)
def engine_run(request: pytest.FixtureRequest, exported_run: RunDir) -> tuple[str, RunDir]:
    runtime = request.param
    _require(runtime)
    _build(exported_run, runtime)  # each runtime has its own engines/<runtime>-<version>-<target>/
    return runtime, exported_run


def test_build_with_classic_tensorrt_targets_this_gpu_and_keeps_a_timing_cache(tmp_path) -> None:
    _require("tensorrt")
    run = make_tiny_run(tmp_path / "run", real_export=True)
    first = _build(run, "tensorrt", "--workspace", "512MiB")
    gpu = current_gpu()
    assert gpu is not None and first["target"] == gpu.sm
    directory = run.engines_dir / f"tensorrt-{first['version']}-{gpu.sm}"
    manifest = read_json(directory / MANIFEST_NAME)
    assert manifest["build_machine"]["gpu"]["compute_capability"] == gpu.compute_capability
    assert manifest["options"]["workspace_bytes"] == 512 * 2**20
    assert (directory / TIMING_CACHE_NAME).stat().st_size > 0
    second = _build(run, "tensorrt", "--workspace", "512MiB", "--rebuild")
    assert not any(c["reused"] for c in second["components"].values())
    from mmgen_deploy.engines.flavour import load_flavour

    check_engine_dir(run, load_flavour("tensorrt"), gpu=gpu)


def test_every_engine_matches_pytorch_within_fp16_tolerances(engine_run) -> None:
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    runtime, run = engine_run
    config, vq, dit = load_models(run)
    modules = build_components(vq, dit)
    specs = component_specs(config)
    rng = np.random.default_rng(0)
    with TensorRTRunner.from_run_dir(run.root, precision="fp16", runtime=runtime) as runner:
        assert runner.backend == "tensorrt" and runner.precision == "fp16" and runner.device.startswith("cuda")
        memory = runner.device_memory_bytes()
        assert memory["shared_block"] >= max(v for k, v in memory.items() if k != "shared_block")
        for name, spec in specs.items():
            for batch in sorted({spec.engine_profile.min, spec.engine_profile.opt}):
                feeds = spec.make_inputs(batch, rng)
                got = runner.run(name, feeds)
                with torch.no_grad():
                    ref = modules[name](*(torch.from_numpy(feeds[n]) for n in spec.input_names))
                ref = ref if isinstance(ref, tuple) else (ref,)
                for out_name, ref_value in zip(spec.output_names, ref, strict=True):
                    expected = ref_value.numpy()
                    assert got[out_name].shape == expected.shape and got[out_name].dtype == np.dtype(
                        spec.io(out_name).dtype)
                    tolerance = spec.tolerance("fp16", out_name)
                    if spec.io(out_name).is_float:
                        diff = tensor_diff(expected, got[out_name])
                        assert diff.rel_l2 <= tolerance.rel_l2, (runtime, name, batch, out_name, diff)
                    else:
                        agreement = float((expected == got[out_name]).mean())
                        assert agreement >= tolerance.min_agreement, (runtime, name, batch, out_name, agreement)


def _ddim_sample(denoise, quantize, decode, noise: np.ndarray, class_ids: np.ndarray, steps: int,
                 guidance: float, alphas_cumprod: np.ndarray, null_class: int) -> np.ndarray:
    """Deterministic DDIM (eta 0) with classifier-free guidance on float32 latents; returns decoded images."""
    num_train = len(alphas_cumprod)
    timesteps = [round(i * (num_train - 1) / (steps - 1)) for i in range(steps)][::-1]
    x = noise.astype(np.float32)
    batch, channels = x.shape[0], x.shape[1]
    labels = np.concatenate([class_ids, np.full_like(class_ids, null_class)]).astype(np.int32)
    for i, t in enumerate(timesteps):
        out = denoise(np.concatenate([x, x]), np.full(2 * batch, t, np.float32), labels)
        eps_cond, eps_uncond = out[:batch, :channels], out[batch:, :channels]
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x0 = math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * eps
        x = (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).astype(np.float32)
    z_q = quantize(x)
    return decode(z_q)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip((images + 1) * 127.5, 0, 255).round().astype(np.uint8)


def test_full_generate_loop_matches_pytorch(engine_run) -> None:
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    runtime, run = engine_run
    config, vq, dit = load_models(run)
    modules = build_components(vq, dit)
    d = config.diffusion
    betas = np.linspace(d.beta_start, d.beta_end, d.num_train_timesteps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    rng = np.random.default_rng(3)
    stage = config.first_stage
    noise = rng.standard_normal((4, stage.embed_dim, stage.latent_size, stage.latent_size))
    class_ids = np.array([0, 3, 7, 11], np.int32)
    kwargs = {"noise": noise, "class_ids": class_ids, "steps": 10, "guidance": 4.0,
              "alphas_cumprod": alphas_cumprod, "null_class": config.dit.num_classes}

    def torch_call(name: str):
        def call(*arrays: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = modules[name](*(torch.from_numpy(a) for a in arrays))
            return (out[0] if isinstance(out, tuple) else out).numpy()
        return call

    reference = _ddim_sample(torch_call("denoiser"), torch_call("quantizer"), torch_call("decoder"), **kwargs)
    with TensorRTRunner.from_run_dir(run.root, precision="fp16", runtime=runtime) as runner:
        engine_images = _ddim_sample(
            lambda x, t, y: runner.run("denoiser", {"x_t": x, "t": t, "class_ids": y})["model_output"],
            lambda h: runner.run("quantizer", {"h": h})["z_q"],
            lambda z: runner.run("decoder", {"z_q": z})["image"], **kwargs)
    value = psnr(_to_uint8(reference), _to_uint8(engine_images))
    print(json.dumps({"runtime": runtime, "psnr_db": value}))
    assert value >= 30.0, value


def test_cuda_graph_replay_equals_eager(engine_run) -> None:
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    runtime, run = engine_run
    spec = component_specs(run.load_config())["denoiser"]
    rng = np.random.default_rng(5)
    batch = spec.engine_profile.opt
    inputs = [spec.make_inputs(batch, rng) for _ in range(3)]
    with TensorRTRunner.from_run_dir(run.root, runtime=runtime) as eager:
        expected = [eager.run("denoiser", feeds)["model_output"] for feeds in inputs]
    with TensorRTRunner.from_run_dir(run.root, runtime=runtime, cuda_graph=True) as graphed:
        # first call captures, the next ones replay with new inputs copied into the captured buffers
        got = [graphed.run("denoiser", feeds)["model_output"] for feeds in inputs]
        assert batch in graphed._engines["denoiser"].graphs
        again = graphed.run("denoiser", inputs[0])["model_output"]
    if runtime == "tensorrt":  # same plan, same kernels, same inputs: bit for bit
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(again, expected[0])
    else:  # RTX may swap in shape-specialised JIT kernels between calls: equal up to FP16 rounding
        for e, g in zip([*expected, expected[0]], [*got, again], strict=True):
            assert tensor_diff(e, g).rel_l2 <= 1e-3
