"""INT8 / FP8 sets: calibration along the trajectory, Q/DQ export, parity, engines and staleness.

Kept small for CI: the tiny preset with re-randomised weights, a 32-sample calibration, and only
the components that sampling needs (denoiser, quantizer, decoder)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_helpers import record_as_exported

from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.config import StudentConfig, preset
from mmgen_deploy.data import DataSpec
from mmgen_deploy.errors import UsageError
from mmgen_deploy.export.calibration import CalibrationData
from mmgen_deploy.export.quantize import QuantSettings, calibration_timesteps, trajectory_calibration
from mmgen_deploy.models import DiT, VQModel, build_components, rerandomize_
from mmgen_deploy.specs import component_specs

# The decoder ships FP16 in these sets (a per-component choice): re-randomised VQ decoders have no
# trained activation structure and quantize badly, and it exercises the mixed-precision path.
SMALL = QuantSettings(calibration_size=32, timesteps=4, images=18, batch=16, component_precisions={"decoder": "fp16"})
SAMPLING = ("denoiser", "quantizer", "decoder")


def test_calibration_draws_the_promised_timesteps_and_both_guidance_halves(random_models) -> None:
    config, vq, dit = random_models
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(18), 2).astype(np.int32)  # 36 images, two per class, in class order
    images = rng.uniform(-1, 1, (36, 3, 32, 32)).astype(np.float32)
    settings = QuantSettings(calibration_size=144, timesteps=4, images=18)
    lines: list[str] = []
    inputs, description = trajectory_calibration(CalibrationData(images, labels, "test"), config,
                                                 build_components(vq, dit), settings, progress=lines.append)
    # Progress per batch of the first stage (a 256 px encoder takes seconds per image on a CPU).
    assert lines[0].startswith("encoder ") and "encoder 18/18 images" in lines and "decoder 18/18 images" not in lines
    assert lines[-1] == "quantizer 18/18 images"
    den = inputs["denoiser"]
    expected_t = calibration_timesteps(config.diffusion.num_train_timesteps, 4)
    assert list(expected_t) == [0, 333, 666, 999]  # spread over the whole schedule, both ends
    assert sorted({int(t) for t in den["t"]}) == list(expected_t) == description["denoiser"]["timesteps"]
    null = config.dit.num_classes
    assert len(den["t"]) == 144
    for t in expected_t:
        rows = den["t"] == t
        cond = rows & (den["class_ids"] != null)
        uncond = rows & (den["class_ids"] == null)
        assert cond.sum() == uncond.sum() == 18  # both halves of guidance at every timestep
        # The null half sees the same noisy latents as the conditional half, as in sampling.
        np.testing.assert_array_equal(den["x_t"][cond], den["x_t"][uncond])
    # Every class appears in the conditional half (images were picked round-robin over classes).
    assert set(np.unique(den["class_ids"][den["class_ids"] != null])) == set(range(18))
    assert description["denoiser"]["halves"] == {"conditional": 72, "null": 72}
    # Noise level follows the schedule: at t = 999 x_t is almost pure noise, at t = 0 almost the latent.
    assert np.std(den["x_t"][den["t"] == 999]) == pytest.approx(1.0, abs=0.15)
    # Encoder / decoder: real images and their codes.
    assert inputs["encoder"]["image"].shape[0] == inputs["decoder"]["z_q"].shape[0] == 18


def test_images_validated_and_calibrated_are_encoded_once(random_models) -> None:
    """Export validation and 8-bit calibration take overlapping images; with the export's shared
    cache the second pass runs the encoder only on images the first did not, and gets the same
    inputs as a pass without the cache."""
    from mmgen_deploy.export.calibration import FirstStageCache, first_stage_inputs

    config, vq, dit = random_models
    modules = build_components(vq, dit)
    specs = component_specs(config)
    images = np.random.default_rng(1).uniform(-1, 1, (10, 3, 32, 32)).astype(np.float32)
    encoded: list[int] = []
    hook = modules["encoder"].register_forward_hook(lambda _m, args, _out: encoded.append(args[0].shape[0]))
    try:
        cache = FirstStageCache()
        first_stage_inputs(images[:6], config, specs, modules, cache=cache)  # the validation set
        assert sum(encoded) == 6 and len(cache) == 6
        encoded.clear()
        lines: list[str] = []
        picked = images[[8, 2, 9, 0, 5]]  # the calibration pick: two new images among known ones
        inputs, latent = first_stage_inputs(picked, config, specs, modules, cache=cache, progress=lines.append)
        assert sum(encoded) == 2 and len(cache) == 8
        assert lines[-1] == "quantizer 2/2 images (3 encoded before)"
        encoded.clear()
        fresh_inputs, fresh_latent = first_stage_inputs(picked, config, specs, modules)
        assert sum(encoded) == 5  # no cache: every image runs
    finally:
        hook.remove()
    # Equal up to batch-size-dependent kernel rounding (the rows were encoded in other batches).
    np.testing.assert_allclose(latent, fresh_latent, rtol=1e-5, atol=1e-6)
    for name, tensors in fresh_inputs.items():
        for tensor, value in tensors.items():
            np.testing.assert_allclose(inputs[name][tensor], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}/{tensor}")


def test_quantizer_is_never_quantized_whatever_is_asked() -> None:
    specs = component_specs(preset("tiny"))
    forced = QuantSettings(component_precisions={"quantizer": "quantize", "decoder": "fp16"})
    for precision in ("int8", "fp8"):
        assert specs["quantizer"].shipped_precision(precision) == "fp32"
        assert forced.shipped_precision(specs["quantizer"], precision) == "fp32"
        assert forced.shipped_precision(specs["decoder"], precision) == "fp16"
        assert forced.shipped_precision(specs["denoiser"], precision) == precision
    with pytest.raises(UsageError) as refused:
        QuantSettings(component_precisions={"decoder": "int4"})
    assert describe_error(refused.value).startswith("--component-precision: unknown value(s) {'decoder': 'int4'}")


def test_calibration_size_is_checked_against_the_timesteps_the_calibration_uses() -> None:
    teacher = preset("tiny")
    student = teacher.replace(dit=teacher.dit.replace(guidance_embed=True),
                              student=StudentConfig(steps=4, timesteps=(999, 749, 500, 250)))
    # A teacher: a conditional and a null sample at each of --calibration-timesteps.
    QuantSettings(calibration_size=16, timesteps=8).check_for(teacher)
    with pytest.raises(UsageError) as refused:
        QuantSettings(calibration_size=15, timesteps=8).check_for(teacher)
    assert describe_error(refused.value) == ("--calibration-size 15 is too small for 8 calibration timesteps (give "
                                             "at least 16, one conditional and one null sample per timestep, or "
                                             "fewer --calibration-timesteps)")
    # A student: one sample at each of its own 4 steps, whatever --calibration-timesteps says.
    for settings in (QuantSettings(calibration_size=4, timesteps=8), QuantSettings(calibration_size=8, timesteps=100)):
        settings.check_for(student)
        assert len(settings.denoiser_timesteps(student)[0]) == 4
    with pytest.raises(UsageError) as refused:
        QuantSettings(calibration_size=3).check_for(student)
    assert describe_error(refused.value) == ("--calibration-size 3 is too small for the 4 timesteps this distilled "
                                             "student calibrates at (give at least 4, one sample per timestep)")


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory: pytest.TempPathFactory):
    """A re-randomised tiny run on `shapes` with FP16, INT8 and FP8 sets of the sampling components."""
    from mmgen_deploy.export import export_run
    from mmgen_deploy.rundir import save_run

    config = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path_factory.mktemp("quant") / "run", config, vq.eval(), dit.eval(),
                   data=DataSpec(name="shapes", num_val=64).to_dict())
    manifest = export_run(run, precisions=("fp16", "int8", "fp8"), components=SAMPLING, quantization=SMALL)
    return run, manifest


def _consumers_of_dequantized(model: onnx.ModelProto) -> set[str]:
    dq = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return {node.name for node in model.graph.node if any(i in dq for i in node.input)}


def test_int8_fp8_sets_have_manifest_records_and_keep_the_quantizer_fp32(quantized_run) -> None:
    run, manifest = quantized_run
    for precision in ("int8", "fp8"):
        files = manifest["files"][precision]
        den = files["denoiser"]
        assert den["component_precision"] == precision and den["validation"]["passed"]
        record = den["quantization"]
        assert record["name"] == "modelopt.onnx.quantization.quantize" and record["version"]
        assert record["arguments"]["quantize_mode"] == precision
        assert record["arguments"]["calibration_samples"] == 32 and record["quantized_nodes"] > 0
        # What stayed in high precision is recorded, and the timestep embedding is among it.
        assert any("t_embedder" in n for n in record["high_precision_compute_nodes"])
        model = onnx.load(str(run.onnx_dir / den["path"]))
        quantized = _consumers_of_dequantized(model)
        assert quantized and not any("/t_embedder/" in n for n in quantized)
        # The quantizer: FP32 graph, no Q/DQ node at all.
        q = files["quantizer"]
        assert q["component_precision"] == "fp32" and q["quantization"]["qdq_pairs"] == 0
        q_model = onnx.load(str(run.onnx_dir / q["path"]))
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q_model.graph.node)
        # The per-component choice: the decoder ships FP16 inside the 8-bit set.
        assert files["decoder"]["component_precision"] == "fp16"
        assert files["decoder"]["quantization"]["qdq_pairs"] == 0
        # Who kept each unquantized, by the setting's name: the user's override, or the spec.
        assert files["decoder"]["quantization"]["name"] == "none (component kept FP16: component_precisions)"
        assert q["quantization"]["name"] == "none (component kept FP32: spec.keep_fp32, distances decide code indices)"
    calibration = manifest["calibration"]["quantization"]
    assert calibration["denoiser"]["timesteps"] == [0, 333, 666, 999]
    assert calibration["settings"]["calibration_size"] == 32
    # The FP16 set is still there, untouched by the 8-bit export.
    assert set(manifest["files"]) == {"fp16", "int8", "fp8"}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_onnxruntime_parity_passes_at_8_bit(quantized_run, precision: str) -> None:
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    run, _ = quantized_run
    report = run_parity(run.root, ParityOptions(backend="onnxruntime", precision=precision, batches=(2,),
                                                steps=4, num_images=2, components=SAMPLING))
    assert report.passed, [c for c in report.checks if not c.passed]
    assert report.info["component_precisions"] == {"denoiser": precision, "quantizer": "fp32", "decoder": "fp16"}
    # Each component is held to the tolerance of its own precision (the FP16 decoder to FP16's).
    decoder = next(c for c in report.checks if c.group == "decoder")
    assert decoder.threshold == component_specs(preset("tiny"))["decoder"].tolerance("fp16", "image").rel_l2


def test_a_wrong_scale_fails_parity(quantized_run, tmp_path) -> None:
    """Dequantize one weight of the INT8 denoiser with twice its scale (a calibration / export bug that
    leaves a valid graph): parity must fail on the denoiser. (The patch embedding: in a re-randomised
    DiT the blocks' contributions are small, so a wrong scale inside one block moves the output by
    only ~1-3%, within the INT8 tolerance; this one moves it by ~30%. A wrong scale inside a block is
    the graph check's: test_parity.py.)"""
    import shutil

    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    run, manifest = quantized_run
    broken = tmp_path / "run"
    shutil.copytree(run.root, broken)
    path = broken / "onnx" / manifest["files"]["int8"]["denoiser"]["path"]
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    assert inits  # the scales are initializers
    # The DequantizeLinear that feeds the patch embedding's weight into its Conv.
    matmul = next(n for n in model.graph.node if n.name == "/dit/x_embedder/proj/Conv")
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and matmul.input[1] in n.output)
    scale = onnx.numpy_helper.to_array(inits[node.input[1]])
    wrong = onnx.numpy_helper.from_array((scale * 2).astype(scale.dtype), node.input[1] + "_wrong")
    model.graph.initializer.append(wrong)
    node.input[1] = wrong.name  # only this DQ: Q and DQ of an activation share one scale
    onnx.save(model, str(path))
    record_as_exported(path)
    report = run_parity(broken, ParityOptions(backend="onnxruntime", precision="int8", batches=(2,),
                                              end_to_end=False, components=("denoiser",)))
    assert not report.passed
    assert any(not c.passed and c.group == "denoiser" for c in report.checks)
    graph_check = next(c for c in report.checks if c.name.startswith("dequantize scales"))
    assert not graph_check.passed and graph_check.details["mismatched"] == [node.name]


