"""The CUDA paths that need no TensorRT: the torch runner on the GPU, ONNX Runtime's CUDA provider
(FP32 and the FP16 set), and what `--backend auto` picks on a machine with a GPU.

Marked `gpu`: skipped without a CUDA device (the reason is printed); on a GPU machine they run for
real against PyTorch FP32 on the CPU, the reference every parity check uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen_deploy.config import preset
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.numerics import psnr, tensor_diff
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.runtime import open_runner
from mmgen_deploy.specs import component_specs, random_feeds, sampling_components

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# cuDNN convolutions (and ONNX Runtime's CUDA provider) use TF32 tensor cores for FP32 by default:
# ~1e-3 relative error per call instead of the CPU's ~1e-6, so FP32 on the GPU is held to this.
GPU_FP32_REL_L2 = 5e-3


def _models() -> tuple[VQModel, DiT]:
    torch.manual_seed(0)
    config = preset("tiny")
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    return vq.eval(), dit.eval()


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """Re-randomised tiny models with their FP32 and FP16 ONNX sets (the real export, AutoCast FP16)."""
    from mmgen_deploy.export import export_run

    vq, dit = _models()
    run = save_run(tmp_path_factory.mktemp("gpu-runtime") / "run", preset("tiny"), vq, dit)
    export_run(run, precisions=("fp32", "fp16"), components=sampling_components(run.load_config()))
    return run


def _compare_components(run: RunDir, backend: str, precision: str, limit_of: object) -> None:
    """Each sampling component on `backend` against torch FP32 on the CPU, on the same random feeds."""
    reference, _ = open_runner(run, "torch", "fp32", device="cpu")
    tested, choice = open_runner(run, backend, precision, device=DEVICE)
    try:
        assert (choice.backend, choice.precision, choice.device) == (backend, precision, DEVICE)
        config = run.load_config()
        specs = component_specs(config)
        for name in sampling_components(config):
            spec = specs[name]
            feeds = random_feeds(spec, specs, 3, np.random.default_rng(0), reference.run)
            expected, got = reference.run(name, feeds), tested.run(name, feeds)
            for tensor in spec.outputs:
                assert got[tensor.name].shape == expected[tensor.name].shape, (name, tensor.name)
                if tensor.is_float:
                    limit = limit_of(spec, tensor.name)  # type: ignore[operator]
                    diff = tensor_diff(expected[tensor.name], got[tensor.name])
                    assert diff.rel_l2 <= limit, (name, tensor.name, diff.rel_l2, limit)
                else:  # code indices: near ties may flip under TF32 / FP16
                    agreement = float(np.mean(expected[tensor.name] == got[tensor.name]))
                    assert agreement >= 0.95, (name, tensor.name, agreement)
    finally:
        tested.close()
        reference.close()


def _sample_on(run: RunDir, backend: str, precision: str, device: str) -> np.ndarray:
    from mmgen_deploy.sampling import sample

    runner, _ = open_runner(run, backend, precision, device=device)
    try:
        return sample(runner, run.load_config(), [1, 5, 9], steps=4, seed=3).images
    finally:
        runner.close()


def test_torch_runner_on_cuda_matches_the_cpu(gpu_run: RunDir) -> None:
    runner, choice = open_runner(gpu_run, "torch", "fp32", device=DEVICE)
    try:
        assert runner.device == DEVICE and choice.device == DEVICE
        assert {p.device.type for m in runner.modules.values() for p in m.parameters()} == {DEVICE}
    finally:
        runner.close()
    _compare_components(gpu_run, "torch", "fp32", lambda spec, name: GPU_FP32_REL_L2)
    assert psnr(_sample_on(gpu_run, "torch", "fp32", "cpu"), _sample_on(gpu_run, "torch", "fp32", DEVICE)) >= 30.0


def _needs_ort_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (pip install 'mmgen-deploy[gpu]')")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_cuda_provider_runs_the_onnx_sets(gpu_run: RunDir, precision: str) -> None:
    """Both ONNX sets on the CUDA provider (really on it: ONNX Runtime would fall back to the CPU
    silently), each within its own tolerance: FP32 within TF32's, FP16 within the spec's FP16 one."""
    _needs_ort_cuda()
    runner, _ = open_runner(gpu_run, "onnxruntime", precision, device=DEVICE)
    try:
        feeds = random_feeds(component_specs(gpu_run.load_config())["decoder"],
                             component_specs(gpu_run.load_config()), 2, np.random.default_rng(0))
        runner.run("decoder", feeds)
        session = runner._sessions["decoder"].session  # the loaded ONNX Runtime session
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    finally:
        runner.close()
    if precision == "fp32":
        _compare_components(gpu_run, "onnxruntime", "fp32", lambda spec, name: GPU_FP32_REL_L2)
    else:
        _compare_components(gpu_run, "onnxruntime", "fp16",
                            lambda spec, name: max(spec.tolerance("fp16", name).rel_l2, GPU_FP32_REL_L2))
    images = _sample_on(gpu_run, "onnxruntime", precision, DEVICE)
    assert psnr(_sample_on(gpu_run, "torch", "fp32", "cpu"), images) >= (30.0 if precision == "fp32" else 25.0)


def test_auto_on_a_gpu_without_engines(gpu_run: RunDir, tmp_path: Path) -> None:
    """No TensorRT engines: auto says so, then takes ONNX Runtime CUDA FP16 where onnxruntime-gpu is
    installed, or names the missing provider and stays on the CPU; a run with nothing exported
    samples with PyTorch on the GPU."""
    from mmgen_deploy.runtime.ort_runner import cuda_provider_usable
    from mmgen_deploy.runtime.select import resolve_backend

    choice = resolve_backend("auto", gpu_run)
    assert any(s.startswith("tensorrt:") for s in choice.skipped), choice.skipped
    if cuda_provider_usable():
        assert (choice.backend, choice.precision, choice.device) == ("onnxruntime", "fp16", DEVICE)
    else:
        assert "onnxruntime cuda: onnxruntime-gpu or a GPU missing" in choice.skipped
        assert choice.device == "cpu"
    vq, dit = _models()
    bare = save_run(tmp_path / "bare", preset("tiny"), vq, dit)  # nothing exported
    runner, choice = open_runner(bare, "auto")
    try:
        assert (choice.backend, choice.precision, choice.device) == ("torch", "fp32", DEVICE)
        assert runner.device == DEVICE
    finally:
        runner.close()
    assert psnr(_sample_on(bare, "torch", "fp32", "cpu"), _sample_on(bare, "auto", "fp32", DEVICE)) >= 30.0
