from __future__ import annotations

import pytest
import torch

from mmgen_deploy.cli.app import main
from mmgen_deploy.errors import RunDirError
from mmgen_deploy.models import build_components
from mmgen_deploy.models.load import load_deployable, load_dit, load_models, load_vqvae
from mmgen_deploy.rundir import RunDir, save_run


def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, random_models) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    config2, vq2, dit2 = load_models(run)
    assert config2 == config
    image = torch.rand(3, 3, 32, 32) * 2 - 1
    t = torch.tensor([1.0, 400.0, 999.0])
    y = torch.tensor([0, 5, 18], dtype=torch.int32)
    a, b = build_components(vq, dit), build_components(vq2, dit2)
    with torch.no_grad():
        h = a["encoder"](image)
        assert torch.equal(h, b["encoder"](image))
        zq, idx = a["quantizer"](h)
        zq2, idx2 = b["quantizer"](h)
        assert torch.equal(zq, zq2) and torch.equal(idx, idx2)
        assert torch.equal(a["decoder"](zq), b["decoder"](zq))
        assert torch.equal(a["denoiser"](h, t, y), b["denoiser"](h, t, y))


def test_missing_and_corrupt_runs_raise_clear_errors(tmp_path, random_models) -> None:
    config, vq, dit = random_models
    with pytest.raises(RunDirError, match="does not exist"):
        load_models(RunDir(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not an mmgen run directory"):
        RunDir(tmp_path / "empty").load_config()
    run = save_run(tmp_path / "run", config, vq, dit)
    with pytest.raises(RunDirError, match=r"run\.json is a file, not a run directory \(give its folder, "):
        RunDir(run.run_json).load_config()
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(RunDirError, match=r"notes\.txt is a file, not a run directory \(give the run's folder, "):
        load_models(RunDir(tmp_path / "notes.txt"))
    weights = run.weights_path("dit")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RunDirError, match="corrupt weight file"):
        load_dit(run)
    run.weights_path("vqvae").unlink()
    with pytest.raises(RunDirError, match="missing weight file"):
        load_vqvae(run)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_cli_reports_corrupt_weights_in_one_line(tmp_path, random_models, capsys) -> None:
    """Uses the real entry point; `doctor`-free path through RunDir via a run-reading command."""
    from mmgen_deploy.cli.common import state

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    run.weights_path("vqvae").write_bytes(b"\x00garbage")
    code, text = _cli(["info", str(run.root)], capsys)
    assert code != 0
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "corrupt weight file" in lines[0] and "Traceback" not in text
    assert not state.debug


def test_cli_version_help_doctor(capsys) -> None:
    code, text = _cli(["--version"], capsys)
    assert code == 0 and "mmgen-deploy" in text
    code, text = _cli(["doctor"], capsys)
    assert code == 0 and "onnxruntime" in text and "torch" in text
    # A command called without its required argument: usage error (exit 2), no traceback.
    code, text = _cli(["serve"], capsys)
    assert code == 2 and "error: missing argument" in text and "Traceback" not in text


def test_rundir_owns_the_layout_and_one_loader(tmp_path, random_models) -> None:
    from mmgen_deploy.export import manifest_path, onnx_path
    from mmgen_deploy.rundir import RUN_ENTRIES
    from mmgen_deploy.specs import PRECISIONS

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    assert RunDir.of(run) is run and RunDir.of(str(run.root)).root == run.root
    assert run.onnx_path("fp16", "decoder") == run.root / "onnx" / "fp16" / "decoder.onnx"
    assert onnx_path(run.root, "fp16", "decoder") == run.onnx_path("fp16", "decoder")  # the export API delegates
    assert manifest_path(run) == run.onnx_manifest_path == run.root / "onnx" / "manifest.json"
    assert run.missing_onnx(PRECISIONS[0], ("decoder",)) == [run.onnx_path(PRECISIONS[0], "decoder")]
    with pytest.raises(ValueError, match="precision must be one of"):
        run.onnx_path("fp64", "decoder")
    assert {p.name for p in run.root.iterdir()} <= set(RUN_ENTRIES)
    parts = load_deployable(run)
    assert parts.config == config and parts.text_encoder is None and parts.tokenizer is None
    # The config is parsed once per RunDir while its files are unchanged, and re-read when one is rewritten.
    assert run.load_config() is run.load_config()
    run.update_meta(class_names=[f"c{i}" for i in range(config.dit.num_classes)])
    assert run.load_config().class_names[0] == "c0"


def test_saving_the_same_weights_writes_the_same_bytes(tmp_path) -> None:
    """The weight file's hash is what export manifests record as their source: saving identical
    weights in separate processes must give identical files (safetensors orders a multi-entry
    metadata map differently per process)."""
    import hashlib
    import subprocess
    import sys

    script = (
        "import sys, torch; from mmgen_deploy.rundir import RunDir; torch.manual_seed(0); "
        "run = RunDir(sys.argv[1]); run.weights_path('dit').parent.mkdir(parents=True); "
        "run.save_weights('dit', torch.nn.Linear(4, 3))"
    )
    digests = set()
    for i in range(6):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"run{i}")], check=True)
        digests.add(hashlib.sha256((tmp_path / f"run{i}" / "dit" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_remembered_hashes_follow_every_change_of_the_file(tmp_path, monkeypatch) -> None:
    """Hashes of weight files are remembered across processes only while the file is provably the
    same: rewriting it (even with the same size and mtime put back) or replacing it is seen."""
    import json
    import os

    from mmgen_deploy import io_utils
    from mmgen_deploy.io_utils import sha256_file, sha256_file_remembered

    monkeypatch.setenv("MMGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(io_utils, "SETTLED_NS", 0)  # no 2 s wait for the file to settle
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 4096)
    first = sha256_file_remembered(weights)
    assert first == sha256_file(weights)
    assert len(list((tmp_path / "cache" / "sha256").glob("*.json"))) == 1
    # Same size, same mtime restored: the ctime moved, so it is hashed again.
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"b")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file_remembered(weights) == sha256_file(weights) != first
    # The refreshed entry is what answers now: an entry with the same stamp and another hash wins.
    (entry,) = (tmp_path / "cache" / "sha256").glob("*.json")
    known = json.loads(entry.read_text())
    entry.write_text(json.dumps({**known, "sha256": "0" * 64}))
    assert sha256_file_remembered(weights) == "0" * 64
    entry.write_text(json.dumps(known))
    # A file just written is not remembered (a rewrite in the same clock tick could keep its stamp).
    monkeypatch.setattr(io_utils, "SETTLED_NS", 2_000_000_000)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"c")
    sha256_file_remembered(fresh)
    assert len(list((tmp_path / "cache" / "sha256").glob("*.json"))) == 1
    # The cache turned off: still the right hash.
    monkeypatch.setenv("MMGEN_CACHE_DIR", "")
    assert sha256_file_remembered(weights) == sha256_file(weights)


def _edit_config(run: RunDir, part: str, **values: object) -> None:
    import json

    path = run.config_path(part)
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize(("part", "values", "message"), [
    ("dit", {"hidden_size": "128"}, "dit.hidden_size must be an integer, got '128' (str)"),
    ("dit", {"depth": 4.5}, "dit.depth must be an integer, got 4.5 (float)"),
    ("dit", {"mlp_ratio": "4"}, "dit.mlp_ratio must be a finite number, got '4' (str)"),
    ("dit", {"num_heads": None}, "dit.num_heads must be an integer, got None"),
    ("dit", {"learn_sigma": "no"}, "dit.learn_sigma must be true or false"),
    ("vqvae", {"channel_mult": [1, "2"]}, "vq.channel_mult must be a list of integers"),
    ("dit", {"hidden_size": 1_000_000_000}, "dit.hidden_size 1000000000 is larger than any model"),
    ("vqvae", {"base_channels": 10**12}, "vq.base_channels 1000000000000 is larger than any model"),
])
def test_hostile_config_values_are_refused_in_one_line(tmp_path, random_models, capsys, part: str,
                                                      values: dict[str, object], message: str) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    _edit_config(run, part, **values)
    code, text = _cli(["info", str(run.root)], capsys)
    assert code == 1 and message in text and f"{part}/config.json" in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_config_sizes_are_checked_against_the_weight_shapes_before_building(tmp_path, random_models,
                                                                           monkeypatch) -> None:
    """A config within the bounds but far larger than its weights: refused from the file's header,
    before any real model is built (building one would allocate ~100 GB for these sizes)."""
    import mmgen_deploy.models.dit as dit_module

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    built_for_real = []
    original_init = dit_module.DiT.__init__

    def watch(self, cfg) -> None:  # type: ignore[no-untyped-def]
        original_init(self, cfg)
        if not self.x_embedder.proj.weight.is_meta:
            built_for_real.append(cfg)

    monkeypatch.setattr(dit_module.DiT, "__init__", watch)
    _edit_config(run, "dit", hidden_size=16384, depth=256, num_heads=128)
    with pytest.raises(RunDirError, match=r"does not match its config.json: pos_embed is \[1, 16, 128\] in the "
                                          r"file, the config makes it \[1, 16, 16384\]"):
        load_dit(run)
    from mmgen_deploy.export import export_run

    with pytest.raises(RunDirError, match=r"does not match its config\.json: pos_embed"):
        export_run(run, precisions=("fp32",))  # before its memory estimate, which trusts the config's sizes
    assert not built_for_real and not run.onnx_dir.exists()
    _edit_config(run, "dit", hidden_size=128, depth=5, num_heads=4)
    with pytest.raises(RunDirError, match=r"missing blocks\.4"):
        load_dit(run)
    _edit_config(run, "dit", depth=4)
    assert load_dit(run).config.depth == 4 and len(built_for_real) == 1


def test_truncated_weights_are_named_as_such_before_the_export_is_blamed(exported_tiny_run, tmp_path,
                                                                         capsys) -> None:
    import shutil

    run = RunDir(shutil.copytree(exported_tiny_run.root, tmp_path / "run"))
    weights = run.weights_path("dit")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    code, text = _cli(["generate", str(run.root), "-c", "0", "--n", "1", "--steps", "1", "--backend",
                       "onnxruntime", "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "corrupt weight file" in text and "truncated or damaged" in text, text
    assert "exported from other weights" not in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_reports_are_named_by_the_settings_that_differ_from_the_defaults(tmp_path) -> None:
    from mmgen_deploy.parity.compare import ParityOptions, parity_report_path

    run = RunDir(tmp_path / "run")
    reports = run.root / "reports"
    assert parity_report_path(run, ParityOptions()) == reports / "parity-onnxruntime-fp32.json"
    assert parity_report_path(run, ParityOptions(backend="openvino", precision="bf16")) \
        == reports / "parity-openvino-bf16.json"
    quick = ParityOptions(steps=4, num_images=2, batches=(1,), cfg_scale=7.5, sampler="ddpm", end_to_end=True)
    assert parity_report_path(run, quick).name == "parity-onnxruntime-fp32-batches1-steps4-ddpm-cfg7.5-images2.json"
    prompts = parity_report_path(run, ParityOptions(prompts=["a red circle"], rel_l2={"model_output": 0.1}))
    assert prompts.name.startswith("parity-onnxruntime-fp32-rel-l2-") and "-prompts-" in prompts.name
    assert parity_report_path(run, ParityOptions(end_to_end=False)).name == "parity-onnxruntime-fp32-no-end-to-end.json"
    assert run.report_path("quickstart") == reports / "quickstart.json"
    assert run.report_path("x", "a/b", note="../up").parent == reports  # no path separators in names
    assert run.train_report_path("dit") == reports / "train_dit.json"
    assert run.checkpoint_path("vqvae") == run.root / "checkpoints" / "vqvae.pt"
