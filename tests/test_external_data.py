"""Graphs over 2 GB: the external-data path, covered on the tiny model by forcing it.

A DiT-XL/2 (2.7 GB FP32) cannot be one protobuf message, so its weights live in
`<name>.onnx.data`. CI cannot afford 2 GB of weights, so `external_data=True` forces the same
two-file form on a tiny model and these tests run the whole chain on it: export -> FP16 ->
validation -> manifest and staleness (the hash covers the data file) -> TensorRT-RTX ahead-of-time
build (`parse_from_file` finds the data file) -> carry-over and copies.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mmgen_deploy import onnx_files
from mmgen_deploy.cli.app import main
from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.config import preset
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.export import export_run, onnx_path, read_manifest
from mmgen_deploy.models import DiT, VQModel, build_components, rerandomize_
from mmgen_deploy.models.load import load_models
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.specs import component_specs

COMPONENTS = ("quantizer", "denoiser")


def _external_tensors(path) -> int:
    graph = onnx.load(str(path), load_external_data=False)
    return sum(1 for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


@pytest.fixture(scope="module")
def external_run(tmp_path_factory):
    config = preset("tiny")
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path_factory.mktemp("external") / "run", config, vq.eval(), dit.eval())
    manifest = export_run(run, components=COMPONENTS, external_data=True)
    return run, manifest


def test_forced_external_data_export_writes_graph_plus_data(external_run) -> None:
    run, manifest = external_run
    for precision in ("fp32", "fp16"):
        for name in COMPONENTS:
            path = onnx_path(run, precision, name)
            data = onnx_files.data_path(path)
            assert data.is_file(), f"{precision}/{name}: no external data file"
            assert _external_tensors(path) > 0
            # The graph file holds no weights: it is a small fraction of the data file.
            assert path.stat().st_size < data.stat().st_size
            entry = manifest["files"][precision][name]
            assert entry["external_data"] == [{"path": f"{precision}/{name}.onnx.data",
                                               "bytes": data.stat().st_size}]
            assert entry["bytes"] == path.stat().st_size + data.stat().st_size
            assert entry["sha256"] == onnx_files.onnx_sha256(path)
            assert entry["validation"]["passed"]
    assert read_manifest(run)["last_export"]["stages"], "per-stage times are recorded"


def test_external_data_graph_runs_in_onnx_runtime_like_pytorch(external_run) -> None:
    run, _ = external_run
    config = run.load_config()
    _, vq, dit = load_models(run)
    module = build_components(vq, dit)["denoiser"]
    spec = component_specs(config)["denoiser"]
    feeds = spec.make_inputs(3, np.random.default_rng(7))
    session = ort.InferenceSession(str(onnx_path(run, "fp32", "denoiser")), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_hash_covers_the_data_file_and_a_changed_one_is_not_carried_over(external_run, tmp_path) -> None:
    run, _ = external_run
    path = onnx_path(run, "fp32", "denoiser")
    copy = tmp_path / "copy" / "renamed.onnx"
    onnx_files.copy_onnx(path, copy)  # a renamed graph keeps the data file name it records
    assert (copy.parent / "denoiser.onnx.data").is_file()
    assert onnx_files.onnx_sha256(copy) == onnx_files.onnx_sha256(path)
    ort.InferenceSession(str(copy), providers=["CPUExecutionProvider"])  # the copy is complete
    before = onnx_files.onnx_sha256(copy)
    data = copy.parent / "denoiser.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one weight byte: the graph file is unchanged
    data.write_bytes(bytes(raw))
    assert onnx_files.onnx_sha256(copy) != before
    data.unlink()
    with pytest.raises(FileNotFoundError, match=r"denoiser\.onnx\.data"):
        onnx_files.onnx_sha256(copy)


@pytest.mark.tensorrt
def test_external_data_graphs_build_with_tensorrt_rtx_and_go_stale_when_weights_change(external_run,
                                                                                       tmp_path) -> None:
    """The ahead-of-time RTX build parses from the file (finding the data file); changing only the
    weights in the data file makes the engines stale, and a re-export does not carry that file over."""
    import shutil

    from mmgen_deploy.engines import load_flavour
    from mmgen_deploy.engines.builder import BuildOptions, build_engines
    from mmgen_deploy.engines.manifest import StaleEngineError, check_engine_dir
    from mmgen_deploy.errors import NotAvailableError

    try:
        flavour = load_flavour("tensorrt-rtx")
    except NotAvailableError as exc:
        pytest.skip(str(exc))
    source, _ = external_run
    run = RunDir(shutil.copytree(source.root, tmp_path / "run"))
    result = build_engines(run, BuildOptions(runtime="tensorrt-rtx", components=COMPONENTS,
                                             workspace_bytes=1 << 28))
    for component in result.components:
        assert component.plan_bytes > 100_000 and not component.reused
    check_engine_dir(run, flavour, components=COMPONENTS)  # fresh: passes
    data = onnx_files.data_path(onnx_path(run, "fp16", "denoiser"))
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(StaleEngineError, match=r"fp16/denoiser\.onnx changed since the build"):
        check_engine_dir(run, flavour, components=COMPONENTS)
    # Re-exporting only the quantizer keeps files that are unchanged, and drops the altered denoiser.
    manifest = export_run(run, components=("quantizer",), precisions=("fp16",), external_data=True)
    assert "denoiser" in manifest["files"]["fp32"]
    assert "denoiser" not in manifest["files"]["fp16"]


def test_batched_ranges_merge_exactly(external_run) -> None:
    """AutoCast's range analysis in batches of 2 gives the same min/max as one batch of all."""
    from mmgen_deploy.export.fp16 import activation_ranges

    run, _ = external_run
    spec = component_specs(run.load_config())["denoiser"]
    inputs = spec.make_inputs(6, np.random.default_rng(3))
    path = onnx_path(run, "fp32", "denoiser")
    whole = activation_ranges(path, inputs, 6)
    batched = activation_ranges(path, inputs, 2)
    assert whole.keys() == batched.keys() and len(whole) > 50
    for name, stats in whole.items():
        other = batched[name]
        assert np.isclose(stats.absmax, other.absmax, rtol=1e-6), name
        assert np.isclose(stats.min_val, other.min_val, rtol=1e-6, atol=1e-7), name


