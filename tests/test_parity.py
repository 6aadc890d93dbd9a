"""`mmgen parity` end to end on a (briefly) trained tiny model, and the ways it must fail."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from export_helpers import record_as_exported
from onnx import numpy_helper

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import preset
from mmgen_deploy.export import export_run, onnx_path
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.rundir import save_run
from mmgen_deploy.specs import DEFAULT_REL_L2

pytestmark = pytest.mark.slow


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _cli_json(argv: list[str], capsys) -> tuple[int, dict]:
    """Run with `--json -`: stdout holds exactly one JSON document."""
    with pytest.raises(SystemExit) as info:
        main([*argv, "--json", "-"])
    return int(info.value.code or 0), json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained for a few hundred steps (real, non-zero DiT) and exported."""
    root = tmp_path_factory.mktemp("parity") / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "all", "--out", str(root), "--vq-steps", "60", "--dit-steps", "120",
              "--num-train", "512", "--threads", "1"])
    assert info.value.code in (0, None)
    export_run(root, precisions=("fp32", "fp16"))
    return root


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def _perturb_initializer(path, component_hint: str, fn, data_type: int = onnx.TensorProto.FLOAT) -> str:
    """Apply `fn` to the largest initializer of `data_type` in an ONNX file; return its name."""
    model = onnx.load(str(path))
    init = max((i for i in model.graph.initializer if i.data_type == data_type),
               key=lambda i: int(np.prod(i.dims)))
    array = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array(fn(array), init.name))
    onnx.save(model, str(path))
    record_as_exported(path)
    return init.name


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_passes_on_trained_model(trained_run, precision, capsys, tmp_path) -> None:
    report_path = tmp_path / "parity.json"
    code, text = _cli(["parity", str(trained_run), "--precision", precision, "--steps", "8", "--images", "4",
                       "--json", str(report_path)], capsys)
    report = json.loads(report_path.read_text())
    assert code == 0, text
    assert report["passed"] and "PASSED" in text
    groups = {c["group"] for c in report["checks"]}
    assert groups == {"encoder", "quantizer", "decoder", "denoiser", "end-to-end"}
    assert report["info"]["real_inputs"] is True  # validation images of the run's dataset were used
    psnr = next(c for c in report["checks"] if c["name"].startswith("image PSNR"))
    assert psnr["value"] >= (40 if precision == "fp32" else 30)
    assert report["info"]["end_to_end"]["drift"], "per-step drift must be reported"
    scale = report["info"]["denoiser_output_scale"]  # the scale the comparison ran at, stated
    assert report["meaningful"] and scale["meaningful"] and scale["ratio"] >= scale["threshold"]
    assert "denoiser output RMS" in text
    # Named by the settings that differ from the defaults, so a full check's verdict is never replaced.
    saved = trained_run / "reports" / f"parity-onnxruntime-{precision}-steps8-images4.json"
    assert json.loads(saved.read_text())["info"]["settings"]["steps"] == 8


def test_parity_fails_when_one_weight_is_perturbed(trained_run, tmp_path, capsys) -> None:
    run = _copy_run(trained_run, tmp_path / "run")
    _perturb_initializer(onnx_path(run, "fp32", "denoiser"), "denoiser", lambda a: a * 1.05)
    code, report = _cli_json(["parity", str(run), "--components-only", "--batch-sizes", "2"], capsys)
    assert code == 1 and not report["passed"]
    failed = {c["group"] for c in report["checks"] if not c["passed"]}
    assert failed == {"denoiser"}
    assert "FAILED" in report["verdict"] and "denoiser" in report["verdict"]


