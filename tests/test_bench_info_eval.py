"""What `mmgen bench`, `mmgen info` and `mmgen eval` report for a class run: the figures, not only
that the command ran (text runs: test_text_deploy.py, test_text_training.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import preset
from mmgen_deploy.data import DataSpec
from mmgen_deploy.data.shapes import CLASS_NAMES
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.models.load import load_deployable
from mmgen_deploy.rundir import RunDir, save_run


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_bench_measures_two_backends_side_by_side_on_a_class_run(exported_tiny_run: RunDir, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["bench", str(exported_tiny_run.root), "--backend", "torch,onnxruntime", "--precision",
                         "fp32", "--batch-sizes", "1,2", "--runs", "2", "--warmup", "0", "--steps", "2",
                         "--components", "denoiser,quantizer,decoder", "--threads", "1",
                         "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["batches"] == [1, 2] and result["steps"] == 2 and result["cfg_scale"] == 4.0
    assert result["matmul_peaks"]["fp32"] > 0
    ran = [(b["backend"], b["precision"], b["device"]) for b in result["backends"]]
    assert ran == [("torch", "fp32", "cpu"), ("onnxruntime", "fp32", "cpu")]
    for backend in result["backends"]:
        assert backend["error"] is None
        assert set(backend["components"]) == {"denoiser", "quantizer", "decoder"}  # the encoder was not asked for
        for latencies in backend["components"].values():
            assert set(latencies) == {"1", "2"}
            for lat in latencies.values():
                assert 0 < lat["median_ms"] <= lat["p90_ms"]
        for batch in ("1", "2"):
            assert backend["images_per_s"][batch] > 0 and backend["denoiser_gflops"][batch] > 0
            split = backend["time_split"][batch]
            assert all(0.0 <= share <= 1.0 for share in split.values())
            assert math.isclose(sum(split.values()), 1.0, abs_tol=1e-6)
    markdown = (tmp_path / "bench.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| backend"))
    assert header.startswith("| backend | precision | batch | quantizer ms | decoder ms | denoiser ms | images/s")
    rows = [line.split(" | ") for line in markdown.splitlines() if line.startswith(("| torch", "| onnxruntime"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("| torch", "fp32", "1"), ("| torch", "fp32", "2"),
                                                  ("| onnxruntime", "fp32", "1"), ("| onnxruntime", "fp32", "2")]
    # images/s (vs first): the second backend's ratio is its rate over the first backend's, per batch.
    torch_ips, ort_ips = (b["images_per_s"] for b in result["backends"])
    for row, ips, base in ((rows[0], torch_ips["1"], torch_ips["1"]), (rows[3], ort_ips["2"], torch_ips["2"])):
        assert row[6] == f"{ips:.2f} ({ips / base:.2f}x)"


def test_info_describes_the_run(exported_tiny_run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    run = exported_tiny_run
    parts = load_deployable(run)
    code, out, err = _cli(["info", str(run.root), "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["run_dir"] == str(run.root) and report["first_stage"] == "vq"
    assert report["vqvae"]["params"] == sum(p.numel() for p in parts.first_stage.parameters())
    assert report["dit"]["params"] == sum(p.numel() for p in parts.dit.parameters() if p.requires_grad)
    assert report["dit"]["config"] == json.loads(json.dumps(parts.config.dit.to_dict()))
    assert report["vqvae"]["config"] == json.loads(json.dumps(parts.config.first_stage.to_dict()))
    assert report["class_names"] == [f"shape {i}" for i in range(18)]
    artifacts = report["artifacts"]
    assert set(artifacts) == {"checkpoints", "onnx", "engines", "samples", "reports"}
    assert artifacts["onnx"] is True and artifacts["engines"] is False and artifacts["checkpoints"] is False
    assert report["weights_sha256"] == run.weights_sha256() and len(report["weights_sha256"]) == 64
    code, out, err = _cli(["info", str(run.root)], capsys)
    assert code == 0, err
    vq, dit = parts.config.first_stage, parts.config.dit
    for expected in (f"{report['vqvae']['params']:,}", f"{report['dit']['params']:,}",
                     f"{vq.image_size}px / {vq.embed_dim}x{vq.latent_size}x{vq.latent_size}",
                     f"{vq.n_embed} x {vq.embed_dim}", f"depth {dit.depth}, width {dit.hidden_size}",
                     f"patch {dit.patch_size}, {dit.num_classes} classes", report["weights_sha256"][:16]):
        assert expected in out, expected


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """Tiny re-randomised models on a run that records its `shapes` data (what `eval` judges against)."""
    config = preset("tiny").replace(class_names=CLASS_NAMES)
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    return save_run(tmp_path_factory.mktemp("eval") / "run", config, vq.eval(), dit.eval(),
                    data=DataSpec(name="shapes", num_train=64, num_val=16).to_dict())


def test_class_run_eval_reports_consistent_figures(shapes_run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["eval", str(shapes_run.root), "--samples-per-class", "2", "--steps", "2", "--seed", "3",
                           "--threads", "1", "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((shapes_run.reports_dir / "eval-torch-fp32-samples2-steps2-seed3.json").read_text())
    vq = report["vqvae"]
    assert vq["num_images"] == 16
    assert 0 < vq["psnr_db_min"] <= vq["psnr_db"] < 100
    assert vq["codebook_size"] == shapes_run.load_config().first_stage.n_embed
    assert 1 <= vq["codes_used"] <= vq["codebook_size"]
    assert vq["codebook_usage"] == pytest.approx(vq["codes_used"] / vq["codebook_size"])
    assert 1.0 <= vq["perplexity"] <= vq["codes_used"] + 1e-6  # exp(entropy) of the codes used
    gen = report["generation"]
    assert (gen["backend"], gen["precision"], gen["device"]) == ("torch", "fp32", "cpu")
    assert gen["backend_reason"] == "requested"  # why this backend ran (auto says what decided)
    assert (gen["sampler"], gen["steps"], gen["cfg_scale"], gen["seed"]) == ("ddim", 2, 4.0, 3)
    assert gen["num_samples"] == 2 * len(CLASS_NAMES) and set(gen["per_class"]) == set(CLASS_NAMES)
    assert all(value in (0.0, 0.5, 1.0) for value in gen["per_class"].values())  # 2 images per class
    assert gen["accuracy"] == pytest.approx(sum(gen["per_class"].values()) / len(CLASS_NAMES))
    assert 0.0 <= gen["accuracy"] <= min(gen["colour_accuracy"], gen["shape_accuracy"]) <= 1.0
    with Image.open(gen["grid"]) as grid:  # one column per sample of a class, one row per class
        width, height = grid.size
        cell = (width - 2) // 2  # an image and its 2 px padding
        assert width == 2 * cell + 2 and height == len(CLASS_NAMES) * cell + 2
    assert f"{100 * gen['accuracy']:.1f}%" in err
