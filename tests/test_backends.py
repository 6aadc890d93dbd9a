"""The backend registry: each entry agrees with its runner, the auto walk follows `AUTO_ORDER`, and
the OpenVINO BF16 rule looks at the CPU kind and the model's size (features fed in, nothing faked)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from mmgen_deploy.config import preset, with_text
from mmgen_deploy.cpuinfo import read_cpu_features
from mmgen_deploy.errors import NotAvailableError, UsageError
from mmgen_deploy.runtime import BaseRunner
from mmgen_deploy.runtime.backends import (
    AUTO_ORDER,
    BACKENDS,
    OPENVINO_BF16_MIN_GFLOP,
    REGISTRY,
    backend_help,
    denoiser_gflop,
    openvino_bf16_verdict,
    openvino_default_precision,
    runnable_precisions,
)
from mmgen_deploy.specs import PRECISIONS, RUN_PRECISIONS

# The three kinds of x86 CPU the auto rule tells apart.
AMX = read_cpu_features("model name\t: Xeon AMX\nflags\t\t: avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n")
AVX512_BF16_ONLY = read_cpu_features("model name\t: Xeon BF16\nflags\t\t: avx512f avx512_bf16 avx512_vnni\n")
NO_BF16 = read_cpu_features("model name\t: Xeon\nflags\t\t: avx2 avx512f\n")
TINY = denoiser_gflop(preset("tiny").dit)
DIT_B2_256 = denoiser_gflop(preset("B/2", image_size=256).dit)


def _openvino_installed() -> bool:
    return REGISTRY["openvino"].missing() is None


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_registry_entry_agrees_with_its_runner(name: str) -> None:
    spec = REGISTRY[name]
    try:
        cls = spec.runner_class()
    except NotAvailableError as exc:
        pytest.skip(str(exc))
    assert issubclass(cls, BaseRunner) and not inspect.isabstract(cls)
    assert (cls.backend, cls.precisions, cls.default_device, cls.precision_hint) == (
        name, spec.precisions, spec.default_device, spec.precision_hint)
    # The runner module states none of them itself: the registry is their one owner.
    source = ast.parse(Path(inspect.getfile(cls)).read_text())
    owned = {"backend", "precisions", "default_device", "precision_hint"}
    stated = [t.id for node in ast.walk(source) if isinstance(node, ast.ClassDef) and node.name == cls.__name__
              for stmt in node.body if isinstance(stmt, ast.Assign | ast.AnnAssign)
              for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]) if isinstance(t, ast.Name)]
    assert not owned & set(stated), stated
    assert set(spec.precisions) <= set(RUN_PRECISIONS) and spec.default_device in spec.devices
    assert set(spec.reads) <= set(spec.precisions) and set(spec.reads.values()) <= set(PRECISIONS)
    assert all(set(devices) <= set(spec.devices) for devices in spec.precision_devices.values())
    # The runner refuses what its entry does not list, before touching any file.
    refused = next(p for p in RUN_PRECISIONS if p not in spec.precisions)
    with pytest.raises(UsageError, match=f"the {name} backend runs"):
        cls.from_run_dir("/nonexistent-run", refused)
    if name == "openvino":
        from mmgen_deploy.runtime.openvino_runner import HINTS

        assert set(HINTS) == set(spec.precisions)


def test_auto_order_names_registry_backends_and_the_help_says_it() -> None:
    assert {step.backend for step in AUTO_ORDER} <= set(REGISTRY)
    assert BACKENDS[0] == "auto" and set(BACKENDS[1:]) == set(REGISTRY)
    text = backend_help()
    positions = [text.index(step.summary) for step in AUTO_ORDER]
    assert positions == sorted(positions)


def test_the_flop_estimate_matches_torchs_count() -> None:
    """`denoiser_gflop` reads the config only (no torch on a deployment box); it agrees with torch's
    FLOP counter on the real module within 5 %, class- and text-conditioned."""
    from mmgen_deploy.export.budget import component_costs

    for config in (preset("tiny"), preset("S/2", image_size=128), with_text(preset("tiny"))):
        counted = component_costs(config)["denoiser"].gflop_per_sample
        assert denoiser_gflop(config.dit) == pytest.approx(counted, rel=0.05), config.dit


def test_openvino_bf16_only_where_it_is_faster_than_onnx_runtime_fp32() -> None:
    """AMX and a large denoiser: yes. AVX-512 BF16 without AMX (BF16 no faster there), no BF16 units,
    or a model too small to repay OpenVINO's compile / import time: no, each with its reason."""
    assert TINY < OPENVINO_BF16_MIN_GFLOP < DIT_B2_256
    assert openvino_bf16_verdict(AMX, DIT_B2_256) is None
    assert "below" in str(openvino_bf16_verdict(AMX, TINY))
    for big in (DIT_B2_256, 1e4):
        assert "no AMX" in str(openvino_bf16_verdict(AVX512_BF16_ONLY, big))
        assert "no AMX or AVX-512 BF16" in str(openvino_bf16_verdict(NO_BF16, big))
    assert openvino_bf16_verdict(AMX, None) is not None  # unknown size: keep the default
    # --backend openvino without --precision: bf16 only where BF16 pays, and it says why.
    assert openvino_default_precision(AMX, None)[0] == "bf16"
    assert openvino_default_precision(AVX512_BF16_ONLY, None)[0] == "fp32"
    assert openvino_default_precision(NO_BF16, "cpu")[0] == "fp32"
    assert openvino_default_precision(NO_BF16, "gpu.1")[0] == "fp16"