def test_parity_fails_when_one_fp16_weight_is_perturbed(trained_run, tmp_path, capsys) -> None:
    """The FP16 set is judged on its own (looser) tolerances, and those still catch a wrong graph:
    one FP16 weight matrix of the denoiser 10 % too large."""
    run = _copy_run(trained_run, tmp_path / "run")
    _perturb_initializer(onnx_path(run, "fp16", "denoiser"), "denoiser", lambda a: a * np.float16(1.1),
                         data_type=onnx.TensorProto.FLOAT16)
    fp16_components = ["parity", "--precision", "fp16", "--components-only", "--batch-sizes", "2"]
    code, report = _cli_json([*fp16_components, str(run)], capsys)
    assert code == 1 and not report["passed"]
    failed = [c for c in report["checks"] if not c["passed"]]
    assert {c["group"] for c in failed} == {"denoiser"}
    assert all(c["threshold"] == DEFAULT_REL_L2["fp16"] for c in failed)  # judged as FP16, not as FP32
    # The unperturbed FP16 set passes the same checks (the failure is the weight, not the tolerance).
    code, report = _cli_json([*fp16_components, str(trained_run)], capsys)
    assert code == 0 and report["passed"], report["verdict"]


def test_int8_parity_fails_on_a_wrong_scale_inside_a_dit_block(trained_run, tmp_path) -> None:
    """A trained DiT's INT8 denoiser whose attention projection in block 1 is dequantized with twice the
    scale it was quantized with: its output moves by about as much as INT8's own error, so the
    comparisons cannot tell (docs/design/int8-block-scale.md); the graph check must."""
    from mmgen_deploy.export.quantize import QuantSettings
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    run = _copy_run(trained_run, tmp_path / "run")
    export_run(run, precisions=("int8",), components=("denoiser",),
               quantization=QuantSettings(calibration_size=32, timesteps=4, images=18, batch=16))
    options = ParityOptions(backend="onnxruntime", precision="int8", batches=(2,), end_to_end=False,
                            components=("denoiser",))
    honest = run_parity(run, options)
    assert honest.passed, honest.verdict()
    graph_check = next(c for c in honest.checks if c.name.startswith("dequantize scales"))
    assert graph_check.group == "denoiser" and graph_check.value == 0
    path = onnx_path(run, "int8", "denoiser")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.name == "/dit/blocks.1/attn/proj/MatMul")
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and matmul.input[1] in n.output)
    scale = numpy_helper.to_array(inits[node.input[1]])
    model.graph.initializer.append(numpy_helper.from_array((scale * 2).astype(scale.dtype), node.input[1] + "_wrong"))
    node.input[1] += "_wrong"  # this DQ only: its QuantizeLinear keeps the calibrated scale
    onnx.save(model, str(path))
    record_as_exported(path)  # a faulty export step, not a graph replaced afterwards
    report = run_parity(run, options)
    assert not report.passed
    graph_check = next(c for c in report.checks if c.name.startswith("dequantize scales"))
    assert not graph_check.passed and graph_check.details["mismatched"] == [node.name]


def test_parity_fails_when_decoder_comes_from_another_model(trained_run, tmp_path, capsys) -> None:
    run = _copy_run(trained_run, tmp_path / "run")
    cfg = preset("tiny")
    other = save_run(tmp_path / "other", cfg, rerandomize_(VQModel(cfg.first_stage), seed=7),
                     rerandomize_(DiT(cfg.dit), 8))
    export_run(other.root, precisions=("fp32",), components=["decoder"])
    shutil.copy(onnx_path(other.root, "fp32", "decoder"), onnx_path(run, "fp32", "decoder"))
    record_as_exported(onnx_path(run, "fp32", "decoder"))
    code, text = _cli(["parity", str(run), "--steps", "4", "--images", "2", "--batch-sizes", "1"], capsys)
    assert code == 1
    assert "FAILED" in text and "decoder" in text.split("FAILED:")[-1]


def test_parity_fails_on_nan_from_backend(trained_run, tmp_path, capsys) -> None:
    run = _copy_run(trained_run, tmp_path / "run")

    def poison(a: np.ndarray) -> np.ndarray:
        a.flat[0] = np.nan
        return a

    _perturb_initializer(onnx_path(run, "fp32", "decoder"), "decoder", poison)
    code, report = _cli_json(["parity", str(run), "--components-only", "--batch-sizes", "1"], capsys)
    assert code == 1
    nan_checks = [c for c in report["checks"] if c["group"] == "decoder" and not c["passed"]]
    assert nan_checks and all(c["details"]["nonfinite"] > 0 for c in nan_checks)


