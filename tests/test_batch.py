"""`mmgen batch`: JSONL requests -> the images `mmgen generate` writes, in-process and with Ray Data.

One tiny class run (re-randomised weights, fp32 ONNX) for the module; Ray is started once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen_deploy.batch import LOCK
from mmgen_deploy.cli.app import main
from mmgen_deploy.config import preset
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.rundir import RunDir, save_run

CLASS_NAMES = ("red circle", *(f"shape {i}" for i in range(1, 18)))
STEPS = 4
# Four requests, ten images: by name and by id, one line with its own sampler and steps, a blank line.
REQUESTS = [
    {"class": "red circle", "n": 3, "seed": 11},
    {"class": 5, "n": 2, "seed": 2, "steps": 3},
    {"class": "shape 7", "n": 4, "seed": 7, "sampler": "dpmpp-2m"},
    {"class": "1", "n": 1},
]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    from mmgen_deploy.export import export_run

    config = preset("tiny").replace(class_names=CLASS_NAMES)
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path_factory.mktemp("batch") / "run", config, vq.eval(), dit.eval())
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    return run


def _write_requests(path: Path, requests: list[dict[str, object]]) -> Path:
    lines = [json.dumps(r) for r in requests]
    lines.insert(2, "")  # blank lines are skipped but still count as line numbers
    path.write_text("\n".join(lines) + "\n")
    return path


def _images(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    result = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            result[path.name] = np.asarray(image.convert("RGB"))
    return result


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every output file's mtime and size; the writer lock is left out, since each batch records itself in it."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")
            if p.is_file() and p.name != LOCK}


def test_bad_request_lines_are_refused_by_number(class_run: RunDir, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"class": "red circle"}\n{"class": "red circle", "n": 2\n', "bad.jsonl line 2 is not JSON"),
        # Every message that names a key quotes it as the JSON spells it.
        ('{"class": "red circle", "count": 2}\n', 'line 1: unknown key "count" (use "class", "prompt", "n"'),
        ('{"class": 0, "stpes": 2, "Seed": 1}\n', 'line 1: unknown keys "Seed", "stpes"'),
        ('{"class": 0, "prompt": "a"}\n', 'line 1: give "class" (class models) or "prompt" (text models)'),
        ('{"prompt": "a small red circle"}\n', 'line 1: this model is class-conditioned: it takes "class"'),
        ('{"class": "blue moon"}\n', "line 1: unknown class 'blue moon'"),
        ('{"class": 0, "n": 0}\n', 'line 1: "n" must be >= 1'),
        ('{"class": 0, "n": "2"}\n', """line 1: "n" must be an integer, got '2'"""),
        ('{"class": 0, "steps": 0}\n', 'line 1: "steps" must be >= 1'),
        ('{"class": 0, "sampler": "euler"}\n', """line 1: unknown "sampler" 'euler'"""),
        ('{"class": 0, "sampler": 3}\n', 'line 1: "sampler" must be a string'),
        ('{"class": 0, "n": 1000000000}\n', 'line 1: "n" must be at most 10000 per line'),
        ('{"class": 0, "cfg_scale": "4"}\n', 'line 1: "cfg_scale" must be a number'),
        ('{"class": 0, "cfg_scale": 1e30}\n', 'line 1: "cfg_scale" must be in 0..50'),
        ('{"class": 0, "cfg_scale": NaN}\n', 'line 1: "cfg_scale" must be in 0..50'),
        ('{"class": 0, "seed": -1}\n', 'line 1: "seed" must be an integer in 0..9223372036854775807'),
        ('{"class": 0, "seed": 9223372036854775808}\n', 'line 1: "seed" must be an integer in 0..'),
        ('{"class": 0, "steps": 100000}\n', 'line 1: "steps" 100000 exceeds the 1000 training timesteps'),
        ('\n\n', "holds no requests"),
    ]
    for text, expected in cases:
        bad.write_text(text)
        code, output = _cli(["batch", str(class_run.root), str(bad), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and expected in output and "Traceback" not in output, output
        assert not (tmp_path / "out").exists()  # nothing is created before the requests are valid
    code, output = _cli(["batch", str(class_run.root), str(bad), "--out", str(tmp_path / "o"), "--workers", "2"],
                        capsys)
    assert code == 2 and "--workers needs --ray" in output
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    _write_requests(bad, REQUESTS[:1])
    code, output = _cli(["batch", str(class_run.root), str(bad), "--out", str(precious)], capsys)
    assert code == 2 and "not written by `mmgen batch`" in output and (precious / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_batch_with_ray_local_writes_generates_images_and_resumes(class_run: RunDir, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'mmgen-deploy[batch]')")
    from mmgen_deploy.numerics import psnr

    requests = _write_requests(tmp_path / "requests.jsonl", REQUESTS)
    out = tmp_path / "ray-out"
    common = ["--steps", str(STEPS), "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1"]
    code, text = _cli(["batch", str(class_run.root), str(requests), "--out", str(out), "--ray", "local",
                       "--workers", "2", *common, "--json", str(tmp_path / "ray.json")], capsys)
    assert code == 0, text
    report = json.loads((tmp_path / "ray.json").read_text())
    assert report["written"] == 10 and report["workers"] == 2 and report["skipped"] == 0
    served = _images(out / "images")
    assert len(served) == 10
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in manifest) == sorted(
        f"{line}:{k}" for line, n in ((1, 3), (2, 2), (4, 4), (5, 1)) for k in range(n))

    # Each request line gives the images of `mmgen generate` with the same class, n, seed and settings.
    exact = 0
    for line, request in zip((1, 2, 4, 5), REQUESTS, strict=True):
        folder = tmp_path / f"generate-{line}"
        argv = ["generate", str(class_run.root), "--class", str(request["class"]), "--n", str(request["n"]),
                "--seed", str(request.get("seed", 0)), "--sampler", str(request.get("sampler", "ddim")),
                *common, "--out", str(folder)]
        argv[argv.index("--steps") + 1] = str(request.get("steps", STEPS))
        code, text = _cli(argv, capsys)
        assert code == 0, text
        generated = {name: image for name, image in _images(folder).items() if name != "grid.png"}
        assert len(generated) == request["n"]
        for name, image in generated.items():
            ours = served[f"{line:05d}_{name}"]
            assert psnr(image, ours) >= 40.0, (line, name)
            exact += int(np.array_equal(image, ours))
    assert exact >= 1  # same backend, same arithmetic: most are bit-identical (printed below)
    print(f"{exact}/10 batch images bit-identical to generate's")

    # The PNGs carry generate's text chunks.
    from PIL import Image

    with Image.open(out / "images" / "00004_0002_shape-7.png") as image:
        chunks = dict(image.text)  # type: ignore[attr-defined]
    assert {k: chunks[k] for k in ("class", "class_id", "index", "seed", "steps", "sampler")} == \
        {"class": "shape 7", "class_id": "7", "index": "2", "seed": "7", "steps": str(STEPS), "sampler": "dpmpp-2m"}
    with Image.open(tmp_path / "generate-4" / "0002_shape-7.png") as image:
        assert dict(image.text) == chunks  # type: ignore[attr-defined]  # every setting, eta and device included

    # A rerun writes nothing (and starts no Ray).
    before = _snapshot(out)
    code, text = _cli(["batch", str(class_run.root), str(requests), "--out", str(out), "--ray", "local", *common],
                      capsys)
    assert code == 0 and "nothing to do: all 10 images" in text, text
    assert _snapshot(out) == before

    # Resume after a crash: one PNG lost and the manifest's last line cut short -> only those are redone,
    # in-process this time, to the same pixels.
    lost = manifest[-1]["file"]
    (out / lost).unlink()
    text_manifest = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text_manifest[: len(text_manifest) - 30])
    code, text = _cli(["batch", str(class_run.root), str(requests), "--out", str(out), *common, "--json",
                       str(tmp_path / "resume.json")], capsys)
    assert code == 0, text
    assert json.loads((tmp_path / "resume.json").read_text())["files"] == [lost]
    assert np.array_equal(_images(out / "images")[Path(lost).name], served[Path(lost).name])


def test_batch_in_process_takes_prompts_for_a_text_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from text_helpers import PROMPT, make_text_run

    from mmgen_deploy.numerics import psnr

    run = make_text_run(tmp_path / "run")
    requests = tmp_path / "prompts.jsonl"
    requests.write_text(json.dumps({"prompt": PROMPT, "n": 2, "seed": 5, "steps": 2}) + "\n")
    code, text = _cli(["batch", str(run.root), str(requests), "--out", str(tmp_path / "out"), "--backend", "torch"],
                      capsys)
    assert code == 0, text
    code, text = _cli(["generate", str(run.root), "--prompt", PROMPT, "--n", "2", "--seed", "5", "--steps", "2",
                       "--backend", "torch", "--out", str(tmp_path / "gen")], capsys)
    assert code == 0, text
    ours = _images(tmp_path / "out" / "images")
    theirs = {name: image for name, image in _images(tmp_path / "gen").items() if name != "grid.png"}
    assert sorted(ours) == [f"00001_{name}" for name in sorted(theirs)] and len(ours) == 2
    for name, image in theirs.items():
        assert psnr(image, ours[f"00001_{name}"]) >= 40.0
    entry = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert entry["prompt"] == PROMPT and "class" not in entry


def test_requests_adding_up_past_the_limit_are_refused_before_expanding(
        class_run: RunDir, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import mmgen_deploy.batch

    # REQUESTS describe 10 images
    monkeypatch.setattr(mmgen_deploy.batch, "SAMPLING", dataclasses.replace(SAMPLING, max_batch_images=9))
    requests = _write_requests(tmp_path / "r.jsonl", REQUESTS)
    code, output = _cli(["batch", str(class_run.root), str(requests), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "line 5: the requests add up to more than 9 images" in output, output
    assert "Traceback" not in output and not (tmp_path / "out").exists()
    code, output = _cli(["batch", str(class_run.root), str(requests), "--out", str(tmp_path / "out"),
                         "--batch-size", "100000"], capsys)
    assert code == 2 and "--batch-size must be in 1..1024" in output, output
    assert "n is at most 10000 per line" in " ".join(_cli(["batch", "--help"], capsys)[1].split())
