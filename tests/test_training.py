"""Training end to end on a shrunken tiny config: losses fall, --resume is exact, --seed determines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import DiTConfig, ModelConfig, VQConfig
from mmgen_deploy.data import DataSpec
from mmgen_deploy.data.shapes import CLASS_NAMES, make_shapes
from mmgen_deploy.errors import RunDirError
from mmgen_deploy.models import VQModel
from mmgen_deploy.models.load import load_dit, load_models, load_vqvae
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.training import prepare_run
from mmgen_deploy.training.common import TrainingInterrupted, load_checkpoint
from mmgen_deploy.training.dit import DiTTrainSettings, train_dit
from mmgen_deploy.training.vqvae import VQTrainSettings, standardize_latents_, train_vqvae


def _small_config() -> ModelConfig:
    vq = VQConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, n_embed=32)
    dit = DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=18)
    return ModelConfig(first_stage=vq, dit=dit, class_names=CLASS_NAMES)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are far too small to gain from a second thread, and on a busy machine a second
    thread makes every op wait for a free core; restore the process's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_data():
    return make_shapes(96, seed=0), make_shapes(16, seed=0, split="val")


def new_run(path, seed: int = 0) -> RunDir:
    spec = DataSpec(num_train=96, num_val=16, seed=seed)
    return prepare_run(path, _small_config(), spec.to_dict(), overwrite=False)


def _vq(steps: int, seed: int = 0, **kw) -> VQTrainSettings:
    return VQTrainSettings(steps=steps, batch_size=8, warmup=2, seed=seed, checkpoint_every=1, sample_every=0, **kw)


def _dit(steps: int, seed: int = 0) -> DiTTrainSettings:
    return DiTTrainSettings(steps=steps, batch_size=16, warmup=2, seed=seed, checkpoint_every=1, sample_every=0)


def _losses() -> tuple[list[float], callable]:
    seen: list[float] = []
    return seen, lambda step, metrics: seen.append(metrics["loss"])


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_both_stages_learn_and_write_their_outputs(tmp_path, small_data) -> None:
    train, val = small_data
    run = new_run(tmp_path / "run")
    vq_losses, record = _losses()
    result = train_vqvae(run, train, val, _vq(40), callback=record, show_progress=False)
    assert np.mean(vq_losses[-5:]) < 0.7 * np.mean(vq_losses[:5])
    assert run.has_part("vqvae") and (run.samples_dir / "vqvae_reconstructions.png").is_file()
    assert result["psnr_db"] > 10 and 0 < result["codebook_usage"] <= 1
    dit_losses, record = _losses()
    train_dit(run, train, _dit(40), callback=record, show_progress=False)
    assert np.mean(dit_losses[-5:]) < 0.8 * np.mean(dit_losses[:5])
    config, _, dit = load_models(run)
    assert config.class_names == CLASS_NAMES
    # The saved DiT is the EMA copy, not the raw weights of the last step.
    raw = load_checkpoint(run.checkpoints_dir / "dit.pt")["model"]
    assert not _same_state(raw, dit.state_dict())
    assert (run.checkpoints_dir / "dit_latents.pt").is_file()
    assert run.read_meta()["training"]["vqvae"]["steps"] == 40


def test_vq_resume_after_ctrl_c_is_exact_and_seed_determines(tmp_path, small_data) -> None:
    train, val = small_data
    straight = new_run(tmp_path / "straight")
    train_vqvae(straight, train, val, _vq(6), show_progress=False)

    def ctrl_c_at_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    resumed = new_run(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted, match="step 3"):
        train_vqvae(resumed, train, val, _vq(6), callback=ctrl_c_at_3, show_progress=False)
    assert load_checkpoint(resumed.checkpoints_dir / "vqvae.pt")["step"] == 3  # intact after Ctrl-C
    train_vqvae(resumed, train, val, _vq(6), resume=True, show_progress=False)
    a = load_checkpoint(straight.checkpoints_dir / "vqvae.pt")["model"]
    b = load_checkpoint(resumed.checkpoints_dir / "vqvae.pt")["model"]
    assert _same_state(a, b)
    assert _same_state(load_vqvae(straight).state_dict(), load_vqvae(resumed).state_dict())

    other = new_run(tmp_path / "other", seed=0)
    train_vqvae(other, train, val, _vq(6, seed=1), show_progress=False)
    assert not _same_state(a, load_checkpoint(other.checkpoints_dir / "vqvae.pt")["model"])
    with pytest.raises(RunDirError, match="other settings"):
        train_vqvae(resumed, train, val, _vq(6, lr=1e-4), resume=True, show_progress=False)


def test_dit_resume_is_exact(tmp_path, small_data) -> None:
    train, val = small_data
    runs = []
    for name in ("straight", "resumed"):
        run = new_run(tmp_path / name)
        train_vqvae(run, train, val, _vq(2), show_progress=False)
        runs.append(run)
    straight, resumed = runs
    train_dit(straight, train, _dit(6), show_progress=False)

    def ctrl_c_at_4(step: int, metrics: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train_dit(resumed, train, _dit(6), callback=ctrl_c_at_4, show_progress=False)
    train_dit(resumed, train, _dit(6), resume=True, show_progress=False)
    a = load_checkpoint(straight.checkpoints_dir / "dit.pt")
    b = load_checkpoint(resumed.checkpoints_dir / "dit.pt")
    assert _same_state(a["model"], b["model"]) and _same_state(a["ema"], b["ema"])
    assert _same_state(load_dit(straight).state_dict(), load_dit(resumed).state_dict())


def test_latent_standardization_keeps_the_model_function(small_data) -> None:
    train, _ = small_data
    torch.manual_seed(0)
    vq = VQModel(_small_config().first_stage).eval()
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(vq.encode(images[:8]).permute(0, 2, 3, 1).reshape(-1, 4)[:32])
        z_q, idx = vq.quantize.quantize(vq.encode(images))
        before = vq.decode(z_q)
        standardize_latents_(vq, images)
        h = vq.encode(images)
        z_q2, idx2 = vq.quantize.quantize(h)
        after = vq.decode(z_q2)
    assert abs(float(h.std()) - 1.0) < 1e-3 and float(h.mean(dim=(0, 2, 3)).abs().max()) < 1e-4
    assert torch.equal(idx, idx2)
    assert torch.allclose(before, after, atol=1e-4)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


@pytest.mark.slow
def test_cli_train_all_refuses_other_models_and_evaluates(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--num-train", "64", "--vq-steps", "2", "--dit-steps", "2"]
    code, text = _cli(["train", "all", *common], capsys)
    assert code == 0, text
    assert RunDir(out).has_part("dit")
    code, text = _cli(["train", "all", *common, "--seed", "5"], capsys)
    assert code != 0 and "different model" in text and "--overwrite" in text and "Traceback" not in text
    assert RunDir(out).has_part("dit")  # refused without damage
    code, text = _cli(["eval", str(out), "--backend", "onnxrt", "--no-generate"], capsys)
    assert code == 2 and "unknown backend 'onnxrt'" in text and "Traceback" not in text
    assert not list((out / "reports").glob("eval*"))  # refused before any work
    code, text = _cli(["eval", str(out), "--no-generate", "--json", "-"], capsys)
    assert code == 0 and '"psnr_db"' in text and (out / "reports" / "eval-no-generate.json").is_file()
    code, text = _cli(["eval", str(out), "--samples-per-class", "1", "--steps", "2"], capsys)
    small = out / "reports" / "eval-torch-fp32-samples1-steps2.json"
    assert code == 0 and f"report: {small}" in text and (out / "samples" / "eval_grid.png").is_file()
    assert "colour_accuracy" in json.loads(small.read_text())["generation"]
    assert (out / "reports" / "eval-no-generate.json").is_file()  # the other settings' report is kept
    code, text = _cli(["train", "all", *common, "--seed", "5", "--overwrite"], capsys)
    assert code == 0, text


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, text = _cli(["train", "vqvae", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no images found" in text and "Traceback" not in text
    assert not (tmp_path / "r").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "keep.txt").write_text("mine")
    code, text = _cli(["train", "vqvae", "--out", str(tmp_path / "junk"), "--num-train", "8"], capsys)
    assert code != 0 and "not an mmgen run directory" in text
    assert (tmp_path / "junk" / "keep.txt").read_text() == "mine"
    code, text = _cli(["train", "dit", "--out", str(tmp_path / "nothing")], capsys)
    assert code != 0 and "does not exist" in text
    code, text = _cli(["train", "vqvae", "--out", str(tmp_path / "r2"), "--steps", "0"], capsys)
    assert code == 2 and "must be positive" in text


@pytest.mark.slow
def test_quickstart_runs_its_stages_in_order(tmp_path, capsys, monkeypatch) -> None:
    """The real quickstart loop, every stage as written, with a 2-step recipe, a small evaluation (on
    ONNX Runtime, as the quickstart evaluates) and 4 generation steps. The 2-step DiT's near-zero
    tensors are re-randomised after its stage, so the parity stage compares real outputs (it refuses a
    negligible one)."""
    from quickstart_helpers import (
        assert_evaluated_on_the_deployed_path,
        assert_parity_within_spec,
        fewer_generate_steps,
        small_real_evaluation,
        with_meaningful_dit,
    )

    from mmgen_deploy.cli import quickstart as qs_cli
    from mmgen_deploy.training import recipes

    monkeypatch.setitem(recipes._RECIPES, "tiny", recipes.TrainRecipe(vq_steps=2, dit_steps=2))
    real_new_run = qs_cli.new_run
    monkeypatch.setattr(qs_cli, "new_run", lambda out, preset, data, size, seed, num_train, *rest:
                        real_new_run(out, preset, data, size, seed, 128, *rest))
    replaced = {"train DiT": with_meaningful_dit(dict(qs_cli.QUICKSTART_STAGES)["train DiT"])}
    stages = [(name, replaced.get(name, fn)) for name, fn in qs_cli.QUICKSTART_STAGES]
    monkeypatch.setattr(qs_cli, "QUICKSTART_STAGES", stages)
    small_real_evaluation(monkeypatch)
    fewer_generate_steps(monkeypatch)
    out = tmp_path / "qs"
    code, text = _cli(["quickstart", "--out", str(out), "--threads", "1"], capsys)
    assert code == 0, text
    assert "1/6 train VQ-VAE" in text and "6/6 parity vs PyTorch" in text and str(out) in text
    summary = json.loads((out / "reports" / "quickstart.json").read_text())
    assert list(summary["stage_seconds"]) == ["train VQ-VAE", "train DiT", "export ONNX FP32 + FP16",
                                              "generate (ONNX Runtime CPU)", "evaluate", "parity vs PyTorch"]
    run = RunDir(out)
    for stage in ("vqvae", "dit"):  # the thread count the weights were trained on is recorded
        assert json.loads((run.reports_dir / f"train_{stage}.json").read_text())["threads"] == 1
    # The deployment half of the main job really ran on ONNX Runtime CPU.
    assert (out / "samples" / "onnxruntime-fp32" / "grid.png").is_file()
    generation = assert_evaluated_on_the_deployed_path(run, summary)
    assert generation["num_samples"] == 18 and set(generation["per_class"]) == set(CLASS_NAMES)
    for precision in ("fp32", "fp16"):
        report = json.loads((out / "reports" / f"parity-onnxruntime-{precision}.json").read_text())
        assert_parity_within_spec(report, run.load_config(), precision)
    code, text = _cli(["quickstart", "--out", str(out)], capsys)
    assert code != 0 and "--overwrite" in text


def test_quickstart_passes_its_threads_to_every_later_stage(exported_tiny_run, monkeypatch) -> None:
    """`quickstart --threads N`: export, generate, eval and parity run with N threads, as their own
    commands' --threads would (parity: the backend and the PyTorch reference); left out, each keeps its
    own default. What each stage hands its command's printing helper is recorded, not run."""
    from mmgen_deploy.cli import export, generate, parity
    from mmgen_deploy.cli import quickstart as qs_cli

    seen: dict[str, list] = {}
    monkeypatch.setattr(export, "run_export", lambda run, **kw: seen.setdefault("export", []).append(kw["threads"])
                        or {})
    monkeypatch.setattr(qs_cli, "emit_json", lambda *a: None)
    monkeypatch.setattr(generate, "run_generate", lambda run, request: seen.setdefault("generate", []).append(
        request.threads))
    monkeypatch.setattr(qs_cli, "run_eval", lambda run, settings: seen.setdefault("eval", []).append(
        settings.threads))

    class Verdict:
        passed = True

    monkeypatch.setattr(parity, "run_parity_report", lambda run, options: seen.setdefault("parity", []).append(
        (options.threads, options.torch_threads)) or Verdict())
    for threads, expected in ((3, {"export": 3, "generate": 3, "eval": 3, "parity": (3, 3)}),
                              (None, {"export": None, "generate": None, "eval": None, "parity": (None, 1)})):
        seen.clear()
        ctx = qs_cli.QuickstartContext(run=exported_tiny_run, train=None, val=None, seed=0, threads=threads)
        for stage in (qs_cli.export_stage, qs_cli.generate_stage, qs_cli._qs_eval_on_deployed_path,
                      qs_cli.parity_stage):
            stage(ctx)
        assert {name: values[0] for name, values in seen.items()} == expected
        assert len(set(seen["parity"])) == 1  # every backend and precision it checks