def test_parity_refuses_untrained_model(tmp_path, capsys) -> None:
    cfg = preset("tiny")
    run = save_run(tmp_path / "fresh", cfg, VQModel(cfg.first_stage), DiT(cfg.dit))
    code, text = _cli(["parity", str(run.root)], capsys)
    assert code == 1 and "outputs exactly zero" in text and "--allow-untrained" in text
    assert len(text.strip().splitlines()) == 1


def _barely_trained_dit(cfg) -> DiT:
    """What 2 training steps leave (output RMS ~0.003 of the input's): re-randomised, then the
    final layer scaled down so the output is tiny but not zero."""
    dit = rerandomize_(DiT(cfg.dit), seed=2)
    with torch.no_grad():
        for param in dit.final_layer.parameters():
            param.mul_(1e-3)
    return dit.eval()


def test_parity_refuses_a_negligible_output_and_marks_an_override_not_meaningful(tmp_path, capsys) -> None:
    cfg = preset("tiny")
    run = save_run(tmp_path / "barely", cfg, rerandomize_(VQModel(cfg.first_stage), seed=1).eval(),
                   _barely_trained_dit(cfg))
    code, text = _cli(["parity", str(run.root), "--backend", "torch"], capsys)
    assert code == 1 and "negligible next to its input" in text and "--allow-untrained" in text
    assert "ratio 0.000" in text and len(text.strip().splitlines()) == 1
    assert not (run.root / "reports").exists()  # refused before any comparison
    # The override compares anyway, and the report says the comparison proves nothing.
    code, report = _cli_json(["parity", str(run.root), "--backend", "torch", "--allow-untrained",
                              "--components-only", "--batch-sizes", "1"], capsys)
    assert code == 0 and report["passed"] and not report["meaningful"]
    assert "NOT MEANINGFUL" in report["verdict"] and any("NOT MEANINGFUL" in n for n in report["notes"])
    scale = report["info"]["denoiser_output_scale"]
    assert not scale["meaningful"] and 0 < scale["ratio"] < 1e-3 and scale["input_rms"] > 0.9


class _Bent:
    """A backend that computes something else on purpose: the torch reference with its denoiser
    output changed by `bend` (what a broken deployment would do), everything else as given."""

    def __init__(self, inner, bend) -> None:
        self.inner, self.bend = inner, bend
        self.backend, self.precision, self.device = "bent", "bf16", "cpu"

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(component, feeds)
        return {**out, "model_output": self.bend(out["model_output"].copy())} if component == "denoiser" else out


@pytest.mark.parametrize("broken", ["one image", "every image"])
def test_end_to_end_median_image_tolerates_one_tipped_image_not_a_systematic_error(exported_tiny_run,
                                                                                    broken: str) -> None:
    """One image whose trajectory ends elsewhere fails the aggregate latent check but not the median
    image's; an error in every image fails both."""
    from mmgen_deploy.parity.compare import ToleranceOverrides, end_to_end_parity
    from mmgen_deploy.parity.report import ParityReport
    from mmgen_deploy.runtime import open_runner

    reference, _ = open_runner(exported_tiny_run.root, "torch", "fp32")
    n = 8

    def bend(eps: np.ndarray) -> np.ndarray:
        if broken == "one image":  # rows 0 and n: image 0's conditional and unconditional halves
            eps[[0, n]] += 4.0
        else:
            eps *= 2.5
        return eps

    report = ParityReport(title="bent")
    end_to_end_parity(report, reference.config, reference, _Bent(reference, bend), "bf16",
                      class_ids=list(range(n)), steps=4, sampler="ddim", cfg_scale=4.0, seed=0, batch_size=n,
                      overrides=ToleranceOverrides(), codebook=None)
    checks = {c.name: c for c in report.checks}
    aggregate, median = checks["final latent rel_l2"], checks["median image latent rel_l2"]
    per_image = median.details["per_image"]
    assert len(per_image) == n
    if broken == "one image":
        assert per_image[0] > 1.0 and max(per_image[1:]) < 1e-5
        assert not aggregate.passed and median.passed
    else:
        assert min(per_image) > 0.15 and not median.passed
