"""Engine building on the CPU machine: real ahead-of-time TensorRT-RTX builds of the tiny model,
the manifest, reuse on rebuild, and the refusal of stale or damaged engine sets.

Nothing here runs an engine (that needs a GPU: see test_engines_gpu.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from engine_helpers import make_tiny_run
from onnx import numpy_helper

from mmgen_deploy.cli.app import main
from mmgen_deploy.engines.manifest import MANIFEST_NAME, CorruptEngineError, StaleEngineError, check_engine_dir
from mmgen_deploy.errors import NotAvailableError
from mmgen_deploy.io_utils import read_json, sha256_file, write_json
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.specs import component_specs

tensorrt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (dev extra)")
pytestmark = pytest.mark.tensorrt

RTX_DIR = f"tensorrt-rtx-{tensorrt_rtx.__version__}-aot"


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def built_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A tiny run with its ONNX set and one real AOT RTX build (shared; tests copy it before damaging it)."""
    run = make_tiny_run(tmp_path_factory.mktemp("engines") / "run")
    with pytest.raises(SystemExit) as info:
        main(["build-engine", str(run.root), "--runtime", "tensorrt-rtx", "--opt-level", "0",
              "--json", str(run.root / "build.json")])
    assert info.value.code in (0, None)
    return run


@pytest.fixture()
def run_copy(built_run: RunDir, tmp_path: Path) -> RunDir:
    shutil.copytree(built_run.root, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _rtx():
    from mmgen_deploy.engines.flavour import load_flavour

    return load_flavour("tensorrt-rtx")


def test_aot_build_writes_all_plans_and_a_complete_manifest(built_run: RunDir) -> None:
    directory = built_run.engines_dir / RTX_DIR
    manifest = read_json(directory / MANIFEST_NAME)
    assert manifest["runtime"] == "tensorrt-rtx" and manifest["module"] == "tensorrt_rtx"
    assert manifest["version"] == tensorrt_rtx.__version__ and manifest["target"] == "aot"
    assert manifest["options"]["strongly_typed"] is True and manifest["build_machine"]["python"]
    assert manifest["weights_sha256"] == built_run.weights_sha256()
    specs = component_specs(built_run.load_config())
    assert set(manifest["components"]) == set(specs)
    for name, entry in manifest["components"].items():
        plan = directory / entry["plan"]
        assert plan.stat().st_size == entry["plan_bytes"] > 100_000  # a real serialized engine
        assert sha256_file(plan) == entry["plan_sha256"]
        assert entry["onnx_sha256"] == sha256_file(built_run.onnx_dir / "fp16" / f"{name}.onnx")
        assert [i["name"] for i in entry["inputs"]] == specs[name].input_names
        profile = specs[name].engine_profile
        first = entry["profile"][specs[name].input_names[0]]
        assert (first["min"][0], first["opt"][0], first["max"][0]) == (profile.min, profile.opt, profile.max)
    assert manifest["components"]["quantizer"]["tf32"] is False and manifest["components"]["decoder"]["tf32"]
    # classifier-free guidance doubles the denoiser's batch: spec 1:8:16 -> engine 2:16:32
    assert manifest["components"]["denoiser"]["profile"]["x_t"]["max"][0] == 2 * specs["denoiser"].profile.max
    report = read_json(built_run.root / "build.json")
    assert all(not c["reused"] and c["build_seconds"] > 0 for c in report["components"].values())
    engine_set = check_engine_dir(built_run, _rtx())
    assert engine_set.directory == directory and sorted(engine_set.components) == sorted(specs)


def test_rebuild_reuses_unchanged_plans_and_rebuilds_a_changed_one(run_copy: RunDir, capsys) -> None:
    code, out, _ = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                         "--json", "-"], capsys)
    assert code == 0
    report = json.loads(out)
    assert all(c["reused"] for c in report["components"].values())
    # The decoder with other weights (one initializer changed, as a re-export of a retrained
    # decoder would): only it is rebuilt, into a different plan, and the set checks out again.
    manifest_path = run_copy.engines_dir / RTX_DIR / MANIFEST_NAME
    plans_before = {n: e["plan_sha256"] for n, e in read_json(manifest_path)["components"].items()}
    onnx_file = run_copy.onnx_dir / "fp16" / "decoder.onnx"
    model = onnx.load(str(onnx_file))
    weight = max(model.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    changed = numpy_helper.to_array(weight).copy()
    changed.flat[0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(changed, weight.name))
    onnx.save(model, str(onnx_file))
    code, out, _ = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                         "--json", "-"], capsys)
    assert code == 0
    report = json.loads(out)
    assert {n for n, c in report["components"].items() if not c["reused"]} == {"decoder"}
    plans_after = {n: e["plan_sha256"] for n, e in read_json(manifest_path)["components"].items()}
    assert {n for n in plans_before if plans_after[n] != plans_before[n]} == {"decoder"}
    check_engine_dir(run_copy, _rtx())
    # Different options (a static batch) must not reuse plans built for another profile.
    code, out, _ = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                         "--batch-profile", "4", "--components", "encoder", "--json", "-"], capsys)
    assert code == 0 and not json.loads(out)["components"]["encoder"]["reused"]
    manifest = read_json(run_copy.engines_dir / RTX_DIR / MANIFEST_NAME)
    assert manifest["components"]["encoder"]["profile"]["image"]["min"][0] == 4
    assert set(manifest["components"]) == {"encoder", "quantizer", "decoder", "denoiser"}


