"""Shared fixtures. Everything here runs for real on the CPU; nothing pretends to be a GPU."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks)

from mmgen_deploy.config import ModelConfig, preset
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.rundir import RunDir

# OpenVINO's compiled models, the graphs rewritten for ONNX Runtime and remembered hashes go to a
# temporary folder, not ~/.cache, removed when the session ends (~120 MB per run of the suite).
_CACHE = tempfile.mkdtemp(prefix="mmgen-test-cache-")
os.environ["MMGEN_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Two cores: keep torch from oversubscribing them in the test process.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = __import__(name)
        except Exception:
            continue
        if hasattr(module, "Builder"):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch")
    skip_trt = pytest.mark.skip(reason="needs TensorRT or TensorRT-RTX; neither is importable")
    cuda, trt = _has_cuda(), _has_tensorrt()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(skip_trt)


def cpu_auto_choice(config: ModelConfig | None = None) -> tuple[str, str]:
    """What `--backend auto` picks on this CPU for an exported run of `config` (default: the tiny
    preset) with no GPU: OpenVINO BF16 where the registry's rule says it beats ONNX Runtime FP32 here
    (an AMX CPU and a large enough denoiser) and OpenVINO is installed, else ONNX Runtime FP32."""
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime.backends import REGISTRY, denoiser_gflop, openvino_bf16_verdict

    gflop = denoiser_gflop((config or preset("tiny")).dit)
    if REGISTRY["openvino"].missing() is None and openvino_bf16_verdict(cpu_features(), gflop) is None:
        return ("openvino", "bf16")
    return ("onnxruntime", "fp32")


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return preset("tiny")


@pytest.fixture()
def random_models(tiny_config: ModelConfig) -> tuple[ModelConfig, VQModel, DiT]:
    """Tiny models with re-randomised weights (a fresh DiT outputs exactly zero)."""
    torch.manual_seed(0)
    vq, dit = VQModel(tiny_config.first_stage), DiT(tiny_config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    return tiny_config, vq.eval(), dit.eval()


@pytest.fixture(scope="session")
def exported_tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A saved run of re-randomised tiny models with its FP32 ONNX set (sampling components only).

    Session-scoped: the export takes ~10 s on two busy cores, shared by the sampling and CLI tests.
    """
    return _exported_random_tiny_run(tmp_path_factory.mktemp("exported") / "run")


def _exported_random_tiny_run(root: Path, *, parts: bool = False) -> RunDir:
    """A re-randomised tiny class run saved at `root` with its FP32 sampling set (and the denoiser's parts)."""
    from mmgen_deploy.export import export_run
    from mmgen_deploy.rundir import save_run

    config = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(root, config, vq.eval(), dit.eval())
    export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder"))
    if parts:
        export_run(run, precisions=("fp32",), components=("denoiser_parts",))
    return run


@pytest.fixture(scope="session")
def parts_run(tmp_path_factory: pytest.TempPathFactory):
    """A re-randomised tiny class run with its FP32 sampling set and the denoiser's parts (step caching).

    Session-scoped: shared by the caching tests and the Triton model's."""
    return _exported_random_tiny_run(tmp_path_factory.mktemp("cache") / "run", parts=True)


@pytest.fixture(scope="session")
def audio_run(tmp_path_factory: pytest.TempPathFactory):
    """A saved audio run of re-randomised tiny models (8 Griffin-Lim iterations: a fast vocoder) with its
    FP32 sampling set."""
    import torch

    from mmgen_deploy.config import audio_layout, preset, with_audio
    from mmgen_deploy.data.tones import CLASS_NAMES
    from mmgen_deploy.export import export_run
    from mmgen_deploy.models import DiT, VQModel
    from mmgen_deploy.models.components import rerandomize_
    from mmgen_deploy.rundir import save_run

    config = with_audio(preset("tiny", num_classes=9), audio_layout(32).replace(griffin_lim_iters=8))
    config = config.replace(class_names=CLASS_NAMES)
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path_factory.mktemp("audio") / "run", config, vq.eval(), dit.eval(),
                   data={"name": "tones", "image_size": 32, "num_val": 16})
    export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder", "vocoder"))
    return run
