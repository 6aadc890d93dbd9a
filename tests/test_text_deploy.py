"""The text encoder as a deployable component: export (FP32/FP16), runners, parity with prompts,
engines (TensorRT-RTX ahead of time), bench and the Triton repository for text runs.

One tiny text run (re-randomised weights, shapes captions) is exported once per module and
shared; tests that change it work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from text_helpers import TEXT_DATA, make_text_run

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import preset
from mmgen_deploy.data import load_split
from mmgen_deploy.export import read_manifest
from mmgen_deploy.export.calibration import (
    component_inputs,
    dataset_calibration,
    load_calibration,
    vocabulary_prompts,
)
from mmgen_deploy.io_utils import sha256_file
from mmgen_deploy.models import build_components
from mmgen_deploy.models.load import load_models, load_text_encoder
from mmgen_deploy.numerics import tensor_diff
from mmgen_deploy.parity.compare import default_prompts
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.runtime import open_runner, resolve_backend
from mmgen_deploy.runtime.torch_runner import TorchRunner
from mmgen_deploy.sampling import sample, text_conditioning
from mmgen_deploy.specs import component_specs


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = _main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    run = make_text_run(tmp_path_factory.mktemp("text-deploy") / "run")
    assert _main(["export", str(run.root)]) == 0
    return run


def test_export_writes_five_components_and_the_text_encoder_meets_the_fp32_target(text_run: RunDir) -> None:
    manifest = read_manifest(text_run)
    assert manifest["components"] == ["encoder", "quantizer", "decoder", "denoiser", "text_encoder"]
    for precision in ("fp32", "fp16"):
        assert list(manifest["files"][precision]) == manifest["components"]
        entry = manifest["files"][precision]["text_encoder"]
        assert (text_run.onnx_dir / entry["path"]).is_file()
        assert entry["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": ["batch", 16]}]
        assert [o["name"] for o in entry["outputs"]] == ["text_embeddings", "text_mask", "text_pooled"]
        assert entry["validation"]["passed"] and entry["validation"]["batches"] == [1, 3, 16]
    assert "their captions" in manifest["calibration"]["source"]
    # FP16: LayerNorm and softmax stay FP32 (the spec's choice), the rest is FP16.
    fp16 = manifest["files"]["fp16"]["text_encoder"]
    kept = fp16["kept_fp32_nodes"]
    assert sum("LayerNormalization" in n for n in kept) == 5 and sum("Softmax" in n for n in kept) == 2
    assert fp16["fp16_nodes"] > len(kept)
    assert fp16["converter"]["arguments"]["op_types_to_exclude"] == ["LayerNormalization", "Softmax"]

    # The FP32 target, measured independently of the exporter: FP32 ONNX vs PyTorch on real
    # captions (and the empty prompt) at batch 1, 3 and the profile max.
    import onnxruntime as ort

    config = text_run.load_config()
    module = build_components(*load_models(text_run)[1:], load_text_encoder(text_run, config))["text_encoder"]
    tokenizer = text_run.load_tokenizer()
    captions = ["", *load_split(TEXT_DATA, "val").captions]
    session = ort.InferenceSession(str(text_run.onnx_dir / "fp32" / "text_encoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 3, 16):
        ids = tokenizer.encode(captions[:batch]).input_ids
        with torch.no_grad():
            reference = [t.numpy() for t in module(torch.from_numpy(ids))]
        got = session.run(None, {"input_ids": ids})
        for ref, out in zip(reference, got, strict=True):
            assert tensor_diff(ref, out).rel_l2 <= 1e-5


def test_calibration_feeds_real_captions_and_the_encoders_outputs_to_the_denoiser(text_run: RunDir) -> None:
    config, vq, dit = load_models(text_run)
    text_encoder = load_text_encoder(text_run, config)
    tokenizer = text_run.load_tokenizer()
    data = load_calibration(dataset_calibration(text_run.read_meta())[0], config)
    assert data is not None and data.captions is not None and len(data.captions) == 16
    modules = build_components(vq, dit, text_encoder)
    inputs, source = component_inputs(data, config, component_specs(config), modules, tokenizer=tokenizer)
    ids = inputs["text_encoder"]["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (16, 16)
    expected = tokenizer.encode(["" if i % 4 == 3 else c for i, c in enumerate(data.captions)]).input_ids
    np.testing.assert_array_equal(ids, expected)  # every fourth prompt is the unconditional one
    with torch.no_grad():
        embeddings, mask, pooled = text_encoder(torch.from_numpy(ids))
    denoiser = inputs["denoiser"]
    assert set(denoiser) == {"x_t", "t", "text_embeddings", "text_mask", "text_pooled"}
    np.testing.assert_allclose(denoiser["text_embeddings"], embeddings.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(denoiser["text_mask"], mask.numpy())
    np.testing.assert_allclose(denoiser["text_pooled"], pooled.numpy(), rtol=0, atol=1e-6)
    assert "captions" in source
    # Without a dataset: prompts from the tokenizer's own words, deterministic, all known.
    prompts = vocabulary_prompts(tokenizer, 8)
    assert prompts == vocabulary_prompts(tokenizer, 8) and len(set(prompts)) == 8
    assert tokenizer.encode(prompts).unknown_words == ()


def test_runners_encode_prompts_like_pytorch(text_run: RunDir) -> None:
    config = text_run.load_config()
    tokenizer = text_run.load_tokenizer()
    prompts = default_prompts(text_run, tokenizer, 3)
    assert prompts == list(dict.fromkeys(load_split(TEXT_DATA, "val").captions))[:3]
    reference = TorchRunner.from_run_dir(text_run.root)
    runner, _choice = open_runner(text_run.root, "onnxruntime", "fp32")
    assert runner.backend == "onnxruntime"
    ref_cond = text_conditioning(reference, config, tokenizer, prompts)
    ort_cond = text_conditioning(runner, config, tokenizer, prompts)
    for name, values in ref_cond.feeds.items():
        assert tensor_diff(values, ort_cond.feeds[name]).rel_l2 <= 1e-5
        assert tensor_diff(ref_cond.null_feeds[name], ort_cond.null_feeds[name]).rel_l2 <= 1e-5
    result = sample(runner, config, ort_cond, steps=3, cfg_scale=4.0, seed=0)
    assert result.images.shape == (3, 32, 32, 3) and result.prompts == prompts
    runner.close()
    # `auto` picks the exported path (ONNX Runtime, or OpenVINO BF16 on a BF16 CPU) only when the text
    # encoder is exported too.
    from conftest import cpu_auto_choice

    assert resolve_backend("auto", text_run.root, device="cpu").backend == cpu_auto_choice()[0]


def test_auto_backend_needs_the_text_encoder_graph(text_run: RunDir, tmp_path: Path) -> None:
    shutil.copytree(text_run.root, tmp_path / "run")
    (tmp_path / "run" / "onnx" / "fp32" / "text_encoder.onnx").unlink()
    choice = resolve_backend("auto", tmp_path / "run", device="cpu")
    assert choice.backend == "torch"
    assert any("text_encoder.onnx" in s for s in choice.skipped)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_with_prompts_passes_on_onnxruntime(text_run: RunDir, precision: str, capsys) -> None:
    code, text = _cli(["parity", str(text_run.root), "--precision", precision, "--steps", "8", "--images", "4",
                       "--json", str(text_run.root / f"parity-{precision}.json")], capsys)
    assert code == 0, text
    assert "PASSED" in text and "text_encoder" in text and "text_embeddings rel_l2" in text
    report = json.loads((text_run.root / f"parity-{precision}.json").read_text())
    groups = {c["group"] for c in report["checks"]}
    assert groups == {"encoder", "quantizer", "decoder", "denoiser", "text_encoder", "end-to-end"}
    assert all(c["passed"] for c in report["checks"])
    assert report["info"]["end_to_end"]["prompts"] == default_prompts(text_run, text_run.load_tokenizer(), 4)
    psnr = next(c["value"] for c in report["checks"] if c["name"] == "image PSNR (dB)")
    assert psnr >= (40.0 if precision == "fp32" else 30.0)
    text_checks = [c for c in report["checks"] if c["group"] == "text_encoder"]
    assert {"random", "real"} <= {c["name"].split("(")[1].split(",")[0] for c in text_checks}


def test_parity_prompt_option(text_run: RunDir, tmp_path: Path, capsys) -> None:
    code = _main(["parity", str(text_run.root), "--components-only", "--batch-sizes", "1", "--prompt", "a zebra",
                  "--json", "-"])
    text = capsys.readouterr().out
    assert code == 0, text
    # --components-only wins: the prompt (which only the end-to-end check uses) samples nothing, and
    # every component, the text encoder included, is still compared (random and real inputs, batch 1).
    report = json.loads(text)
    assert report["passed"] and "end_to_end" not in report["info"]
    assert {c["group"] for c in report["checks"]} == {"encoder", "quantizer", "decoder", "denoiser", "text_encoder"}
    assert {c["name"] for c in report["checks"] if c["group"] == "text_encoder"} >= {
        "text_embeddings rel_l2 (random, batch 1)", "text_embeddings rel_l2 (real, batch 1)"}
    code, text = _cli(["parity", str(text_run.root), "--steps", "2", "--images", "2", "--batch-sizes", "1",
                       "--prompt", "a large red circle at the top", "--threads", "1",
                       "--json", str(tmp_path / "p.json")], capsys)
    assert code == 0, text
    info = json.loads((tmp_path / "p.json").read_text())["info"]
    assert info["end_to_end"]["prompts"] == ["a large red circle at the top"] * 2
    # The Python API as quickstart calls it (only the pre-text options) works for text runs too.
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    report = run_parity(text_run.root, ParityOptions(precision="fp16", batches=(1,), steps=2, num_images=2))
    assert report.passed and len(report.info["end_to_end"]["prompts"]) == 2


def test_bench_samples_prompts_and_triton_takes_text_runs(text_run: RunDir, tmp_path: Path, capsys) -> None:
    code, text = _cli(["bench", str(text_run.root), "--backend", "onnxruntime", "--precision", "fp32",
                       "--batch-sizes", "2", "--runs", "1", "--warmup", "0", "--steps", "2",
                       "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md")], capsys)
    assert code == 0, text
    result = json.loads((tmp_path / "bench.json").read_text())
    backend = result["backends"][0]
    assert backend["error"] is None and "text_encoder" in backend["components"]
    assert backend["images_per_s"]["2"] > 0
    assert "| denoiser ms | text encoder ms |" in (tmp_path / "bench.md").read_text()
    # Triton serves text runs too (tests/test_serve_text.py runs the server).
    code, text = _cli(["triton-repo", str(text_run.root), "--out", str(tmp_path / "repo")], capsys)
    assert code == 0, text
    assert json.loads((tmp_path / "repo" / "mmgen_repository.json").read_text())["conditioning"] == "text"


def test_class_runs_have_no_text_encoder_to_export(tmp_path: Path, random_models, capsys) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    code, text = _cli(["export", str(run.root), "--components", "text_encoder"], capsys)
    assert code == 2 and "class-conditioned model has no text encoder" in text
    assert len(text.strip().splitlines()) == 1 and not run.onnx_dir.exists()


@pytest.mark.tensorrt
def test_tensorrt_rtx_builds_the_text_encoder_ahead_of_time(text_run: RunDir, tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (dev extra)")
    from mmgen_deploy.engines.flavour import load_flavour
    from mmgen_deploy.engines.manifest import check_engine_dir

    shutil.copytree(text_run.root, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    code, text = _cli(["build-engine", str(run.root), "-r", "tensorrt-rtx", "--opt-level", "0",
                       "--components", "text_encoder", "--components", "denoiser",
                       "--json", str(tmp_path / "build.json")], capsys)
    assert code == 0, text
    built = json.loads((tmp_path / "build.json").read_text())
    assert set(built["components"]) == {"text_encoder", "denoiser"}
    directory = Path(built["directory"])
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["components"]["text_encoder"]
    # A real serialized engine: it carries the text encoder's weights, so it is at least as large as
    # the FP16 graph's initializers (an empty or weightless plan is not).
    import onnx

    graph = onnx.load(str(run.onnx_dir / "fp16" / "text_encoder.onnx"))
    weight_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.graph.initializer)
    assert (directory / entry["plan"]).stat().st_size == entry["plan_bytes"] >= weight_bytes > 100_000
    assert sha256_file(directory / entry["plan"]) == entry["plan_sha256"]
    assert entry["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": ["batch", 16]}]
    assert entry["profile"]["input_ids"] == {"min": [1, 16], "opt": [4, 16], "max": [16, 16]}
    assert [o["name"] for o in entry["outputs"]] == ["text_embeddings", "text_mask", "text_pooled"]
    # The text denoiser's profile covers the guidance-doubled batch of every condition input.
    denoiser = manifest["components"]["denoiser"]["profile"]
    assert denoiser["text_embeddings"]["max"] == [32, 16, 128] and denoiser["text_pooled"]["max"] == [32, 128]
    engine_set = check_engine_dir(run, load_flavour("tensorrt-rtx"))  # ONNX hashes and plans match the manifest
    assert set(engine_set.components) == {"text_encoder", "denoiser"}
    # `auto` does not pick a set that cannot sample (no quantizer / decoder engines here).
    from mmgen_deploy.runtime.backends import tensorrt_problem
    from mmgen_deploy.specs import sampling_components

    assert "no quantizer, decoder engine" in str(tensorrt_problem(run, sampling_components(run.load_config()), "fp16"))


def test_random_denoiser_inputs_of_a_text_run_come_from_its_text_encoder(tmp_path: Path) -> None:
    """Export validation and parity feed a trained text DiT what its encoder makes of random prompts,
    not the spec's standard-normal stand-ins (which a trained DiT was never trained on)."""
    from mmgen_deploy.specs import random_feeds

    run = make_text_run(tmp_path / "run")
    config = run.load_config()
    specs = component_specs(config)
    assert specs["denoiser"].upstream == "text_encoder"
    assert component_specs(preset("tiny"))["denoiser"].upstream is None
    reference = TorchRunner.from_run_dir(run.root)
    seen: list[dict[str, np.ndarray]] = []

    def run_upstream(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(feeds)
        return reference.run(name, feeds)

    plain = random_feeds(specs["denoiser"], specs, 5, np.random.default_rng(0))
    adjusted = random_feeds(specs["denoiser"], specs, 5, np.random.default_rng(0), run_upstream)
    assert set(adjusted) == set(plain) and len(seen) == 1
    ids = seen[0]["input_ids"]
    assert ids.shape == (5, config.text.max_length)
    np.testing.assert_array_equal(adjusted["x_t"], plain["x_t"])
    np.testing.assert_array_equal(adjusted["t"], plain["t"])
    expected = reference.run("text_encoder", {"input_ids": ids})
    for name in ("text_embeddings", "text_mask", "text_pooled"):
        assert adjusted[name].dtype == np.float32 and adjusted[name].flags.c_contiguous
        np.testing.assert_array_equal(adjusted[name], expected[name])
        assert not np.array_equal(adjusted[name], plain[name])
    # The mask marks exactly the prompt's tokens (non-padding ids).
    np.testing.assert_array_equal(adjusted["text_mask"], (ids != 0).astype(np.float32))