def test_tampered_onnx_makes_loading_refuse_as_stale(run_copy: RunDir, capsys) -> None:
    onnx_file = run_copy.onnx_dir / "fp16" / "denoiser.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00")
    with pytest.raises(StaleEngineError, match=r"onnx/fp16/denoiser.onnx changed since the build") as info:
        check_engine_dir(run_copy, _rtx())
    assert "mmgen build-engine" in str(info.value) and "--runtime tensorrt-rtx" in str(info.value)
    # The runner performs the same check before touching CUDA, so it reports staleness on a CPU machine too.
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    with pytest.raises(StaleEngineError, match="stale engines"):
        TensorRTRunner.from_run_dir(run_copy.root, precision="fp16")
    onnx_file.unlink()
    with pytest.raises(StaleEngineError, match="is gone"):
        check_engine_dir(run_copy, _rtx())


def test_truncated_or_corrupt_plan_gives_a_clear_error(run_copy: RunDir) -> None:
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    plan = run_copy.engines_dir / RTX_DIR / "decoder.plan"
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptEngineError, match=r"decoder.plan is truncated or corrupt"):
        check_engine_dir(run_copy, _rtx())
    with pytest.raises(CorruptEngineError, match="truncated"):
        TensorRTRunner.from_run_dir(run_copy.root)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    plan.write_bytes(bytes(flipped))
    with pytest.raises(CorruptEngineError, match="sha256 differs"):
        check_engine_dir(run_copy, _rtx())
    (run_copy.engines_dir / RTX_DIR / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CorruptEngineError, match="unreadable"):
        check_engine_dir(run_copy, _rtx())


def test_engines_from_another_runtime_version_are_refused(run_copy: RunDir) -> None:
    directory = run_copy.engines_dir / RTX_DIR
    manifest = read_json(directory / MANIFEST_NAME)
    manifest["version"] = "1.0.0.1"
    write_json(directory / MANIFEST_NAME, manifest)
    with pytest.raises(StaleEngineError, match=r"built with tensorrt-rtx 1.0.0.1, installed is tensorrt-rtx"):
        check_engine_dir(run_copy, _rtx())
    directory.rename(run_copy.engines_dir / "tensorrt-rtx-1.0.0.1-aot")
    with pytest.raises(StaleEngineError, match=r"found only tensorrt-rtx-1.0.0.1-aot"):
        check_engine_dir(run_copy, _rtx())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_valid_engines_without_gpu_say_so(built_run: RunDir) -> None:
    from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner

    with pytest.raises(NotAvailableError, match="up to date, but running them needs a CUDA device"):
        TensorRTRunner.from_run_dir(built_run.root, precision="fp16")


