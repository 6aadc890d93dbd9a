"""`mmgen distill`: the guidance-embedded student, its run directory, its sampler on every CPU backend,
resume and the refusals. A re-randomised tiny teacher stands in for a trained one (a fresh DiT
outputs zeros); the quality of a real student is measured by benchmarks/distill_front.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen_deploy.cli.app import main
from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.config import preset
from mmgen_deploy.errors import MMGenError
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.models.load import load_dit
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.training.distill import DistillSettings, distill_into, student_timesteps


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


SMALL = DistillSettings(steps=2, trajectories=24, train_steps=12, batch_size=16, checkpoint_every=6, warmup=2)


def _teacher(root: Path, *, trained: bool = True) -> RunDir:
    config = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    if trained:
        rerandomize_(dit, seed=2)
    return save_run(root, config, vq.eval(), dit.eval(), data={"name": "shapes", "seed": 0})


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, RunDir, dict]:
    root = tmp_path_factory.mktemp("distill")
    teacher = _teacher(root / "teacher")
    torch.set_num_threads(1)
    result = distill_into(root / "student", teacher, SMALL, show_progress=False)
    return teacher, RunDir(root / "student"), result


def test_student_starts_as_the_teachers_conditional_model() -> None:
    config = preset("tiny")
    torch.manual_seed(0)
    teacher = rerandomize_(DiT(config.dit), seed=2).eval()
    student = DiT(config.dit.replace(guidance_embed=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("g_embedder.") for k in missing)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 5, 17])
    with torch.no_grad():
        reference = teacher(x, t, y)
        for w in (1.0, 4.0):
            assert torch.equal(student(x, t, y, guidance=torch.full((3,), w)), reference)


def test_student_run_records_its_lineage_and_schedule(student: tuple[RunDir, RunDir, dict]) -> None:
    teacher, run, result = student
    config = run.load_config()
    assert config.dit.guidance_embed and config.student is not None
    assert config.student.steps == 2 and config.student.timesteps == student_timesteps(1000, 2) == (999, 500)
    meta = run.read_meta()
    assert meta["distilled_from"]["teacher_sha256"] == teacher.weights_sha256()
    assert meta["distilled_from"]["method"] == "trajectory"
    assert result["final_loss"] is not None and np.isfinite(result["final_loss"])
    # The guidance input has been trained: two scales now give different predictions.
    dit = load_dit(run, config).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        low, high = (dit(x, t, y, guidance=torch.full((2,), w)) for w in (1.0, 6.0))
    assert not torch.equal(low, high)
    # The teacher's own config file is untouched by the student's new fields.
    assert "guidance_embed" not in json.loads(teacher.config_path("dit").read_text())


def test_student_samples_alike_on_torch_and_onnxruntime(student: tuple[RunDir, RunDir, dict]) -> None:
    from mmgen_deploy.export import export_run
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample

    _, run, _ = student
    export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder"))
    config = run.load_config()
    results = {}
    for backend in ("torch", "onnxruntime"):
        runner, _ = open_runner(run, backend, "fp32")
        try:
            results[backend] = sample(runner, config, [0, 7, 17], steps=2, cfg_scale=4.0, seed=3)
        finally:
            runner.close()
    torch_result, ort_result = results["torch"], results["onnxruntime"]
    assert torch_result.timesteps == [999, 500]
    np.testing.assert_allclose(ort_result.latents, torch_result.latents, rtol=0, atol=1e-4)
    assert np.abs(ort_result.images.astype(int) - torch_result.images.astype(int)).max() <= 1


def test_generate_uses_the_students_settings_and_refuses_others(student: tuple[RunDir, RunDir, dict],
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, run, _ = student
    out = tmp_path / "samples"
    code, output = _cli(["generate", str(run.root), "-c", "3", "--n", "1", "--backend", "torch",
                         "--out", str(out)], capsys)
    assert code == 0, output
    sidecar = json.loads((out / "samples.json").read_text())
    assert json.dumps(sidecar).count('"steps": 2') >= 1
    for args, words in ((["--steps", "50"], "distilled for 2 steps"),
                        (["--cfg-scale", "9"], "guidance scales 1..6"),
                        (["--sampler", "ddpm"], "samples with ddim")):
        code, output = _cli(["generate", str(run.root), "-c", "3", "--n", "1", "--backend", "torch",
                             "--out", str(tmp_path / "refused"), *args], capsys)
        assert code != 0 and words in output, output
        assert "Traceback" not in output
        assert not (tmp_path / "refused").exists()


def test_distill_resumes_and_refuses_a_changed_teacher(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "teacher")
    torch.set_num_threads(1)
    first = DistillSettings(**{**SMALL.to_dict(), "train_steps": 6})
    distill_into(tmp_path / "student", teacher, first, show_progress=False)
    resumed = distill_into(tmp_path / "student", teacher, SMALL, resume=True, show_progress=False)
    assert resumed["resumed_from"] == 6
    # A teacher whose weights changed since: the student's checkpoint no longer belongs to it.
    dit = load_dit(teacher).eval()
    with torch.no_grad():
        dit.final_layer.linear.weight.mul_(1.5)
    teacher.save_weights("dit", dit)
    with pytest.raises(MMGenError, match="changed since"):
        distill_into(tmp_path / "student", teacher, SMALL, resume=True, show_progress=False)


def test_an_interrupted_distillation_resumes_to_the_same_student(student: tuple[RunDir, RunDir, dict],
                                                                 tmp_path: Path) -> None:
    """Interrupted after the checkpoint that precedes the second round, then resumed: the same student, bit
    for bit, as the module's uninterrupted one. The checkpoint holds the training state; each round's pairs
    are one file beside it, checked by sha256 on resume."""
    import shutil

    from safetensors.torch import load_file

    _, uninterrupted, _ = student
    teacher = _teacher(tmp_path / "teacher")
    torch.set_num_threads(1)

    def stop(step: int, _metrics: dict[str, float]) -> None:
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(MMGenError, match="interrupted"):
        distill_into(tmp_path / "student", teacher, SMALL, callback=stop, show_progress=False)
    run = RunDir(tmp_path / "student")
    state = torch.load(run.checkpoint_path("distill"), map_location="cpu", weights_only=True)
    assert state["step"] == 6 and "inputs" not in state and "targets" not in state and state["pairs_round"] == 0
    assert run.distill_pairs_files() == [run.distill_pairs_path(0)]
    # The same state with the pairs inside the checkpoint, as distill once wrote it, resumes too.
    legacy = RunDir(tmp_path / "legacy")
    shutil.copytree(run.root, legacy.root)
    pairs = load_file(str(legacy.distill_pairs_path(0)))
    legacy.distill_pairs_path(0).unlink()
    torch.save({**{k: v for k, v in state.items() if not k.startswith("pairs_")},
                "inputs": pairs["inputs"], "targets": pairs["targets"], "guidance": pairs["guidance"],
                "noise": pairs["noise"], "conditions": {"y": pairs["conditions.y"]}, "null": {"y": pairs["null.y"]}},
               legacy.checkpoint_path("distill"))

    expected = uninterrupted.load_state("dit")
    for resumed_run in (run, legacy):
        resumed = distill_into(resumed_run.root, teacher, SMALL, resume=True, show_progress=False)
        assert resumed["resumed_from"] == 6
        weights = resumed_run.load_state("dit")
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
        assert resumed_run.distill_pairs_files() == [resumed_run.distill_pairs_path(1)]  # the second round's

    # Pairs that are not the ones the checkpoint trained on, or none: one line, and nothing written.
    longer = DistillSettings(**{**SMALL.to_dict(), "train_steps": 18})
    pairs_file = run.distill_pairs_path(1)
    data = bytearray(pairs_file.read_bytes())
    data[-1] ^= 1
    pairs_file.write_bytes(bytes(data))
    checkpoint = run.checkpoint_path("distill").read_bytes()
    with pytest.raises(MMGenError, match="sha256 differs") as info:
        distill_into(run.root, teacher, longer, resume=True, show_progress=False)
    assert "\n" not in info.value.message and "without --resume" in describe_error(info.value)
    pairs_file.unlink()
    with pytest.raises(MMGenError, match="which are missing"):
        distill_into(run.root, teacher, longer, resume=True, show_progress=False)
    assert run.checkpoint_path("distill").read_bytes() == checkpoint


def test_distill_refuses_bad_input_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    untrained = _teacher(tmp_path / "fresh", trained=False)
    for args, words in (([str(untrained.root)], "untrained"),
                        ([str(untrained.root), "--steps", "3"], "not a supported student step count"),
                        ([str(untrained.root), "--guidance-range", "5:6"], "must hold the default")):
        out = tmp_path / "student"
        code, output = _cli(["distill", *args, "--out", str(out)], capsys)
        assert code != 0 and words in output, output
        assert "Traceback" not in output
        assert not out.exists()


def test_parity_checks_a_student_with_its_own_steps(student: tuple[RunDir, RunDir, dict]) -> None:
    from mmgen_deploy.export import export_run
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    _, run, _ = student
    if not run.onnx_manifest_path.is_file():
        export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder"))
    report = run_parity(run, ParityOptions(batches=(1,), num_images=2, allow_untrained=True,
                                           components=("denoiser", "quantizer", "decoder")))
    assert report.passed
    assert report.info["end_to_end"]["steps"] == 2


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_student_exports_8_bit_calibrated_on_its_own_steps_and_passes_parity(
        student: tuple[RunDir, RunDir, dict], precision: str) -> None:
    from mmgen_deploy.export import export_run
    from mmgen_deploy.export.quantize import QuantSettings
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    _, run, _ = student
    sampling = ("denoiser", "quantizer", "decoder")
    # The decoder ships FP16: a re-randomised VQ decoder quantizes badly (see test_quantize.py).
    settings = QuantSettings(calibration_size=32, timesteps=4, images=18, batch=16,
                             component_precisions={"decoder": "fp16"})
    manifest = export_run(run, precisions=(precision,), components=sampling, quantization=settings)
    calibration = manifest["calibration"]["quantization"]["denoiser"]
    # The student's sampler visits only its own timesteps, conditionally, at scales in its range.
    assert calibration["timesteps"] == [999, 500]
    assert calibration["halves"] == {"conditional": 32, "null": 0}
    assert calibration["guidance_scales"] == [1.0, 6.0] and "null_label" not in calibration
    denoiser = manifest["files"][precision]["denoiser"]
    assert denoiser["component_precision"] == precision and denoiser["quantization"]["quantized_nodes"] > 0
    assert denoiser["validation"]["passed"]
    report = run_parity(run, ParityOptions(backend="onnxruntime", precision=precision, batches=(2,),
                                           num_images=2, allow_untrained=True, components=sampling))
    assert report.passed, [c for c in report.checks if not c.passed]
    assert report.info["end_to_end"]["steps"] == 2


def test_export_checks_the_calibration_size_against_the_students_own_steps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 4-step student calibrates at its 4 steps, once each: --calibration-size 3 is refused in one line naming
    those numbers, before anything is loaded or written; 4 exports (a teacher would need 16 for the default 8
    calibration timesteps)."""
    from mmgen_deploy.config import StudentConfig

    teacher = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    config = teacher.replace(dit=teacher.dit.replace(guidance_embed=True),
                             student=StudentConfig(steps=4, timesteps=student_timesteps(1000, 4)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path / "student4", config, vq.eval(), dit.eval(), data={"name": "shapes", "seed": 0})
    code, output = _cli(["export", str(run.root), "--precision", "int8", "--calibration-size", "3"], capsys)
    assert code == 2 and "Traceback" not in output, output
    assert " ".join(output.split()) == ("error: --calibration-size 3 is too small for the 4 timesteps this distilled "
                                        "student calibrates at (give at least 4, one sample per timestep)")
    assert not run.onnx_dir.exists()
    code, output = _cli(["export", str(run.root), "--precision", "int8", "--calibration-size", "4", "--components",
                         "denoiser", "--threads", "1"], capsys)
    assert code == 0, output
    assert ("8-bit calibration: 4 denoiser samples (conditional only: a distilled student) at timesteps "
            f"{list(config.student.timesteps)}") in " ".join(output.split())


def test_bench_uses_the_students_settings_and_refuses_others(student: tuple[RunDir, RunDir, dict], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, run, _ = student
    code, output = _cli(["bench", str(run.root), "--backend", "torch", "--precision", "fp32", "--batch-sizes", "1",
                         "--runs", "1", "--warmup", "0", "--components", "denoiser", "--threads", "1",
                         "--json", str(tmp_path / "bench.json")], capsys)
    assert code == 0, output
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["steps"] == 2 and result["cfg_scale"] == 4.0
    assert result["backends"][0]["error"] is None and result["backends"][0]["images_per_s"]["1"] > 0
    for args, words in ((["--steps", "10"], "distilled for 2 steps, not --steps 10"),
                        (["--cfg-scale", "9"], "guidance scales 1..6, not --cfg-scale 9")):
        code, output = _cli(["bench", str(run.root), "--backend", "torch", "--precision", "fp32", *args], capsys)
        assert code != 0 and words in output, output
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_batch_uses_the_students_settings_and_refuses_others(student: tuple[RunDir, RunDir, dict], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, run, _ = student
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"class": 3, "n": 2, "seed": 1}\n')
    out = tmp_path / "out"
    code, output = _cli(["batch", str(run.root), str(requests), "--out", str(out), "--backend", "torch",
                         "--threads", "1"], capsys)
    assert code == 0, output
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and {(e["steps"], e["sampler"], e["cfg_scale"]) for e in entries} == {(2, "ddim", 4.0)}
    # The command's settings are refused as options, a request line's as that line's keys.
    refused = tmp_path / "refused"
    code, output = _cli(["batch", str(run.root), str(requests), "--out", str(refused), "--steps", "50"], capsys)
    assert code != 0 and "distilled for 2 steps, not --steps 50" in output, output
    requests.write_text('{"class": 3, "n": 1, "sampler": "ddpm"}\n')
    code, output = _cli(["batch", str(run.root), str(requests), "--out", str(refused)], capsys)
    assert code != 0 and "line 1" in output and 'samples with ddim, not "sampler" ddpm' in output, output
    assert "Traceback" not in output and not refused.exists()


def test_a_text_run_distills_into_a_text_student(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text encoder and tokenizer are shared; guidance is distilled against the empty prompt."""
    from text_helpers import PROMPT, make_text_run

    from mmgen_deploy.models.load import load_text_encoder

    teacher = make_text_run(tmp_path / "teacher")
    torch.set_num_threads(1)
    distill_into(tmp_path / "student", teacher, SMALL, show_progress=False)
    run = RunDir(tmp_path / "student")
    config = run.load_config()
    assert config.uses_text and config.dit.guidance_embed and config.student is not None
    assert run.load_tokenizer().words == teacher.load_tokenizer().words
    shared, own = load_text_encoder(teacher).state_dict(), load_text_encoder(run).state_dict()
    assert all(torch.equal(shared[k], own[k]) for k in shared)
    out = tmp_path / "samples"
    code, output = _cli(["generate", str(run.root), "--prompt", PROMPT, "--n", "1", "--backend", "torch",
                         "--out", str(out)], capsys)
    assert code == 0, output
    assert json.dumps(json.loads((out / "samples.json").read_text())).count('"steps": 2') >= 1
    # It exports (the 8-bit calibration pairs each caption's encoding with a guidance scale) and passes parity.
    from mmgen_deploy.export import export_run
    from mmgen_deploy.export.quantize import QuantSettings
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    sampling = ("denoiser", "quantizer", "decoder", "text_encoder")
    manifest = export_run(run, precisions=("fp32", "int8"), components=sampling,
                          quantization=QuantSettings(calibration_size=32, timesteps=4, images=18, batch=16,
                                                     component_precisions={"decoder": "fp16"}))
    assert manifest["calibration"]["quantization"]["denoiser"]["halves"] == {"conditional": 32, "null": 0}
    assert manifest["files"]["int8"]["denoiser"]["validation"]["passed"]
    report = run_parity(run, ParityOptions(backend="onnxruntime", precision="fp32", batches=(2,), num_images=2,
                                           allow_untrained=True, components=sampling))
    assert report.passed, [c for c in report.checks if not c.passed]


def test_an_audio_run_distills_into_an_audio_student(audio_run: RunDir, tmp_path: Path) -> None:
    """The student keeps the teacher's spectrogram transform, so it has a vocoder and samples waveforms."""
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import sample
    from mmgen_deploy.specs import component_names

    torch.set_num_threads(1)
    distill_into(tmp_path / "student", audio_run, SMALL, show_progress=False)
    run = RunDir(tmp_path / "student")
    config = run.load_config()
    assert config.modality == "audio" and config.student is not None
    assert run.read_meta()["audio"] == audio_run.read_meta()["audio"]
    assert component_names(config)[-1] == "vocoder"
    with TorchRunner.from_run_dir(run, "fp32") as runner:
        result = sample(runner, config, [0, 8], steps=config.student.steps, seed=0, batch_size=2)
    assert result.audio is not None and result.audio.shape == (2, config.audio.clip_samples)
    assert np.isfinite(result.audio).all()
