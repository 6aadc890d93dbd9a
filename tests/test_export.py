"""`mmgen export`: FP32 and mixed FP16 ONNX graphs, validated against PyTorch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import ModelConfig, preset
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.export import (
    CalibrationData,
    ExportValidationError,
    export_models,
    export_run,
    onnx_path,
    read_manifest,
)
from mmgen_deploy.export import onnx_export as onnx_export_module
from mmgen_deploy.models import DiT, VQModel, build_components, rerandomize_
from mmgen_deploy.rundir import save_run
from mmgen_deploy.specs import AUDIO_ONLY_COMPONENTS, COMPONENTS, TEXT_ONLY_COMPONENTS, component_specs

CLASS_COMPONENTS = tuple(c for c in COMPONENTS if c not in (*TEXT_ONLY_COMPONENTS, *AUDIO_ONLY_COMPONENTS))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got64 - ref64) / np.linalg.norm(ref64))


def _models(config: ModelConfig, seed: int = 0) -> tuple[VQModel, DiT]:
    torch.manual_seed(seed)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=seed + 1)
    rerandomize_(dit, seed=seed + 2)
    return vq.eval(), dit.eval()


def _images(config: ModelConfig, n: int = 8, seed: int = 5) -> np.ndarray:
    """Smooth image-like inputs (not white noise): blurred random fields in [-1, 1]."""
    rng = np.random.default_rng(seed)
    size = config.first_stage.image_size
    coarse = rng.uniform(-1, 1, (n, config.first_stage.in_channels, size // 4, size // 4))
    return np.clip(np.kron(coarse, np.ones((1, 1, 4, 4))), -1, 1).astype(np.float32)


def _independent_parity(config: ModelConfig, vq: VQModel, dit: DiT, folder, precision: str,
                        batches=(1, 3, 16)) -> dict[str, float]:
    """Our own check (not the exporter's): run each graph in ORT at the given batches."""
    specs = component_specs(config)
    modules = build_components(vq, dit)
    worst: dict[str, float] = {}
    rng = np.random.default_rng(123)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread is far faster on the shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _parity_loop(specs, modules, folder, precision, batches, rng, options, worst)
    finally:
        torch.set_num_threads(threads)
    return worst


def _parity_loop(specs, modules, folder, precision, batches, rng, options, worst) -> None:
    for name in CLASS_COMPONENTS:
        spec = specs[name]
        session = ort.InferenceSession(str(folder / precision / f"{name}.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        for batch in batches:
            inputs = spec.make_inputs(batch, rng)
            with torch.no_grad():
                ref = modules[name](*[torch.from_numpy(inputs[n]) for n in spec.input_names])
            refs = ref if isinstance(ref, tuple) else (ref,)
            outs = session.run(spec.output_names, inputs)
            for tensor, r, o in zip(spec.outputs, refs, outs, strict=True):
                r_np = r.numpy()
                assert o.dtype == np.dtype(tensor.dtype) and o.shape == r_np.shape
                if tensor.is_float:
                    key = f"{name}.{tensor.name}"
                    worst[key] = max(worst.get(key, 0.0), _rel_l2(r_np, o))
                else:
                    np.testing.assert_array_equal(o, r_np)  # quantizer indices identical


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """One tiny export (FP32 + FP16, calibrated on image-like data) shared by several tests."""
    config = preset("tiny")
    vq, dit = _models(config)
    folder = tmp_path_factory.mktemp("tiny-export")
    result = export_models(config, vq, dit, folder,
                           calibration=CalibrationData(images=_images(config), labels=np.arange(8, dtype=np.int32)))
    return config, vq, dit, folder, result


def test_tiny_export_fp32_and_fp16_match_pytorch(tiny_export) -> None:
    tiny_config, vq, dit, tmp_path, result = tiny_export
    worst32 = _independent_parity(tiny_config, vq, dit, tmp_path, "fp32")
    assert max(worst32.values()) <= 1e-5, worst32
    worst16 = _independent_parity(tiny_config, vq, dit, tmp_path, "fp16")
    assert all(v <= 1e-2 for v in worst16.values()), worst16
    # FP16 really is FP16 where allowed, and FP32 where the spec says so.
    fp16 = result["files"]["fp16"]
    assert fp16["encoder"]["fp16_nodes"] > 0 and fp16["denoiser"]["fp16_nodes"] > 0
    assert fp16["quantizer"]["fp16_nodes"] == 0 and fp16["quantizer"]["keep_fp32"]
    kept = fp16["denoiser"]["kept_fp32_nodes"]
    assert any(n.startswith("/dit/t_embedder/") and n.endswith("Cos") for n in kept)
    # Static shape arithmetic is folded, so AutoCast sees no integer "overflow" (chunk offsets
    # such as 640) and keeps nothing but the timestep embedding FP32 in the denoiser.
    assert all(n.startswith("/dit/t_embedder/") for n in kept), kept
    assert any("InstanceNormalization" in n for n in fp16["decoder"]["kept_fp32_nodes"])
    graph16 = onnx.load(str(tmp_path / "fp16" / "denoiser.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph16.graph.initializer)
    # I/O stays FP32 (int32 for ids/indices) in both precisions.
    for precision in ("fp32", "fp16"):
        graph = onnx.load(str(tmp_path / precision / "denoiser.onnx"))
        types = {v.name: v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)}
        assert types == {"x_t": onnx.TensorProto.FLOAT, "t": onnx.TensorProto.FLOAT,
                         "class_ids": onnx.TensorProto.INT32, "model_output": onnx.TensorProto.FLOAT}
        dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 4, 8, 8]  # only the batch axis is dynamic
    assert "dataset images" in result["calibration"]["source"]


@pytest.mark.slow  # ~40-70 s on 2 cores; part of the default suite: a preset larger than tiny
def test_larger_preset_fp32_and_fp16_match_pytorch(tmp_path) -> None:
    """S/2 (depth 12, width 384, 33 M parameters): same tolerances at batch 1, 3 and 16."""
    config = preset("S/2")
    vq, dit = _models(config, seed=3)
    export_models(config, vq, dit, tmp_path, calibration=_images(config))
    worst32 = _independent_parity(config, vq, dit, tmp_path, "fp32")
    assert max(worst32.values()) <= 1e-5, worst32
    worst16 = _independent_parity(config, vq, dit, tmp_path, "fp16")
    assert all(v <= 1e-2 for v in worst16.values()), worst16


def test_export_run_writes_manifest_and_refuses_foreign_checkpoint(tmp_path, random_models, capsys) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    code, text = _cli(["export", str(run.root), "--precision", "fp32"], capsys)
    assert code == 0, text
    manifest = read_manifest(run.root)
    assert manifest["source_weights_sha256"] == run.weights_sha256()
    assert set(manifest["files"]) == {"fp32"}
    for name in CLASS_COMPONENTS:
        entry = manifest["files"]["fp32"][name]
        path = onnx_path(run.root, "fp32", name)
        assert path.is_file() and entry["opset"] == 18
        assert onnx.load(str(path)).opset_import[0].version == 18
        assert entry["validation"]["passed"] and entry["validation"]["batches"][0] == 1
        assert entry["inputs"][0]["shape"][0] == "batch"
    assert manifest["files"]["fp32"]["denoiser"]["engine_profile"]["max"] == 32  # CFG doubles the batch
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["tools"])

    # Retrain = different weights: the export must not be replaced silently.
    vq2, dit2 = _models(config, seed=9)
    save_run(run.root, config, vq2, dit2)
    before = onnx_path(run.root, "fp32", "decoder").read_bytes()
    code, text = _cli(["export", str(run.root), "--precision", "fp32", "--components", "decoder"], capsys)
    assert code == 1 and "different checkpoint" in text and "--overwrite" in text and "Traceback" not in text
    assert onnx_path(run.root, "fp32", "decoder").read_bytes() == before
    code, text = _cli(["export", str(run.root), "--precision", "fp32", "--components", "decoder", "--overwrite"],
                      capsys)
    assert code == 0, text
    manifest = read_manifest(run.root)
    # An overwrite from another checkpoint starts clean: only what was just exported is there.
    assert list(manifest["files"]["fp32"]) == ["decoder"]
    assert not onnx_path(run.root, "fp32", "encoder").exists()

    # Same checkpoint, a subset: the rest of the export is kept.
    code, text = _cli(["export", str(run.root), "--precision", "fp32", "--components", "encoder"], capsys)
    assert code == 0, text
    assert list(read_manifest(run.root)["files"]["fp32"]) == ["encoder", "decoder"]


def test_perturbed_graph_fails_export_and_keeps_previous(tmp_path, random_models, capsys, monkeypatch) -> None:
    from mmgen_deploy.data import DataSpec

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit, data=DataSpec(name="shapes").to_dict())
    manifest = export_run(run, precisions=("fp32",), components=("decoder", "denoiser"))
    # Without --calibration, real inputs come from the run's own dataset.
    assert manifest["calibration"]["source"].startswith("dataset images (shapes validation split, 16 samples)")
    assert manifest["files"]["fp32"]["decoder"]["validation"]["worst"][-1]["inputs"] == "real"
    manifest_before = (run.onnx_dir / "manifest.json").read_bytes()
    graph_before = onnx_path(run, "fp32", "denoiser").read_bytes()

    real_export = onnx_export_module.export_fp32

    def export_then_perturb(module, spec, path, **options):
        external = real_export(module, spec, path, **options)
        if spec.name == "denoiser":  # nudge one weight of the final projection by 5 %
            model = onnx.load(str(path))
            node = next(n for n in model.graph.node if n.name.startswith("/dit/final_layer/linear/"))
            init = next(i for i in model.graph.initializer if i.name in node.input)
            weights = onnx.numpy_helper.to_array(init).copy()
            weights.flat[0] *= 1.05
            init.CopyFrom(onnx.numpy_helper.from_array(weights, init.name))
            onnx.save(model, str(path))
        return external

    monkeypatch.setattr("mmgen_deploy.export.exporter.export_fp32", export_then_perturb)
    code, text = _cli(["export", str(run.root), "--precision", "fp32", "--components", "denoiser"], capsys)
    assert code == 1
    assert "denoiser fp32" in text and "model_output" in text and "relative L2 error" in text
    assert "max abs error" in text and "Traceback" not in text
    assert (run.onnx_dir / "manifest.json").read_bytes() == manifest_before
    assert onnx_path(run, "fp32", "denoiser").read_bytes() == graph_before
    assert not [p for p in run.root.iterdir() if p.name.startswith(".onnx")]  # no temp dirs left

    with pytest.raises(ExportValidationError, match="relative L2 error"):
        export_run(run, precisions=("fp32",), components=("denoiser",))


def _scale_final_projection(path, factor: float) -> None:
    """Multiply the weight matrix of the denoiser's final projection (FP32 or FP16) by `factor`."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name.startswith("/dit/final_layer/linear/MatMul"))
    init = next(i for i in model.graph.initializer if i.name in node.input)
    weights = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array((weights * factor).astype(weights.dtype), init.name))
    onnx.save(model, str(path))


def test_perturbed_fp16_graph_fails_export_and_keeps_previous(tmp_path, random_models, capsys,
                                                              monkeypatch) -> None:
    """The FP16 graph is validated against PyTorch FP32 on its own tolerance: a converter whose output
    is 10 % off in the final projection is refused, and the previous export stays as it was."""
    from mmgen_deploy.data import DataSpec
    from mmgen_deploy.export import fp16 as fp16_module

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit, data=DataSpec(name="shapes").to_dict())
    export_run(run, precisions=("fp32", "fp16"), components=("denoiser",))
    manifest_before = (run.onnx_dir / "manifest.json").read_bytes()
    graph_before = onnx_path(run, "fp16", "denoiser").read_bytes()
    real_convert = fp16_module.convert_fp16

    def convert_then_perturb(fp32_path, spec, out_path, calibration, **options):
        record = real_convert(fp32_path, spec, out_path, calibration, **options)
        _scale_final_projection(out_path, 1.1)
        return record

    monkeypatch.setattr(fp16_module, "convert_fp16", convert_then_perturb)
    code, text = _cli(["export", str(run.root), "-p", "fp16", "-c", "denoiser"], capsys)
    assert code == 1, text
    assert "denoiser fp16" in text and "model_output" in text and "relative L2 error" in text
    assert "Traceback" not in text
    assert (run.onnx_dir / "manifest.json").read_bytes() == manifest_before
    assert onnx_path(run, "fp16", "denoiser").read_bytes() == graph_before
    assert not [p for p in run.root.iterdir() if p.name.startswith(".onnx")]  # no temp dirs left


def test_export_threads_set_every_component_s_pytorch_threads(tmp_path, random_models, capsys) -> None:
    """`threads` (`mmgen export --threads N`) replaces the exporter's own choice per component (one for
    these tiny ones) in the PyTorch passes, and the process's setting is restored afterwards."""
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    before = torch.get_num_threads()
    seen: dict[str, int] = {}  # progress message -> torch's threads when it came

    def record(message: str, done: int, total: int) -> None:
        seen[message] = torch.get_num_threads()

    for threads, expected in ((None, {1}), (3, {3})):
        seen.clear()
        export_run(run, precisions=("fp32",), components=("decoder",), calibration=_images(config), threads=threads,
                   overwrite=True, progress=record)
        inside = {count for message, count in seen.items() if message.startswith("calibration inputs: validation")}
        assert inside == expected, seen
        assert torch.get_num_threads() == before
    code, text = _cli(["export", str(run.root), "--precision", "fp32", "--components", "decoder", "--threads", "2"],
                      capsys)
    assert code == 0, text
    code, text = _cli(["export", str(run.root), "--components", "decoder", "--threads", "0"], capsys)
    assert code == 2 and "--threads" in text and "Traceback" not in text