def test_unsupported_op_reports_the_node_and_keeps_old_engines(run_copy: RunDir, capsys) -> None:
    directory = run_copy.engines_dir / RTX_DIR
    before = (directory / MANIFEST_NAME).read_bytes()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["image"], ["h"], name="mystery_node", domain="example.custom")],
        "bad", [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["batch", 4, 8, 8])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("example.custom", 1)])
    onnx.save(model, str(run_copy.onnx_dir / "fp16" / "encoder.onnx"))
    code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "cannot parse encoder.onnx" in err and "mystery_node" in err
    assert (directory / MANIFEST_NAME).read_bytes() == before  # the failed build changed nothing
    assert not [p for p in run_copy.engines_dir.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_cli_input_errors_are_one_line(run_copy: RunDir, tmp_path: Path, capsys) -> None:
    cases = [
        (["--batch-profile", "3:2:1"], 2, "invalid --batch-profile"),
        (["--workspace", "lots"], 2, "invalid --workspace"),
        (["--compute-capability", "sm90"], 2, "unknown compute capability 'sm90'"),
        (["-c", "vae"], 2, "unknown component(s) vae"),
    ]
    for extra, expected_code, message in cases:
        code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", *extra], capsys)
        assert code == expected_code and message in err and "Traceback" not in err, (extra, err)
    shutil.rmtree(run_copy.onnx_dir)
    code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx"], capsys)
    assert code == 1 and "missing ONNX file" in err and "mmgen export" in err
    code, _, err = _cli(["build-engine", str(tmp_path / "nowhere"), "-r", "tensorrt-rtx"], capsys)
    assert code == 1 and "does not exist" in err


def test_missing_classic_tensorrt_names_the_package(run_copy: RunDir, capsys) -> None:
    from mmgen_deploy.engines.flavour import installed_flavours

    if any(f.runtime == "tensorrt" for f in installed_flavours()):
        pytest.skip("classic TensorRT is installed here")
    code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt"], capsys)
    assert code == 1 and "pip install tensorrt" in err


def test_size_and_batch_parsing() -> None:
    from mmgen_deploy.cli.engines import parse_batch, parse_size

    assert parse_size("512MiB") == 512 * 2**20 and parse_size("2G") == 2 * 2**30
    assert parse_size(str(2**24)) == 2**24
    profile = parse_batch("1:4:8")
    assert (profile.min, profile.opt, profile.max) == (1, 4, 8)
    static = parse_batch("2")
    assert (static.min, static.opt, static.max) == (2, 2, 2)


def test_gpu_targets_are_checked_against_the_device_that_would_load(run_copy: RunDir) -> None:
    """The check takes the GPU as data, so RTX target rules are verifiable without one."""
    from mmgen_deploy.engines.manifest import GpuInfo

    rtx = _rtx()
    check_engine_dir(run_copy, rtx, gpu=GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24 * 2**30))
    with pytest.raises(StaleEngineError, match=r"default targets \(Ampere and later\).*sm75"):
        check_engine_dir(run_copy, rtx, gpu=GpuInfo("NVIDIA GeForce RTX 2080 Ti", "7.5", 11 * 2**30))
    with pytest.raises(StaleEngineError, match="sm90"):
        check_engine_dir(run_copy, rtx, gpu=GpuInfo("NVIDIA H100", "9.0", 80 * 2**30))
    path = run_copy.engines_dir / RTX_DIR / MANIFEST_NAME
    manifest = read_json(path)
    manifest["options"]["compute_capabilities"] = ["sm86"]
    write_json(path, manifest)
    with pytest.raises(StaleEngineError, match=r"built for sm86, this GPU is .*\(sm89\).*--compute-capability sm86"):
        check_engine_dir(run_copy, rtx, gpu=GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24 * 2**30))


@pytest.mark.slow
def test_real_fp16_export_builds_and_the_manifest_records_its_converter(tmp_path: Path, capsys) -> None:
    """The whole CPU path: `mmgen export` (AutoCast mixed-precision FP16) -> RTX AOT build of all four."""
    run = make_tiny_run(tmp_path / "run", real_export=True)
    code, out, _ = _cli(["build-engine", str(run.root), "-r", "tensorrt-rtx", "--opt-level", "0", "--json", "-"],
                        capsys)
    assert code == 0
    assert set(json.loads(out)["components"]) == {"encoder", "quantizer", "decoder", "denoiser"}
    manifest = read_json(run.engines_dir / RTX_DIR / MANIFEST_NAME)
    records = manifest["onnx_export"]
    assert records["denoiser"]["converter"]["name"].startswith("modelopt.onnx.autocast")
    assert records["quantizer"]["keep_fp32"] is True
    for name, entry in manifest["components"].items():
        assert entry["onnx_sha256"] == records[name]["export_sha256"]  # built from exactly what was exported
    check_engine_dir(run, _rtx())