@pytest.mark.tensorrt
def test_8_bit_engines_build_ahead_of_time_and_go_stale(quantized_run, tmp_path) -> None:
    import shutil

    pytest.importorskip("tensorrt_rtx")
    from mmgen_deploy.engines.builder import BuildOptions, build_engines
    from mmgen_deploy.engines.flavour import load_flavour
    from mmgen_deploy.engines.manifest import StaleEngineError, check_engine_dir
    from mmgen_deploy.rundir import RunDir

    run, _ = quantized_run
    copy = RunDir(shutil.copytree(run.root, tmp_path / "run"))
    # FP8 needs SM >= 8.9: refused before any work for RTX's default (Ampere) targets and for sm86.
    with pytest.raises(UsageError, match=r"8\.9"):
        build_engines(copy, BuildOptions(runtime="tensorrt-rtx", precision="fp8", components=("denoiser",)))
    with pytest.raises(UsageError, match="sm86"):
        build_engines(copy, BuildOptions(runtime="tensorrt-rtx", precision="fp8", components=("denoiser",),
                                         compute_capabilities=("sm86", "sm89")))
    built = {}
    for precision in ("int8", "fp8"):
        result = build_engines(copy, BuildOptions(runtime="tensorrt-rtx", precision=precision,
                                                  components=("denoiser",), compute_capabilities=("sm89",),
                                                  opt_level=0))
        assert result.directory.name.endswith(f"-{precision}") and result.manifest["precision"] == precision
        assert result.manifest["onnx_export"]["denoiser"]["component_precision"] == precision
        built[precision] = result.directory
    assert built["int8"] != built["fp8"]  # one folder per precision, side by side
    flavour = load_flavour("tensorrt-rtx")
    check_engine_dir(copy, flavour, precision="int8")
    # Re-exporting (here: changing) the INT8 graph makes only the INT8 engines stale.
    onnx_file = copy.onnx_dir / "int8" / "denoiser.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b" ")
    with pytest.raises(StaleEngineError, match=r"onnx/int8/denoiser\.onnx changed"):
        check_engine_dir(copy, flavour, precision="int8")
    check_engine_dir(copy, flavour, precision="fp8")


