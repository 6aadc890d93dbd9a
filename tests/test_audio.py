from __future__ import annotations

import json
import struct
import wave

import numpy as np
import pytest

from mmgen_deploy.data.audio_folder import load_audio_folder
from mmgen_deploy.data.tones import (
    CLASS_NAMES,
    CLIP_SAMPLES,
    F0_MAX,
    F0_MIN,
    SAMPLE_RATE,
    ToneSpec,
    class_parts,
    make_tones,
    render,
    sample_specs,
)
from mmgen_deploy.data.wav import decode_wav, encode_wav, read_wav, write_wav
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.evaluation.tone_judge import judge_clip


def test_tones_are_deterministic_and_split() -> None:
    a, b = make_tones(12, seed=3), make_tones(12, seed=3)
    assert np.array_equal(a.clips, b.clips) and np.array_equal(a.labels, b.labels) and a.captions == b.captions
    assert not np.array_equal(a.clips, make_tones(12, seed=4).clips)
    assert not np.array_equal(a.clips, make_tones(12, seed=3, split="val").clips)
    assert a.clips.shape == (12, CLIP_SAMPLES) and a.clips.dtype == np.float32 and a.sample_rate == SAMPLE_RATE
    assert np.abs(a.clips).max() <= 1.0


def test_tone_settings_follow_the_class() -> None:
    assert len(CLASS_NAMES) == 9 and CLASS_NAMES[3] == "square rising"
    specs = sample_specs(600, np.random.default_rng(0))
    assert {s.label for s in specs} == set(range(9))
    for spec in specs:
        start, end = spec.f0(np.array([0.0, 1.0]))
        assert min(start, end) >= F0_MIN - 1e-6 and max(start, end) <= F0_MAX + 1e-6
        if spec.contour == "steady":
            assert abs(end / start - 1) <= 0.02
        else:
            assert abs(np.log2(end / start)) >= 0.5 and (end > start) == (spec.contour == "rising")
        assert spec.waveform in spec.caption and spec.caption.startswith(("a loud ", "a soft "))
    assert ToneSpec("square", "rising", 300, 1.2, 0.8, 0.01, 0.1).caption == "a loud square tone rising quickly"
    assert ToneSpec("sine", "steady", 300, 0.0, 0.4, 0.01, 0.1).caption == "a soft sine tone holding steady"


@pytest.mark.parametrize("waveform, odd_only", [("square", True), ("sawtooth", False)])
def test_rendered_harmonics_match_the_waveform(waveform: str, odd_only: bool) -> None:
    spectrum = np.abs(np.fft.rfft(render(ToneSpec(waveform, "steady", 400, 0.0, 0.8, 0.01, 0.05))[4000:12000]))
    # 8000 samples at 16 kHz: 2 Hz per bin, harmonic k of 400 Hz at bin 200 k.
    level = [spectrum[200 * k - 3:200 * k + 4].max() / spectrum[197:204].max() for k in range(1, 6)]
    assert level[2] == pytest.approx(1 / 3, rel=0.05) and level[4] == pytest.approx(1 / 5, rel=0.05)
    if odd_only:
        assert level[1] < 1e-3 and level[3] < 1e-3
    else:
        assert level[1] == pytest.approx(1 / 2, rel=0.05)
    # Band-limited: nothing above the Nyquist frequency folded back between the harmonics.
    between = spectrum[300:4000].copy()
    for k in range(2, 21):
        between[max(0, 200 * k - 300 - 5):200 * k - 300 + 6] = 0
    assert between.max() < 1e-3 * spectrum.max()


def test_judge_is_right_on_real_clips() -> None:
    data = make_tones(90, seed=5, split="val")
    right = 0
    for clip, label in zip(data.clips, data.labels, strict=True):
        right += judge_clip(clip, SAMPLE_RATE).matches(*class_parts(int(label)))
    assert right >= 89


