"""Text-to-image training, generation from prompts, per-attribute evaluation and `quickstart --text`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import DiTConfig, ModelConfig, VQConfig, with_text
from mmgen_deploy.data import DataSpec, load_split
from mmgen_deploy.data.shapes import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    all_combinations,
    heldout_prompt_specs,
    holdout_combinations,
    make_shapes,
    parse_caption,
)
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.evaluation.checker import judge
from mmgen_deploy.evaluation.evaluate import prompt_accuracy
from mmgen_deploy.models.load import load_dit, load_text_encoder
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.training import prepare_run
from mmgen_deploy.training.common import TrainingInterrupted, load_checkpoint, lr_at, save_checkpoint
from mmgen_deploy.training.dit import DiTTrainSettings, build_tokenizer, train_dit
from mmgen_deploy.training.vqvae import VQTrainSettings, train_vqvae


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


# -- data -------------------------------------------------------------------------------

def test_holdout_combinations_never_reach_training_but_every_attribute_does() -> None:
    held = holdout_combinations(0.2, seed=0)
    assert len(held) == 36 and held == holdout_combinations(0.2, seed=0)
    assert held != holdout_combinations(0.2, seed=1)
    assert holdout_combinations(0.0) == ()
    # Fraction 0 is today's data, image for image.
    plain, zero = make_shapes(64, seed=2), make_shapes(64, seed=2, holdout_fraction=0.0)
    assert np.array_equal(plain.images, zero.images) and plain.captions == zero.captions
    train = make_shapes(1500, seed=0, holdout_fraction=0.2)
    seen = {parse_caption(c) for c in train.captions}
    assert not seen & set(held)
    assert len(seen) == len(all_combinations()) - len(held)  # all the others are drawn
    for axis, values in (("colour", COLOUR_NAMES), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        assert {getattr(s, axis) for s in seen} == set(values)
    # Labels and images still agree with the (replaced) captions.
    for image, caption in zip(train.images[:40], train.captions[:40], strict=True):
        assert judge(image).matches_all(*_attrs(parse_caption(caption)))
    # The DataSpec carries the fraction; validation images are unaffected.
    spec = DataSpec(num_train=32, num_val=8, holdout_fraction=0.2)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert np.array_equal(load_split(spec, "val").images, make_shapes(8, seed=0, split="val").images)
    with pytest.raises(UsageError, match="holdout"):
        load_split(DataSpec(num_train=4, holdout_fraction=0.9), "train")


def _attrs(spec) -> tuple[str, str, str, str]:
    return spec.colour, spec.shape, spec.size, spec.position


def test_heldout_prompts_are_balanced_and_deterministic() -> None:
    held = set(holdout_combinations(0.2, seed=0))
    prompts = heldout_prompt_specs(200, fraction=0.2, seed=0)
    assert prompts == heldout_prompt_specs(200, fraction=0.2, seed=0) and len(prompts) == 200
    assert set(prompts) == held  # every held-out combination is asked for
    counts = np.unique([p.caption for p in prompts], return_counts=True)[1]
    assert counts.min() == 5 and counts.max() == 6  # 200 over 36: as even as possible
    # Without a holdout the prompts come from every combination.
    assert set(heldout_prompt_specs(180, fraction=0.0)) == set(all_combinations())


# -- checker ----------------------------------------------------------------------------

def test_checker_judges_size_and_position_on_real_images() -> None:
    data = make_shapes(600, seed=11, split="val")
    specs = [parse_caption(c) for c in data.captions]
    report = prompt_accuracy(data.images, specs)
    for name in ("colour", "shape", "size", "position"):
        assert report[f"{name}_accuracy"] >= 0.99, (name, report[f"{name}_accuracy"])
    assert report["accuracy"] >= 0.98 and report["num_samples"] == 600
    # Wrong answers are caught: an image flipped left-right is on the other side.
    left = next(i for i, s in enumerate(specs) if s.position == "left" and s.shape == "circle")
    assert judge(data.images[left][:, ::-1].copy()).position == "right"
    assert judge(data.images[left].transpose(1, 0, 2).copy()).position == "top"  # x <-> y
    small = next(i for i, s in enumerate(specs) if s.size == "small" and s.position == "center")
    assert judge(np.kron(data.images[small], np.ones((2, 2, 1), np.uint8))[16:48, 16:48]).size == "large"
    empty = judge(np.zeros((32, 32, 3), np.uint8))
    assert empty.size is None and empty.position is None


# -- training ---------------------------------------------------------------------------

def _small_text_config(vocab_size: int) -> ModelConfig:
    vq = VQConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, n_embed=32)
    dit = DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=18)
    return with_text(ModelConfig(first_stage=vq, dit=dit), vocab_size=vocab_size, hidden_size=32)


def _dit(steps: int, **kw) -> DiTTrainSettings:
    return DiTTrainSettings(steps=steps, batch_size=16, warmup=2, checkpoint_every=1, sample_every=0, **kw)


@pytest.fixture(scope="module")
def text_data():
    spec = DataSpec(num_train=96, num_val=16, holdout_fraction=0.2)
    return spec, load_split(spec, "train"), load_split(spec, "val")


def _text_run(path, text_data) -> RunDir:
    spec, train, val = text_data
    config = _small_text_config(build_tokenizer(train.captions, 16).vocab_size)
    run = prepare_run(path, config, spec.to_dict(), overwrite=False)
    train_vqvae(run, train, val, VQTrainSettings(steps=2, batch_size=8, warmup=1, checkpoint_every=1,
                                                 sample_every=0), show_progress=False)
    return run


@pytest.fixture(scope="module")
def trained_text(tmp_path_factory, text_data) -> tuple[RunDir, dict[str, dict[str, torch.Tensor]]]:
    """A text run trained 4 steps, and the states its DiT and text encoder started from (recorded as
    `train_dit` creates them, so the comparison does not depend on how it draws random numbers)."""
    from mmgen_deploy.training import dit as dit_training

    initial: dict[str, dict[str, torch.Tensor]] = {}

    def recorded(cls, key: str):
        def make(*args, **kwargs):
            module = cls(*args, **kwargs)
            initial[key] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return module
        return make

    run = _text_run(tmp_path_factory.mktemp("text") / "run", text_data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit_training, "DiT", recorded(dit_training.DiT, "dit"))
        patch.setattr(dit_training, "TextEncoder", recorded(dit_training.TextEncoder, "text_encoder"))
        train_dit(run, text_data[1], _dit(4), show_progress=False)
    assert set(initial) == {"dit", "text_encoder"}
    return run, initial


@pytest.fixture(scope="module")
def trained_text_run(trained_text) -> RunDir:
    return trained_text[0]


def test_text_training_saves_tokenizer_and_text_encoder_and_trains_both(trained_text, text_data) -> None:
    run, initial = trained_text
    config = run.load_config()
    tokenizer = run.load_tokenizer()
    assert tokenizer.vocab_size == config.text.vocab_size and tokenizer.max_length == config.text.max_length
    assert {"red", "triangle", "left", "large"} <= set(tokenizer.words)
    report = json.loads((run.reports_dir / "train_dit.json").read_text())
    assert report["vocab_size"] == tokenizer.vocab_size and len(report["grid_prompts"]) == 9
    assert (run.samples_dir / "dit_samples.png").is_file()
    state = load_checkpoint(run.checkpoints_dir / "dit.pt")

    def moved(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> list[str]:
        assert trained.keys() == start.keys()
        return [k for k, v in start.items() if v.dtype.is_floating_point and not torch.equal(trained[k], v)]

    # Both models' weights moved (one optimizer, two parameter groups): every weight matrix of the
    # text encoder, and the DiT's adaLN-Zero layers, which only training makes non-zero.
    text_moved = moved(state["text_encoder"], initial["text_encoder"])
    assert {k for k in initial["text_encoder"] if k.endswith("weight")} <= set(text_moved)
    dit_moved = moved(state["model"], initial["dit"])
    assert {"final_layer.linear.weight", "blocks.0.adaLN_modulation.1.weight"} <= set(dit_moved)
    # What was saved for inference is the EMA copy of each (moved too, not the raw last step).
    loaded_dit, loaded_text = load_dit(run).state_dict(), load_text_encoder(run).state_dict()
    assert "final_layer.linear.weight" in moved(loaded_dit, initial["dit"])
    assert moved(loaded_text, initial["text_encoder"])
    for key, value in state["text_ema"].items():
        assert torch.equal(loaded_text[key], value)
    for key, value in state["ema"].items():
        assert torch.equal(loaded_dit[key], value)


def test_text_training_resume_is_exact(tmp_path, text_data) -> None:
    train = text_data[1]
    full = _text_run(tmp_path / "full", text_data)
    train_dit(full, train, _dit(4), show_progress=False)
    cut = _text_run(tmp_path / "cut", text_data)

    def stop(step: int, _metrics) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train_dit(cut, train, _dit(4), callback=stop, show_progress=False)
    train_dit(cut, train, _dit(4), resume=True, show_progress=False)
    for part in ("dit", "text_encoder"):
        a, b = full.load_state(part), cut.load_state(part)
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
    assert full.load_tokenizer().words == cut.load_tokenizer().words


def test_text_encoder_trains_at_its_own_fraction_of_the_rate(tmp_path, text_data) -> None:
    run = _text_run(tmp_path / "r", text_data)
    settings = _dit(3, text_lr_scale=0.25)
    train_dit(run, text_data[1], settings, show_progress=False)
    dit_group, text_group = load_checkpoint(run.checkpoints_dir / "dit.pt")["optimizer"]["param_groups"]
    expected = lr_at(2, base_lr=settings.lr, warmup=settings.warmup, total=settings.steps)  # the last step's rate
    assert dit_group["lr"] == pytest.approx(expected)
    assert text_group["lr"] == pytest.approx(0.25 * expected)
    assert len(text_group["params"]) == len(list(load_text_encoder(run).parameters()))


def test_resume_refuses_an_optimizer_state_with_one_group_in_one_line(tmp_path, text_data) -> None:
    # Text checkpoints written before the text encoder had its own rate hold one parameter group.
    run = _text_run(tmp_path / "r", text_data)
    train_dit(run, text_data[1], _dit(2), show_progress=False)
    checkpoint = run.checkpoints_dir / "dit.pt"
    state = load_checkpoint(checkpoint)
    dit_group, text_group = state["optimizer"]["param_groups"]
    dit_group["params"] = dit_group["params"] + text_group["params"]
    state["optimizer"]["param_groups"] = [dit_group]
    save_checkpoint(checkpoint, state)
    with pytest.raises(RunDirError, match="older mmgen-deploy"):
        train_dit(run, text_data[1], _dit(4), resume=True, show_progress=False)


def test_text_training_refuses_a_vocabulary_that_does_not_match(tmp_path, text_data) -> None:
    spec, train, val = text_data
    run = prepare_run(tmp_path / "r", _small_text_config(7), spec.to_dict(), overwrite=False)
    train_vqvae(run, train, val, VQTrainSettings(steps=1, batch_size=8, checkpoint_every=1, sample_every=0),
                show_progress=False)
    with pytest.raises(RunDirError, match="vocabulary"):
        train_dit(run, train, _dit(1), show_progress=False)
    with pytest.raises(UsageError, match="needs captions"):
        build_tokenizer(["", " "], 16)


# -- generate and eval through the CLI --------------------------------------------------

def test_generate_from_prompts_writes_prompt_metadata(trained_text_run, tmp_path, capsys) -> None:
    root = str(trained_text_run.root)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a small red circle on the left\n\n  \na large cyan square at the top of a purple box\n")
    out = tmp_path / "gen"
    code, _, stderr = _cli(["generate", root, "--prompt", "a large blue triangle at the top",
                                 "--prompts-file", str(prompts_file), "--n", "2", "--steps", "2",
                                 "--backend", "torch", "--out", str(out), "--json", str(tmp_path / "g.json")],
                                capsys)
    assert code == 0, stderr
    assert "unknown word(s)" in stderr and "purple, box" in stderr
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 6
    with Image.open(pngs[2]) as image:
        chunks = dict(image.text)
    assert chunks["prompt"] == "a small red circle on the left" and chunks["steps"] == "2"
    assert chunks["seed"] == "0" and chunks["sampler"] == "ddim"
    sidecar = json.loads((tmp_path / "g.json").read_text())
    assert sidecar["prompts"] == ["a large blue triangle at the top", "a small red circle on the left",
                                  "a large cyan square at the top of a purple box"]
    assert [e["prompt"] for e in sidecar["images"]][::2] == sidecar["prompts"]
    code, _, stderr = _cli(["generate", root, "-p", " ".join(["red"] * 30), "--n", "1", "--steps", "1",
                            "--backend", "torch", "--out", str(tmp_path / "long")], capsys)
    assert code == 0 and "cut to their first 14 words" in stderr


def test_wrong_kind_of_condition_is_a_one_line_error(trained_text_run, random_models, tmp_path, capsys) -> None:
    from mmgen_deploy.rundir import save_run

    class_run = save_run(tmp_path / "class", *random_models)
    code, _, stderr = _cli(["generate", str(trained_text_run.root), "--class", "red circle"], capsys)
    assert code == 2 and "takes prompts" in stderr and "Traceback" not in stderr
    code, _, stderr = _cli(["generate", str(trained_text_run.root)], capsys)
    assert code == 2 and "needs prompts" in stderr
    code, _, stderr = _cli(["generate", str(class_run.root), "--prompt", "a red circle"], capsys)
    assert code == 2 and "class-conditioned" in stderr and "Traceback" not in stderr
    code, _, stderr = _cli(["generate", str(trained_text_run.root), "--prompts-file", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = _cli(["train", "vqvae", "--out", str(tmp_path / "r"), "--holdout-fraction", "0.2"], capsys)
    assert code == 2 and "--text" in stderr
    code, _, stderr = _cli(["train", "vqvae", "--out", str(tmp_path / "r"), "--text", "--text-conditioning",
                            "telepathy"], capsys)
    assert code == 2 and "pooled+cross_attention" in stderr and not (tmp_path / "r").exists()


def test_eval_on_a_text_run_reports_each_attribute(trained_text_run, capsys) -> None:
    code, stdout, stderr = _cli(["eval", str(trained_text_run.root), "--num-prompts", "6", "--steps", "2",
                                 "--json", "-"], capsys)
    assert code == 0, stderr
    generation = json.loads(stdout)["generation"]
    assert (generation["backend"], generation["precision"], generation["device"]) == ("torch", "fp32", "cpu")
    # --backend auto is reported as what it chose, not as "auto".
    code, stdout, stderr = _cli(["eval", str(trained_text_run.root), "--num-prompts", "2", "--steps", "1",
                                 "--backend", "auto", "--json", "-"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["generation"]["backend"] in ("torch", "onnxruntime", "openvino", "tensorrt")
    # The reported accuracies are those of the images these prompts give, judged one by one: sample
    # the same six held-out prompts here (same seed, steps, guidance) and judge them independently.
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import sample, text_conditioning

    run = trained_text_run
    config = run.load_config()
    specs = heldout_prompt_specs(6, fraction=0.2, seed=0)
    runner = TorchRunner.from_run_dir(run.root)
    cond = text_conditioning(runner, config, run.load_tokenizer(), [s.caption for s in specs])
    images = sample(runner, config, cond, steps=2, cfg_scale=4.0, seed=0, batch_size=90).images
    verdicts = [judge(image) for image in images]
    for name in ("colour", "shape", "size", "position"):
        right = [getattr(v, name) == getattr(s, name) for v, s in zip(verdicts, specs, strict=True)]
        assert generation[f"{name}_accuracy"] == pytest.approx(np.mean(right)), name
    everything = [v.matches_all(*_attrs(s)) for v, s in zip(verdicts, specs, strict=True)]
    assert generation["accuracy"] == pytest.approx(np.mean(everything))

    assert generation["num_samples"] == 6 and generation["prompts_from"] == "held-out combinations"
    assert generation["num_heldout_combinations"] == 36
    held = {s.caption for s in holdout_combinations(0.2)}
    assert set(generation["per_prompt"]) <= held
    assert "position" in stderr and "held-out" in stderr


# -- quickstart --text ------------------------------------------------------------------

@pytest.mark.slow
def test_text_quickstart_runs_its_stages_in_order(tmp_path, capsys, monkeypatch) -> None:
    """The real `quickstart --text` loop, all six stages as written, with a 2-step recipe: export (five
    components, FP32 + FP16), generation from the grid prompts on ONNX Runtime (`generate_prompts_stage`,
    4 steps instead of 50), the evaluation on held-out prompts on ONNX Runtime (6 prompts, 2 steps) and
    parity. The 2-step DiT's near-zero tensors are re-randomised after its stage, so parity compares
    real outputs."""
    from quickstart_helpers import (
        assert_evaluated_on_the_deployed_path,
        assert_parity_within_spec,
        fewer_generate_steps,
        small_real_evaluation,
        with_meaningful_dit,
    )

    from mmgen_deploy.cli import quickstart as qs_cli
    from mmgen_deploy.training import recipes
    from mmgen_deploy.training.dit import grid_prompts

    names = ["train VQ-VAE", "train DiT + text encoder", "export ONNX FP32 + FP16",
             "generate from prompts (ONNX Runtime CPU)", "evaluate (held-out prompts)", "parity vs PyTorch"]
    assert [name for name, _ in qs_cli.QUICKSTART_TEXT_STAGES] == names
    monkeypatch.setitem(recipes._RECIPES, "tiny+text", recipes.TrainRecipe(vq_steps=2, dit_steps=2))

    real_new_run = qs_cli.new_run
    monkeypatch.setattr(qs_cli, "new_run", lambda out, preset, data, size, seed, num_train, *rest:
                        real_new_run(out, preset, data, size, seed, 128, *rest))
    stages = dict(qs_cli.QUICKSTART_TEXT_STAGES)
    stages["train DiT + text encoder"] = with_meaningful_dit(stages["train DiT + text encoder"])
    monkeypatch.setattr(qs_cli, "QUICKSTART_TEXT_STAGES", list(stages.items()))
    small_real_evaluation(monkeypatch)
    fewer_generate_steps(monkeypatch)
    out = tmp_path / "qs"
    code, _, stderr = _cli(["quickstart", "--text", "--out", str(out), "--threads", "1"], capsys)
    assert code == 0, stderr
    assert "1/6 train VQ-VAE" in stderr and "6/6 parity vs PyTorch" in stderr
    summary = json.loads((out / "reports" / "quickstart.json").read_text())
    assert list(summary["stage_seconds"]) == names
    run = RunDir(out)
    config = run.load_config()
    assert config.uses_text and config.dit.conditioning == "pooled"
    assert run.read_meta()["data"]["holdout_fraction"] == 0.2
    assert run.load_tokenizer().vocab_size == config.text.vocab_size
    generation = assert_evaluated_on_the_deployed_path(run, summary)
    assert generation["prompts_from"] == "held-out combinations" and generation["num_samples"] == 6
    for attribute in ("size_accuracy", "position_accuracy"):
        assert 0.0 <= generation[attribute] <= 1.0
    # Export: the five components at both precisions.
    manifest = json.loads((out / "reports" / "export.json").read_text())
    assert "text_encoder" in json.dumps(manifest)
    for precision in ("fp32", "fp16"):
        assert {p.name for p in (run.onnx_dir / precision).glob("*.onnx")} == {
            "encoder.onnx", "quantizer.onnx", "decoder.onnx", "denoiser.onnx", "text_encoder.onnx"}
    # Generation from prompts on ONNX Runtime: two images per grid prompt, each tagged with its prompt.
    generated = out / "samples" / "onnxruntime-fp32"
    prompts = grid_prompts(load_split(DataSpec.from_dict(run.read_meta()["data"]), "train").captions)
    pngs = sorted(p for p in generated.glob("*.png") if p.name != "grid.png")
    assert (generated / "grid.png").is_file() and len(pngs) == 2 * len(prompts) == 18
    with Image.open(pngs[-1]) as image:
        assert image.text["prompt"] == prompts[-1]
    # Parity at both precisions, on a denoiser whose output is not negligible, with the text encoder.
    for precision in ("fp32", "fp16"):
        report = json.loads((out / "reports" / f"parity-onnxruntime-{precision}.json").read_text())
        assert_parity_within_spec(report, config, precision)
        assert "text_encoder" in {c["group"] for c in report["checks"]}
        assert len(report["info"]["end_to_end"]["prompts"]) == 8


def test_text_model_on_a_captioned_user_folder(tmp_path, capsys) -> None:
    """metadata.jsonl `text` is the caption: the vocabulary comes from it; no captions, no text model."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for k, (colour, word) in enumerate([((255, 0, 0), "red"), ((0, 255, 0), "green"), ((0, 0, 255), "blue")] * 2):
        Image.new("RGB", (40, 40), colour).save(folder / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": f"a {word} Tile!"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code, _, stderr = _cli(["train", "vqvae", "--text", "--data", str(folder), "--out", str(out), "--steps", "1",
                            "--batch-size", "2"], capsys)
    assert code == 0, stderr
    config = RunDir(out).load_config()
    assert config.text.vocab_size == 4 + 5  # a, tile, red, green, blue
    code, _, stderr = _cli(["train", "vqvae", "--text", "--data", str(folder), "--out", str(tmp_path / "r2"),
                            "--holdout-fraction", "0.2"], capsys)
    assert code == 2 and "`shapes` only" in stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(bare / "a.png")
    code, _, stderr = _cli(["train", "vqvae", "--text", "--data", str(bare), "--out", str(tmp_path / "r3")], capsys)
    assert code == 2 and "needs captions" in stderr and not (tmp_path / "r3").exists()