def test_bad_arguments_are_one_line_errors(tmp_path, random_models, capsys) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    code, text = _cli(["export", str(run.root), "--opset", "16"], capsys)
    assert code == 2 and "--opset 16" in text
    code, text = _cli(["export", str(run.root), "--components", "encoder,vae"], capsys)
    assert code == 2 and "vae" in text
    code, text = _cli(["export", str(tmp_path / "missing")], capsys)
    assert code == 1 and "does not exist" in text
    bad = tmp_path / "calib.npz"
    np.savez(bad, images=np.zeros((2, 3, 16, 16), np.float32))
    code, text = _cli(["export", str(run.root), "--calibration", str(bad)], capsys)
    assert code == 2 and "expected (N, 3, 32, 32)" in text
    assert not run.onnx_dir.exists()
    with pytest.raises(RunDirError, match="no ONNX export"):
        read_manifest(run.root)
    with pytest.raises(UsageError):
        export_run(run, precisions=("int8",))


@pytest.mark.tensorrt
def test_fp16_graphs_build_with_tensorrt_rtx_ahead_of_time(tiny_export) -> None:
    """TensorRT-RTX builds ahead of time without a GPU: every FP16 graph must parse and build as a
    strongly typed network with the spec's batch profile, through the engines package's builder."""
    from mmgen_deploy.engines import load_flavour
    from mmgen_deploy.engines.builder import BuildOptions, build_component
    from mmgen_deploy.errors import NotAvailableError

    try:
        flavour = load_flavour("tensorrt-rtx")
    except NotAvailableError as exc:
        pytest.skip(str(exc))
    config, _, _, folder, _ = tiny_export
    options = BuildOptions(runtime="tensorrt-rtx", precision="fp16", workspace_bytes=1 << 28)
    for name, spec in component_specs(config).items():
        plan, _ = build_component(flavour, spec, folder / "fp16" / f"{name}.onnx", options, b"")
        assert len(plan) > 100_000, f"{name}: suspiciously small plan ({len(plan)} bytes)"