def test_judge_on_silence_and_noise() -> None:
    assert judge_clip(np.zeros(CLIP_SAMPLES, np.float32), SAMPLE_RATE).waveform is None
    noise = np.random.default_rng(0).standard_normal(CLIP_SAMPLES).astype(np.float32) * 0.3
    verdict = judge_clip(noise, SAMPLE_RATE)
    assert verdict.waveform is None or not verdict.matches("sine", "steady")


def test_wav_round_trip_with_settings(tmp_path) -> None:
    clip = make_tones(1, seed=0).clips[0]
    settings = {"class": "sine rising", "seed": 7, "steps": 50}
    path = write_wav(tmp_path / "a.wav", clip, SAMPLE_RATE, settings=settings)
    back = read_wav(path)
    assert back.sample_rate == SAMPLE_RATE and back.samples.shape == (CLIP_SAMPLES, 1)
    assert np.abs(back.samples[:, 0] - clip).max() <= 0.5 / 32768 + 1e-7
    assert back.settings == settings and back.info["ISFT"] == "mmgen-deploy"
    # Any WAV reader reads the samples (the INFO chunk is a chunk it skips).
    with wave.open(str(path)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, SAMPLE_RATE)
        assert reader.getnframes() == CLIP_SAMPLES
    # An odd-length INFO string is padded: the RIFF size still matches the file.
    raw = encode_wav(clip[:11], SAMPLE_RATE, settings={"a": "b"})
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8 and len(raw) % 2 == 0


def test_wav_reader_accepts_other_layouts_and_refuses_bad_files(tmp_path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 100), np.zeros(100)], axis=1)
    with wave.open(str(tmp_path / "s.wav"), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes((stereo * 32767).astype("<i2").tobytes())
    read = read_wav(tmp_path / "s.wav")
    assert read.samples.shape == (100, 2) and read.sample_rate == 8000 and read.settings is None
    raw = encode_wav(stereo, 8000)
    with pytest.raises(MMGenError, match="truncated"):
        decode_wav(raw[:-50], "cut.wav")
    with pytest.raises(MMGenError, match="not a RIFF/WAVE"):
        decode_wav(b"hello world, not audio", "x.wav")
    with pytest.raises(MMGenError, match="holds no samples"):
        decode_wav(encode_wav(np.zeros((0, 1)), 8000), "empty.wav")


def _write_class(root, name: str, clips: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    (root / name).mkdir(parents=True)
    for k, clip in enumerate(clips):
        write_wav(root / name / f"{k}.wav", clip, rate)


def test_audio_folder_layouts_and_conversions(tmp_path) -> None:
    tones = make_tones(4, seed=0)
    _write_class(tmp_path / "data", "low", tones.clips[:2])
    _write_class(tmp_path / "data", "high", tones.clips[2:, :8000])  # half a second: padded
    write_wav(tmp_path / "data" / "high" / "stereo.wav", np.stack([tones.clips[0]] * 2, axis=1), SAMPLE_RATE)
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "low/0.wav", "text": "a hum"}) + "\n")
    data = load_audio_folder(tmp_path / "data")
    assert data.class_names == ("high", "low") and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.clips.shape == (5, CLIP_SAMPLES) and not data.clips[0, 8000:].any()
    assert data.captions[3] == "a hum"
    assert np.abs(data.clips[2] - tones.clips[0]).max() < 1e-4  # two equal channels average to themselves


def test_audio_folder_bad_input_is_one_line(tmp_path) -> None:
    clip = make_tones(1, seed=0).clips
    _write_class(tmp_path / "rate", "a", clip[:, :8000], rate=8000)
    with pytest.raises(MMGenError, match="8000 Hz, not 16000 Hz"):
        load_audio_folder(tmp_path / "rate")
    _write_class(tmp_path / "quiet", "a", np.zeros((1, 100)))
    with pytest.raises(MMGenError, match="is silent"):
        load_audio_folder(tmp_path / "quiet")
    (tmp_path / "none").mkdir()
    with pytest.raises(UsageError, match="no WAV files found"):
        load_audio_folder(tmp_path / "none")
    _write_class(tmp_path / "cut", "a", clip)
    path = tmp_path / "cut" / "a" / "0.wav"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(MMGenError, match="truncated"):
        load_audio_folder(tmp_path / "cut")