def test_large_components_calibrate_in_small_batches(tmp_path, random_models) -> None:
    """The calibration batch is capped per component (`batch_limit`, from the exporter's budget), and
    the FP16 part of an 8-bit graph gets its ranges from mmgen's bounded range analysis, not from
    AutoCast's own reference run (which holds every tensor of the batch at once)."""
    import onnxruntime as ort

    from mmgen_deploy.export import export_run, onnx_path
    from mmgen_deploy.export.quantize import quantize_component
    from mmgen_deploy.rundir import save_run

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run, precisions=("fp32",), components=("denoiser",))
    spec = component_specs(config)["denoiser"]
    calibration = spec.make_inputs(16, np.random.default_rng(0))
    target = tmp_path / "int8" / "denoiser.onnx"
    record = quantize_component(onnx_path(run, "fp32", "denoiser"), spec, target, "int8", calibration,
                                QuantSettings(calibration_size=16, timesteps=4, batch=16), batch_limit=4)
    assert record["arguments"]["calibration_batch"] == 4 and record["arguments"]["calibration_samples"] == 16
    assert record["fp16_converter"]["arguments"]["reference_runner"].startswith("mmgen activation_ranges")
    assert record["fp16_converter"]["arguments"]["calibration_batch"] == 4
    feeds = spec.make_inputs(2, np.random.default_rng(1))
    want = ort.InferenceSession(str(onnx_path(run, "fp32", "denoiser"))).run(None, feeds)[0]
    got = ort.InferenceSession(str(target)).run(None, feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.25