def test_in_graph_ranges_equal_the_tensors_own(external_run) -> None:
    """The ReduceMin/ReduceMax/Shape nodes the range analysis adds give exactly what NumPy gives on
    the tensors themselves (fetched here the memory-hungry way: every one a graph output)."""
    import onnx
    import onnxruntime as ort

    from mmgen_deploy.export.fp16 import _float_values, activation_ranges

    run, _ = external_run
    spec = component_specs(run.load_config())["denoiser"]
    inputs = spec.make_inputs(3, np.random.default_rng(4))
    path = onnx_path(run, "fp32", "denoiser")
    ranges = activation_ranges(path, inputs, 3)
    model = onnx.load(str(path), load_external_data=False)
    names = [n for n in _float_values(model) if n not in inputs]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    probe = path.with_name("probe.onnx")
    onnx.save(model, str(probe))
    try:
        tensors = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"]).run(names, inputs)
    finally:
        probe.unlink()
    assert len(names) > 50
    for name, tensor in zip(names, tensors, strict=True):
        stats = ranges[name]
        assert (stats.min_val, stats.max_val) == (float(tensor.min()), float(tensor.max())), name
        assert tuple(stats.shape) == tensor.shape, name


def test_autocast_on_weightless_views_writes_the_same_graph(external_run, tmp_path, monkeypatch) -> None:
    """AutoCast's shape inference and checker run on graph views without the weights (at XL size
    they otherwise copy the weights through temp files: 15 GB peak); the FP16 graph is the same
    byte for byte as ModelOpt's own path writes."""
    import hashlib

    from mmgen_deploy.export import fp16

    run, _ = external_run
    spec = component_specs(run.load_config())["denoiser"]
    calibration = spec.make_inputs(4, np.random.default_rng(5))
    source = onnx_path(run, "fp32", "denoiser")
    fp16.convert_fp16(source, spec, tmp_path / "views" / "denoiser.onnx", calibration, external_data=True)

    class ModelOptOwn:  # leaves ModelOpt's infer_shapes / check_model in place
        @classmethod
        def install(cls) -> ModelOptOwn:
            return cls()

        def uninstall(self) -> None:
            pass

    monkeypatch.setattr(fp16, "_WeightlessGraphChecks", ModelOptOwn)
    fp16.convert_fp16(source, spec, tmp_path / "own" / "denoiser.onnx", calibration, external_data=True)
    digests = {name: [hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                      for f in ("denoiser.onnx", "denoiser.onnx.data")] for name in ("views", "own")}
    assert digests["views"] == digests["own"]
    view, data_bytes = fp16.weightless_view(onnx.load(str(source), load_external_data=False))
    assert data_bytes > 0 and len(view.SerializeToString()) < data_bytes  # the weights are not in the view