def test_spectrogram_layout_and_vocoder_round_trip() -> None:
    import torch

    from mmgen_deploy.config import AudioConfig, audio_layout
    from mmgen_deploy.data.spectrogram import band_matrix, clips_to_images, column_matrix, stft_magnitude
    from mmgen_deploy.models.vocoder import GriffinLimVocoder

    layout = audio_layout(64)
    assert band_matrix(layout).shape == (64, layout.n_fft // 2 + 1) and column_matrix(layout).shape[0] == 64
    # A full-scale steady sine lights one row at 0 dB (image value 1) all along, where its frequency is.
    times = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sine = np.sin(2 * np.pi * 1000.0 * times)[None]
    image = clips_to_images(sine, layout)[0]
    row = int(np.argmax(image[:, 32]))
    assert image[row, 8:56].min() > 0.95
    expected_row = 63 - round(1000.0 / (layout.f_max / 63))
    assert abs(row - expected_row) <= 1
    # The conv STFT of the vocoder is NumPy's.
    vocoder = GriffinLimVocoder(layout.replace(griffin_lim_iters=16)).eval()
    clip = make_tones(2, seed=1).clips
    with torch.no_grad():
        spectrum = vocoder.stft(torch.from_numpy(clip)).numpy()
    bins = layout.n_fft // 2 + 1
    magnitude = np.hypot(spectrum[:, :bins], spectrum[:, bins:])
    assert np.allclose(magnitude, stft_magnitude(clip, layout), atol=1e-3 * magnitude.max())
    # Without a phase problem (magnitude and phase of a real STFT), the inverse STFT is exact.
    with torch.no_grad():
        back = vocoder.istft(torch.from_numpy(spectrum)).numpy()
    assert np.abs(back - clip).max() < 1e-4
    # Through the image and Griffin-Lim: the judge still hears the class.
    data = make_tones(9, seed=2, split="val")
    with torch.no_grad():
        sound = vocoder(torch.from_numpy(clips_to_images(data.clips, layout)[:, None])).numpy()
    assert sound.shape == (9, CLIP_SAMPLES)
    right = sum(judge_clip(clip, SAMPLE_RATE).matches(*class_parts(int(label)))
                for clip, label in zip(sound, data.labels, strict=True))
    assert right >= 8
    with pytest.raises(Exception, match="freq_scale"):
        AudioConfig(freq_scale="bark").validate()


def test_audio_run_config_and_components(audio_run) -> None:
    from mmgen_deploy.specs import component_names, decode_components

    config = audio_run.load_config()
    assert config.modality == "audio" and config.audio is not None and config.audio.griffin_lim_iters == 8
    assert audio_run.read_meta()["audio"]["freq_scale"] == "mel"
    assert component_names(config)[-1] == "vocoder" and decode_components(config) == ("quantizer", "decoder",
                                                                                      "vocoder")


def test_vocoder_exports_and_matches_pytorch(audio_run) -> None:
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    report = run_parity(audio_run, ParityOptions(components=("vocoder",), end_to_end=False, allow_untrained=True))
    checks = [c for c in report.checks if c.group == "vocoder"]
    assert report.passed and checks and all(c.value < 1e-4 for c in checks)


def test_sampling_an_audio_run_returns_waveforms(audio_run) -> None:
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import make_conditioning, sample

    config = audio_run.load_config()
    runner, _ = open_runner(audio_run, backend="onnxruntime", precision="fp32")
    with runner:
        condition = make_conditioning(runner, config, class_ids=[0, 5], prompts=[], tokenizer=None)
        result = sample(runner, config, condition, steps=2, sampler="ddim", cfg_scale=2.0, seed=0, batch_size=2)
    assert result.audio is not None and result.audio.shape == (2, CLIP_SAMPLES)
    assert result.images.shape == (2, 32, 32, 1) and np.isfinite(result.audio).all()


def test_eval_judges_generated_clips(audio_run) -> None:
    from mmgen_deploy.evaluation.evaluate import EvalSettings, evaluate_run

    report = evaluate_run(audio_run, EvalSettings(samples_per_class=1, steps=2, backend="onnxruntime"))
    generation = report["generation"]
    assert generation["num_samples"] == 9 and 0.0 <= generation["accuracy"] <= 1.0
    assert set(generation) >= {"waveform_accuracy", "contour_accuracy", "per_class", "judge_on_real_clips"}
    # The judge on the run's real validation clips (16 of them here) is what its verdicts are worth.
    assert generation["judge_on_real_clips"]["accuracy"] == 1.0
    assert report["vqvae"]["psnr_db"] > 0


def test_generate_writes_wavs_with_their_settings(audio_run, tmp_path) -> None:
    from PIL import Image

    from mmgen_deploy.sampling.generate import GenerateRequest, generate_to_folder

    request = GenerateRequest(classes=["square rising", "1"], n=1, steps=2, seed=3, backend="onnxruntime",
                              precision="fp32", out=tmp_path / "out")
    generated = generate_to_folder(audio_run, request)
    files = [entry["file"] for entry in generated.sidecar["images"]]
    assert files == ["0000_square-rising.wav", "0001_sine-falling.wav"]
    clip = read_wav(tmp_path / "out" / files[0])
    assert clip.sample_rate == SAMPLE_RATE and clip.samples.shape == (CLIP_SAMPLES, 1)
    assert clip.settings is not None and clip.settings["class"] == "square rising" and clip.settings["seed"] == 3
    expected = np.clip(generated.result.audio[0], -1.0, 32767 / 32768)  # the WAV holds full scale at most
    assert np.abs(clip.samples[:, 0] - expected).max() <= 0.5 / 32768 + 1e-6
    assert generated.sidecar["audio"]["sample_rate"] == SAMPLE_RATE
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.mode == "L" and grid.width >= 2 * 32 * 4


def test_end_to_end_parity_compares_the_waveforms(audio_run) -> None:
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    report = run_parity(audio_run, ParityOptions(components=("vocoder",), steps=2, num_images=3,
                                                 allow_untrained=True))
    checks = {c.name: c for c in report.checks if c.group == "end-to-end"}
    assert checks["waveform rel_l2"].value < 1e-2
    agreement = checks["judge agreement (waveform and contour)"]
    assert agreement.value == 1.0 and len(agreement.details["torch"]) == 3


@pytest.mark.slow
def test_quickstart_on_tones_runs_every_stage(tmp_path, capsys, monkeypatch) -> None:
    """`mmgen quickstart --data tones` as written, with a 2-step recipe, 1 evaluated clip per class and
    2-step sampling (CI time); the 2-step DiT's near-zero tensors are re-randomised so parity compares
    real outputs."""
    from quickstart_helpers import fewer_generate_steps, small_real_evaluation, with_meaningful_dit

    from mmgen_deploy.cli import quickstart as qs_cli
    from mmgen_deploy.cli.app import main
    from mmgen_deploy.io_utils import read_json
    from mmgen_deploy.training import recipes

    monkeypatch.setitem(recipes._RECIPES, "tiny", recipes.TrainRecipe(vq_steps=2, dit_steps=2))
    real_new_run = qs_cli.new_run
    monkeypatch.setattr(qs_cli, "new_run", lambda out, preset, data, size, seed, num_train, *rest:
                        real_new_run(out, preset, data, size, seed, 64, *rest))
    replaced = {"train DiT": with_meaningful_dit(dict(qs_cli.QUICKSTART_STAGES)["train DiT"])}
    monkeypatch.setattr(qs_cli, "QUICKSTART_STAGES", [(name, replaced.get(name, fn))
                                                      for name, fn in qs_cli.QUICKSTART_STAGES])
    monkeypatch.setitem(qs_cli.QUICKSTART_DATA, "tones", 1)
    small_real_evaluation(monkeypatch)
    fewer_generate_steps(monkeypatch, steps=2)
    out = tmp_path / "qs"
    with pytest.raises(SystemExit) as info:
        main(["quickstart", "--data", "tones", "--out", str(out), "--threads", "1"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert int(info.value.code or 0) == 0, text
    run_json = read_json(out / "run.json")
    assert run_json["data"]["name"] == "tones" and run_json["audio"]["image_size"] == 32
    wavs = sorted((out / "samples" / "onnxruntime-fp32").glob("*.wav"))
    assert len(wavs) == 18 and read_wav(wavs[0]).settings is not None
    summary = read_json(out / "reports" / "quickstart.json")
    generation = summary["eval"]["generation"]
    assert generation["num_samples"] == 9 and set(generation["per_class"]) == set(CLASS_NAMES)
    assert generation["judge_on_real_clips"]["accuracy"] >= 0.98
    for precision in ("fp32", "fp16"):
        report = read_json(out / "reports" / f"parity-onnxruntime-{precision}.json")
        assert report["passed"], report["verdict"]
        names = {(c["group"], c["name"].split(" ")[0]) for c in report["checks"]}
        assert ("vocoder", "audio") in names and ("end-to-end", "waveform") in names
    with pytest.raises(SystemExit) as info:
        main(["quickstart", "--data", "noise", "--out", str(tmp_path / "other")])
    captured = capsys.readouterr()
    assert int(info.value.code or 0) != 0 and "--data" in captured.out + captured.err


def test_a_wav_folder_is_audio_data(tmp_path) -> None:
    from mmgen_deploy.config import audio_layout
    from mmgen_deploy.data import DataSpec, load_audio_split, load_split

    tones = make_tones(10, seed=0)
    _write_class(tmp_path / "wavs", "a", tones.clips[:5])
    _write_class(tmp_path / "wavs", "b", tones.clips[5:])
    spec = DataSpec.parse(str(tmp_path / "wavs"), image_size=32, seed=0)
    assert spec.name == "wav_folder" and spec.is_audio
    val = load_audio_split(spec, "val")
    train = load_split(spec, "train", audio=audio_layout(32))
    assert len(val) == 1 and train.images.shape == (9, 32, 32, 1) and train.class_names == ("a", "b")
    assert not DataSpec.parse("shapes", image_size=32, seed=0).is_audio


def test_batch_writes_the_clips_generate_writes(audio_run, tmp_path) -> None:
    from mmgen_deploy.batch import BatchSettings, run_batch
    from mmgen_deploy.sampling.generate import GenerateRequest, generate_to_folder

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"class": "sawtooth falling", "n": 2, "seed": 4, "steps": 2}) + "\n")
    run_batch(audio_run.root, requests, tmp_path / "out", BatchSettings(backend="onnxruntime", precision="fp32"))
    generate_to_folder(audio_run, GenerateRequest(classes=["sawtooth falling"], n=2, seed=4, steps=2,
                                                  backend="onnxruntime", precision="fp32", out=tmp_path / "gen"))
    ours = sorted((tmp_path / "out" / "images").glob("*.wav"))
    assert [p.name for p in ours] == ["00001_0000_sawtooth-falling.wav", "00001_0001_sawtooth-falling.wav"]
    for path in ours:
        theirs = read_wav(tmp_path / "gen" / path.name.removeprefix("00001_"))
        batch = read_wav(path)
        assert np.array_equal(batch.samples, theirs.samples) and batch.settings == theirs.settings


