"""The runtime package: every backend a `BaseRunner`, opened one way, checked once in the base."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest

from mmgen_deploy.errors import UsageError
from mmgen_deploy.runtime import BaseRunner, Runner, open_runner, runner_class
from mmgen_deploy.specs import RUN_PRECISIONS, component_specs

CONCRETE = ("torch", "onnxruntime", "openvino", "tensorrt")


def test_every_backend_is_a_base_runner_with_one_constructor_shape() -> None:
    for name in CONCRETE:
        cls = runner_class(name)
        assert issubclass(cls, BaseRunner) and cls.backend == name
        # One way in: the base's from_run_dir (backends implement _open, not their own from_run_dir).
        assert cls.from_run_dir.__func__ is BaseRunner.from_run_dir.__func__  # type: ignore[attr-defined]
        assert set(cls.precisions) <= set(RUN_PRECISIONS)
    params = list(inspect.signature(BaseRunner.from_run_dir).parameters)
    assert params[:3] == ["run", "precision", "device"]
    with pytest.raises(UsageError, match="unknown backend"):
        runner_class("tvm")


def test_shared_checks_and_context_manager_come_from_the_base(exported_tiny_run) -> None:
    with pytest.raises(UsageError, match="torch backend runs fp32"):
        runner_class("torch").from_run_dir(exported_tiny_run.root, "fp16")
    with pytest.raises(UsageError, match="onnxruntime backend runs"):
        runner_class("onnxruntime").from_run_dir(exported_tiny_run.root, "int4")
    # Refused before any engine lookup, with the fix.
    with pytest.raises(UsageError, match="built from the fp16, int8 or fp8 ONNX set"):
        runner_class("tensorrt").from_run_dir(exported_tiny_run.root, "fp32")
    specs = component_specs(exported_tiny_run.load_config())
    feeds = specs["decoder"].make_inputs(2, np.random.default_rng(0))
    for name in ("torch", "onnxruntime"):
        with runner_class(name).from_run_dir(exported_tiny_run.root, device="cpu", threads=1,
                                             cuda_graph=True) as runner:  # an option it does not take: ignored
            assert isinstance(runner, Runner) and runner.backend == name and runner.precision == "fp32"
            assert runner.run("decoder", feeds)["image"].shape == (2, 3, 32, 32)
            with pytest.raises(UsageError, match="unknown component 'vae'"):
                runner.run("vae", feeds)
            with pytest.raises(Exception, match=r"decoder.z_q: dtype float64"):
                runner.run("decoder", {"z_q": feeds["z_q"].astype(np.float64)})
        # __exit__ closed it: the torch modules / ONNX Runtime sessions are released.
        assert not getattr(runner, "modules", getattr(runner, "_sessions", None))


def test_open_runner_returns_the_runner_and_the_choice_it_made(exported_tiny_run) -> None:
    from conftest import cpu_auto_choice

    runner, choice = open_runner(exported_tiny_run.root, "auto", device="cpu", threads=1)
    try:
        assert (runner.backend, runner.precision, runner.device) == (choice.backend, choice.precision, choice.device)
        assert (choice.backend, choice.precision) == cpu_auto_choice()
        assert any(s.startswith("tensorrt") for s in choice.skipped)
    finally:
        runner.close()


def test_device_names_are_checked_against_the_backend(exported_tiny_run) -> None:
    """A device no backend knows, or one the chosen backend does not run on, is refused in one line
    (rather than falling through to ONNX Runtime on the CPU); OpenVINO's gpu / npu under
    auto go to OpenVINO, and names are case-insensitive."""
    from mmgen_deploy.runtime import resolve_backend

    run = exported_tiny_run.root
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_backend("auto", run, device="tpu")
    with pytest.raises(UsageError, match="ONNX Runtime runs on cpu, cuda, not gpu"):
        resolve_backend("onnxruntime", run, device="gpu")
    with pytest.raises(UsageError, match="PyTorch runs on cpu, cuda, not npu"):
        resolve_backend("torch", run, device="npu")
    with pytest.raises(UsageError, match="not cuda"):
        resolve_backend("openvino", run, device="cuda:0")
    choice = resolve_backend("auto", run, device="NPU")
    assert (choice.backend, choice.device) == ("openvino", "npu")
    assert resolve_backend("openvino", run, device="CPU").device == "cpu"
    assert resolve_backend("onnxruntime", run, "fp32", device="cpu").device == "cpu"


def test_generate_auto_names_its_folder_after_the_backend_that_ran(exported_tiny_run, tmp_path, capsys) -> None:
    from mmgen_deploy.cli.app import main

    run = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, run)
    samples = run / "samples"
    before = {p.name for p in samples.iterdir()} if samples.is_dir() else set()  # other tests' folders
    with pytest.raises(SystemExit) as info:
        main(["generate", str(run), "-c", "0", "--n", "1", "--steps", "2", "--backend", "auto", "--device", "cpu",
              "--threads", "1"])
    assert info.value.code in (0, None), capsys.readouterr().err
    folders = sorted({p.name for p in samples.iterdir()} - before)
    from conftest import cpu_auto_choice

    backend, precision = cpu_auto_choice()
    assert folders == [f"{backend}-{precision}-ddim-2steps-seed0"]
    sidecar = json.loads((samples / folders[0] / "samples.json").read_text())
    assert sidecar["backend"]["backend"] == backend