def test_stage_that_cannot_fit_is_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from mmgen_deploy import memory

    config = preset("tiny")
    torch.manual_seed(0)
    run = save_run(tmp_path / "run", config, VQModel(config.first_stage).eval(), DiT(config.dit).eval())
    monkeypatch.setattr(memory, "available_bytes", lambda: 0)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 10**8)
    with pytest.raises(SystemExit) as info:
        main(["export", str(run.root), "--precision", "fp32", "--components", "denoiser"])
    text = capsys.readouterr().err
    assert info.value.code == 1
    assert "needs about" in text and "GB available" in text and "(--components denoiser)" in text
    assert "(--calibration-images 4)" in " ".join(text.split()) and "Traceback" not in text
    assert not run.onnx_dir.exists()
    # The library names the settings by parameter (its caller's words); the CLI printed its flags above.
    with pytest.raises(MMGenError) as refused:
        export_run(run, precisions=("fp32",), components=("denoiser",))
    assert "(components denoiser)" in str(refused.value) and "(calibration_images 4)" in str(refused.value)
    with pytest.raises(UsageError) as refused:
        export_run(run, precisions=("fp32",), calibration_images=0)
    assert str(refused.value) == "calibration_images 0: need at least 1 (give 1 or more)"
    assert describe_error(refused.value) == "--calibration-images 0: need at least 1 (give 1 or more)"


def test_validation_and_calibration_sizes_follow_the_cost() -> None:
    """A tiny model validates at 1, 3 and the profile max; a DiT-XL/2 at 256 px at two sizes (random 1,
    real 2) and calibrates on fewer samples, while its quantizer (small at 32x32 latents) keeps 1, 3 and
    16. Costs are counted on meta tensors, so this allocates nothing."""
    from mmgen_deploy.export import budget
    from mmgen_deploy.export.validate import validation_batches

    tiny = preset("tiny")
    tiny_costs, tiny_specs = budget.component_costs(tiny), component_specs(tiny)
    assert validation_batches(tiny_specs["denoiser"], tiny_costs["denoiser"].cost_gflop) == {
        "random": (1, 3, 32), "real": (1, 3, 32)}
    assert budget.calibration_samples(tiny_costs["decoder"], 16) == 16
    assert budget.threads_for(tiny_costs["denoiser"]) == 1
    xl = preset("XL/2", image_size=256, num_classes=1000)
    costs, specs = budget.component_costs(xl), component_specs(xl)
    assert 200 < costs["denoiser"].gflop_per_sample < 300  # the paper's 118.6 multiply-add GFLOPs
    assert costs["denoiser"].weight_bytes > 2.5e9
    assert validation_batches(specs["denoiser"], costs["denoiser"].cost_gflop) == {
        "random": (1,), "real": (2,)}
    assert validation_batches(specs["quantizer"], costs["quantizer"].cost_gflop) == {
        "random": (1, 3, 16), "real": (1, 3, 16)}
    assert 4 <= budget.calibration_samples(costs["denoiser"], 16) < 16
    assert budget.calibration_samples(costs["quantizer"], 16) == 16


def test_torch_per_tensor_external_layout_is_finished_graph_only(tmp_path) -> None:
    """Over 2 GB, torch writes every tensor (Constant values too) to a file of its own beside the graph
    (what failed on DiT-XL/2's Constant nodes). The same layout, made by onnx on a tiny denoiser, goes
    through the exporter's graph-only post-processing into one data file and still computes the same."""
    import warnings

    from mmgen_deploy.export.onnx_export import check_model, finish_export

    config = preset("tiny")
    torch.manual_seed(0)
    dit = DiT(config.dit)
    rerandomize_(dit, seed=2)
    vq = VQModel(config.first_stage)
    module = build_components(vq.eval(), dit.eval())["denoiser"]
    spec = component_specs(config)["denoiser"]
    example = spec.make_inputs(2, np.random.default_rng(0))
    inline = tmp_path / "inline.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(example[n]) for n in spec.input_names), str(inline),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes={t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)
                                        if t.dynamic_axes}, opset_version=18, dynamo=False)
    torch_layout = tmp_path / "torch" / "raw.onnx"
    torch_layout.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(torch_layout), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    assert len(list(torch_layout.parent.iterdir())) > 20  # one file per tensor
    out = tmp_path / "out" / "denoiser.onnx"
    out.parent.mkdir()
    assert finish_export(torch_layout, spec, out, external_data=True)
    check_model(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["denoiser.onnx", "denoiser.onnx.data"]
    feeds = spec.make_inputs(3, np.random.default_rng(1))
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