def test_audio_options_that_do_not_apply_are_refused_before_any_work(tmp_path, capsys) -> None:
    from mmgen_deploy.cli.app import main

    for argv, words in ((["--image-size", "48"], "no spectrogram layout for 48x48"), (["--text"], "--text")):
        with pytest.raises(SystemExit) as info:
            main(["train", "all", "--data", "tones", "--out", str(tmp_path / "run"), *argv])
        captured = capsys.readouterr()
        assert int(info.value.code or 0) != 0 and words in captured.out + captured.err
        assert not (tmp_path / "run").exists()


def test_generate_and_batch_count_clips(audio_run, tmp_path, monkeypatch) -> None:
    """An audio run's progress bars and summary lines count what it writes, WAV clips, in clips per second
    (on a terminal, where the progress bars show)."""
    import io
    import re

    from rich.console import Console

    from mmgen_deploy.cli import batch, generate
    from mmgen_deploy.cli.app import main

    common = ["--steps", "2", "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"class": "sine falling", "n": 2, "seed": 4}) + "\n")
    for module, argv, bar, said in (
            (generate, ["generate", str(audio_run.root), "--class", "1", "--n", "2", *common, "--out",
                        str(tmp_path / "gen")], "sampling 2 clips", "2 clips in "),
            (batch, ["batch", str(audio_run.root), str(requests), *common, "--out", str(tmp_path / "batch")],
             "writing clips", "wrote 2 clips to ")):
        terminal = io.StringIO()
        monkeypatch.setattr(module, "console", Console(file=terminal, force_terminal=True, width=200))
        with pytest.raises(SystemExit) as info:
            main(argv)
        output = " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", " ", terminal.getvalue()).split())
        assert int(info.value.code or 0) == 0, output
        assert bar in output and said in output and "clips/s" in output and "image" not in output, output