def test_generate_with_tensorrt_reports_stale_engines_before_any_gpu_work(run_copy: RunDir, capsys) -> None:
    onnx_file = run_copy.onnx_dir / "fp16" / "denoiser.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00")
    code, _, err = _cli(["generate", str(run_copy.root), "--backend", "tensorrt", "-n", "1", "--steps", "2",
                         "--out", str(run_copy.root / "samples" / "x")], capsys)
    assert code == 1 and "Traceback" not in err
    assert "stale engines" in err and "denoiser.onnx changed since the build" in err and "mmgen build-engine" in err
    assert not (run_copy.root / "samples" / "x").exists()


@pytest.mark.filterwarnings("ignore:.*Timing cache operations are no-ops:DeprecationWarning")
def test_classic_flavour_build_calls_run_on_the_rtx_api(built_run: RunDir) -> None:
    """The classic (TensorRT 10.3, JetPack 6) flavour's build sequence, run on the TensorRT-RTX library.

    Proves: the classic flavour takes its own branches (STRONGLY_TYPED flag, workspace cap, timing
    cache in and out) and every call in them exists in RTX's Python API, which shares TensorRT's,
    with arguments it accepts, and a plan comes out. Does not prove: that classic TensorRT accepts
    them (another library; that is what the type check against `tensorrt-stubs` below is for), that
    a timing cache is filled or reused (RTX's timing-cache calls are no-ops), nor that a classic
    build works (it needs a GPU)."""
    from mmgen_deploy.engines.builder import BuildOptions, build_component
    from mmgen_deploy.engines.flavour import Flavour

    jetpack6 = Flavour("tensorrt", tensorrt_rtx, "10.3.0")
    assert jetpack6.has_timing_cache and jetpack6.strongly_typed_flag_required and jetpack6.needs_gpu_to_build
    assert not Flavour("tensorrt", tensorrt_rtx, "11.2.0").strongly_typed_flag_required
    spec = component_specs(built_run.load_config())["quantizer"]
    onnx_file = built_run.onnx_dir / "fp16" / "quantizer.onnx"
    options = BuildOptions(runtime="tensorrt", opt_level=0, workspace_bytes=256 * 2**20)
    plan, cache = build_component(jetpack6, spec, onnx_file, options, b"")
    assert len(plan) > 10_000 and cache is not None  # the classic branch asked for the cache back
    plan_again, _ = build_component(jetpack6, spec, onnx_file, options, cache)  # a cache from a previous build
    assert len(plan_again) > 10_000
    # The RTX flavour skips those calls: no cache comes back.
    assert build_component(_rtx(), spec, onnx_file, options, b"")[1] is None


def test_a_build_failing_for_lack_of_workspace_says_so_and_keeps_old_engines(run_copy: RunDir, capsys) -> None:
    directory = run_copy.engines_dir / RTX_DIR
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                         "--workspace", "1MiB", "-c", "denoiser"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "failed to build denoiser" in err and "--workspace cap of 1 MiB is too small" in err
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_a_truncated_onnx_is_named_as_such_not_as_an_unsupported_op(run_copy: RunDir, capsys) -> None:
    directory = run_copy.engines_dir / RTX_DIR
    before = (directory / MANIFEST_NAME).read_bytes()
    graph = run_copy.onnx_dir / "fp16" / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size * 2 // 3])
    code, _, err = _cli(["build-engine", str(run_copy.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                         "--components", "decoder"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "decoder.onnx is truncated or damaged" in err and "mmgen export RUN_DIR --overwrite" in err, err
    assert "does not support" not in err
    assert (directory / MANIFEST_NAME).read_bytes() == before  # the failed build changed nothing