def test_default_thread_count_is_the_cpus_not_the_load(monkeypatch) -> None:
    """Training's default thread count is fixed for a machine: a busy or idle machine trains on the
    same count (it changes the weights), and `--threads` wins."""
    import os

    from mmgen_deploy.training.common import default_threads, set_threads

    cpus = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        for load in (0.0, 1.0, 50.0):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert default_threads() == cpus and set_threads() == cpus and torch.get_num_threads() == cpus
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_recipe_sets_dit_batch_and_lr_unless_overridden() -> None:
    """The tiny recipe's DiT batch size and learning rate (what reached the accuracy target) are the
    defaults of `mmgen train dit`; command-line values win; presets without them keep the settings' defaults."""
    from mmgen_deploy.cli.train import dit_train_settings
    from mmgen_deploy.training import recipe_for
    from mmgen_deploy.training.dit import DiTTrainSettings

    tiny = dit_train_settings(recipe_for("tiny"), None, None, None, 0)
    assert (tiny.batch_size, tiny.lr, tiny.steps) == (64, 6e-3, recipe_for("tiny").dit_steps)
    overridden = dit_train_settings(recipe_for("tiny"), 10, 32, 1e-4, 0)
    assert (overridden.batch_size, overridden.lr, overridden.steps) == (32, 1e-4, 10)
    other = dit_train_settings(recipe_for("S/2"), None, None, None, 0)
    assert (other.batch_size, other.lr) == (DiTTrainSettings().batch_size, DiTTrainSettings().lr)
    # Text runs of the tiny preset train their text encoder at a sixth of the DiT's rate.
    assert dit_train_settings(recipe_for("tiny", text=True), None, None, None, 0).text_lr_scale == pytest.approx(1 / 6)
    assert tiny.text_lr_scale == other.text_lr_scale == 1.0


@pytest.mark.parametrize("argv", [["train", "vqvae"], ["train", "dit"], ["train", "all"], ["quickstart"]],
                         ids=" ".join)
@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_out_of_range_is_refused_before_any_training(argv: list[str], seed: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "run"), "--seed", seed])
    text = capsys.readouterr().err
    assert info.value.code == 2 and f"--seed must be an integer in 0..9223372036854775807 (2^63 - 1), got {seed}" \
        in text and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()