def test_a_cached_audio_run_generates_clips_and_passes_parity(audio_run, tmp_path) -> None:
    """Step caching on an audio run: the parts export next to the vocoder, a cached loop saves block
    evaluations and still ends in waveforms, and the end-to-end parity compares the cached waveforms."""
    import shutil

    from mmgen_deploy.export import export_run
    from mmgen_deploy.numerics import tensor_diff
    from mmgen_deploy.parity.compare import ParityOptions, run_parity
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.sampling import sample

    run = RunDir(shutil.copytree(audio_run.root, tmp_path / "run"))  # the shared fixture stays without parts
    export_run(run, precisions=("fp32",), components=("denoiser_parts",))
    config = run.load_config()
    with OrtRunner(run, "fp32") as runner:
        whole = sample(runner, config, [0, 4, 8], steps=4, seed=1, batch_size=3)
        parts = sample(runner, config, [0, 4, 8], steps=4, seed=1, batch_size=3, cache="every:1")
        cached = sample(runner, config, [0, 4, 8], steps=4, seed=1, batch_size=3, cache="every:2")
    assert tensor_diff(whole.audio, parts.audio).rel_l2 < 1e-4  # the parts compose to the whole denoiser
    assert cached.audio is not None and cached.audio.shape == (3, CLIP_SAMPLES) and np.isfinite(cached.audio).all()
    assert cached.cache.recompute_steps == [[0, 2, 3]] and cached.cache.saved_fraction > 0
    # Reuse moves the final latents a little (the VQ quantizer may then snap them to the same codes).
    assert 0 < tensor_diff(whole.latents, cached.latents).rel_l2 < 0.5

    report = run_parity(run, ParityOptions(components=("denoiser_body",), steps=4, num_images=3, cache="every:2",
                                           allow_untrained=True))
    checks = {c.name: c for c in report.checks if c.group == "end-to-end"}
    assert report.passed, [c for c in report.checks if not c.passed]
    assert checks["waveform rel_l2"].value < 1e-2 and "judge agreement (waveform and contour)" in checks