def _fake_exported(tmp_path: Path, config) -> Path:  # type: ignore[no-untyped-def]
    """A run folder with `config` and empty FP32 graph files: enough for the walk, which loads nothing."""
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.specs import sampling_components

    run = RunDir(tmp_path / "run")
    run.initialize(config)
    for component in sampling_components(config):
        path = run.onnx_path("fp32", component)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return run.root


@pytest.mark.parametrize(("features", "size", "expected"), [
    (AMX, "B/2", ("openvino", "bf16")),
    (AMX, "tiny", ("onnxruntime", "fp32")),
    (AVX512_BF16_ONLY, "B/2", ("onnxruntime", "fp32")),
    (NO_BF16, "B/2", ("onnxruntime", "fp32")),
])
def test_the_auto_walk_on_three_kinds_of_cpu(tmp_path, features, size: str, expected) -> None:  # type: ignore[no-untyped-def]
    from mmgen_deploy.runtime.select import auto_choices

    if expected[0] == "openvino" and not _openvino_installed():
        pytest.skip("OpenVINO is not installed")
    config = preset(size, image_size=256 if size != "tiny" else 32)
    root = _fake_exported(tmp_path, config)
    _step, choice = next(auto_choices(root, device="cpu", features=features))
    assert (choice.backend, choice.precision, choice.device) == (*expected, "cpu")
    if choice.backend == "openvino":
        assert "AMX" in choice.reason and "GFLOP" in choice.reason
    else:
        assert choice.reason and any(s.startswith("openvino bf16: ") for s in choice.skipped)
    # Asking for fp32 keeps the FP32-exact path on every CPU; asking for bf16 where no unit runs it says so.
    _step, fp32 = next(auto_choices(root, "fp32", device="cpu", features=features))
    assert (fp32.backend, fp32.precision) == ("onnxruntime", "fp32")
    if features is NO_BF16:
        with pytest.raises(NotAvailableError, match="no AMX or AVX-512 BF16"):
            next(auto_choices(root, "bf16", device="cpu", features=features))


def test_runnable_precisions_come_from_the_registry_and_the_run(tmp_path) -> None:
    root = _fake_exported(tmp_path, preset("tiny"))
    from mmgen_deploy.rundir import RunDir

    run = RunDir(root)
    assert runnable_precisions(run, "onnxruntime", AMX) == ["fp32"]
    assert runnable_precisions(run, "torch", AMX) == ["fp32", "bf16"]
    assert runnable_precisions(run, "torch", NO_BF16) == ["fp32"]
    assert runnable_precisions(run, "openvino", AMX) == ["fp32", "bf16"]  # fp16 is for Intel GPUs / NPUs
    assert runnable_precisions(run, "tensorrt", AMX) == ["fp16"]  # nothing built: its default, to say why
    engine_set = run.engines_dir / "tensorrt-10.0-sm89-int8"
    engine_set.mkdir(parents=True)
    (engine_set / "manifest.json").write_text('{"format": "mmgen-engines", "format_version": 1, '
                                              '"precision": "int8"}')
    assert runnable_precisions(run, "tensorrt", AMX) == ["int8"]  # read from the manifest, not the name


def test_a_step_that_fails_to_load_continues_the_same_walk(tmp_path) -> None:
    """open_runner sends why a choice failed to load into the walk, which goes on from that step (no
    second walk): the next choice keeps the earlier skips and names the failure."""
    from mmgen_deploy.runtime.select import auto_choices

    if not _openvino_installed():
        pytest.skip("OpenVINO is not installed")
    walk = auto_choices(_fake_exported(tmp_path, preset("B/2", image_size=256)), device="cpu", features=AMX)
    step, first = next(walk)
    assert (step.backend, first.precision, step.fall_through) == ("openvino", "bf16", True)
    step, second = walk.send("graph unreadable")
    assert (second.backend, second.precision) == ("onnxruntime", "fp32")
    assert second.skipped[-1] == "openvino bf16: failed to load (graph unreadable)"
    assert second.skipped[:-1] == first.skipped and first.skipped[0].startswith("tensorrt: ")


def test_openvino_asked_without_a_precision_says_why_it_runs_what_it_runs(exported_tiny_run) -> None:
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime import resolve_backend

    choice = resolve_backend("openvino", exported_tiny_run.root)
    expected, why = openvino_default_precision(cpu_features(), None)
    assert choice.precision == expected and choice.reason == f"requested; {why}"
    assert ("AMX" in why) and choice.reason != "requested"
    assert resolve_backend("openvino", exported_tiny_run.root, "fp32").reason == "requested"
