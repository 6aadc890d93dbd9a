"""`mmgen generate` through the real entry point, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmgen_deploy.cli.app import main


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_generate_writes_pngs_grid_and_sidecar(exported_tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "samples"
    code, stdout, stderr = _cli(["generate", str(exported_tiny_run.root), "--class", "shape 3", "-c", "11",
                                 "--n", "2", "--batch-size", "3", "--steps", "3", "--sampler", "dpmpp-2m",
                                 "--cfg-scale", "2.5", "--seed", "5", "--out", str(out), "--backend", "onnxruntime",
                                 "--precision", "fp32", "--threads", "1", "--json", str(tmp_path / "g.json")], capsys)
    assert code == 0, stderr
    assert f"grid: {out / 'grid.png'}" in stdout
    assert "backend: onnxruntime fp32 on cpu" in stderr and "images/s" in stderr
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0000_shape-3.png", "0001_shape-3.png", "0002_shape-11.png", "0003_shape-11.png"]
    with Image.open(out / "0002_shape-11.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        chunks = dict(image.text)
    assert chunks["class"] == "shape 11" and chunks["seed"] == "5" and chunks["steps"] == "3"
    assert chunks["sampler"] == "dpmpp-2m" and chunks["cfg_scale"] == "2.5"
    assert chunks["backend"] == "onnxruntime" and chunks["precision"] == "fp32"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 columns (--n) x 2 classes, 2 px padding
    sidecar = json.loads((out / "samples.json").read_text())
    assert [e["class_id"] for e in sidecar["images"]] == [3, 3, 11, 11]
    assert sidecar["settings"]["timesteps"] == [999, 500, 0]
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["timing"]["images_per_second"] > 0 and 0 <= report["timing"]["loop_overhead_fraction"] < 1
    # A second run into the same folder (a previous generate output) replaces it.
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", "0", "--n", "1", "--steps", "2",
                            "--out", str(out), "--backend", "onnxruntime"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["0000_shape-0.png"]


def test_every_setting_that_changes_the_images_is_recorded(exported_tiny_run, tmp_path, capsys) -> None:
    """eta, the cache policy, the device and the thread count too: an image can be made again from its files."""
    out = tmp_path / "eta"
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", "4", "--n", "1", "--steps", "3",
                            "--eta", "0.5", "--seed", "3", "--backend", "onnxruntime", "--precision", "fp32",
                            "--threads", "1", "--out", str(out)], capsys)
    assert code == 0, stderr
    with Image.open(out / "0000_shape-4.png") as image:
        chunks = dict(image.text)
    assert {k: chunks[k] for k in ("seed", "steps", "sampler", "cfg_scale", "eta", "cache", "backend", "precision",
                                   "device")} == {"seed": "3", "steps": "3", "sampler": "ddim", "cfg_scale": "4.0",
                                                  "eta": "0.5", "cache": "none", "backend": "onnxruntime",
                                                  "precision": "fp32", "device": "cpu"}
    sidecar = json.loads((out / "samples.json").read_text())
    assert sidecar["settings"]["eta"] == 0.5 and sidecar["settings"]["cache"] == "none"
    assert sidecar["backend"] == {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "threads": 1}
    # Made again from what the PNG says: the same pixels (eta > 0 draws per-step noise from the same seeds).
    again = tmp_path / "again"
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", chunks["class_id"], "--n", "1",
                            "--steps", chunks["steps"], "--eta", chunks["eta"], "--seed", chunks["seed"],
                            "--sampler", chunks["sampler"], "--cfg-scale", chunks["cfg_scale"],
                            "--backend", chunks["backend"], "--precision", chunks["precision"],
                            "--device", chunks["device"], "--threads", "1", "--out", str(again)], capsys)
    assert code == 0, stderr
    first = np.asarray(Image.open(out / "0000_shape-4.png"))
    assert np.array_equal(first, np.asarray(Image.open(again / "0000_shape-4.png")))
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", "4", "--n", "1", "--steps", "3",
                            "--seed", "3", "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1",
                            "--out", str(tmp_path / "eta0")], capsys)
    assert code == 0, stderr
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "eta0" / "0000_shape-4.png")))


def test_same_seed_same_pictures_on_torch_and_ort(exported_tiny_run, tmp_path, capsys) -> None:
    common = ["-c", "2", "--n", "2", "--steps", "3", "--seed", "1"]
    for backend in ("torch", "onnxruntime"):
        code, _, stderr = _cli(["generate", str(exported_tiny_run.root), *common, "--backend", backend,
                                "--out", str(tmp_path / backend)], capsys)
        assert code == 0, stderr
    for name in ("0000_shape-2.png", "0001_shape-2.png"):
        a = np.asarray(Image.open(tmp_path / "torch" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "onnxruntime" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 2


def test_auto_backend_says_what_it_chose(exported_tiny_run, tmp_path, capsys) -> None:
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", "1", "--n", "1", "--steps", "1",
                            "--out", str(tmp_path / "auto")], capsys)
    assert code == 0, stderr
    from conftest import cpu_auto_choice

    backend, precision = cpu_auto_choice()
    assert f"backend: {backend} {precision} on cpu" in stderr and "skipped tensorrt" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--n", "0"], "--n must be in 1..2048"),
    (["--cfg-scale", "-1"], "--cfg-scale must be in 0..50"),
    (["--batch-size", "0"], "--batch-size must be in 1..1024"),
    (["--sampler", "euler"], "unknown --sampler"),
    (["--cfg-scale", "1e30"], "--cfg-scale must be in 0..50"),
    (["--cfg-scale", "nan"], "--cfg-scale must be in 0..50"),
    (["--eta", "nan"], "--eta must be in 0..1"),
    (["--eta", "1.5"], "--eta must be in 0..1"),
    (["--eta", "0.5", "--sampler", "ddpm"], "--eta applies to the ddim sampler only"),
    (["--seed", "-1"], "--seed must be an integer in 0..9223372036854775807"),
    (["--seed", str(2**63)], "--seed must be an integer in 0.."),
    (["--n", "1000000000"], "--n must be in 1..2048"),
    (["--batch-size", "100000"], "--batch-size must be in 1..1024"),
])
def test_bad_numbers_are_refused_up_front(tmp_path, capsys, args: list[str], message: str) -> None:
    # The run directory does not even exist: the numbers are checked before anything is read.
    code, _, stderr = _cli(["generate", str(tmp_path / "no-such-run"), *args], capsys)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_more_images_than_one_generate_holds_are_refused_before_loading(exported_tiny_run, tmp_path,
                                                                        capsys) -> None:
    # 18 classes x 200: within --n's bound, but more images than generate keeps in memory.
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "--n", "200", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "3600 images (--n 200 for each of 18 classes)" in stderr and "mmgen batch" in stderr
    assert "backend:" not in stderr and "Traceback" not in stderr and not (tmp_path / "o").exists()


def test_unknown_class_lists_valid_ones(exported_tiny_run, capsys) -> None:
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "--class", "purple hexagon"], capsys)
    assert code == 2
    assert "unknown class 'purple hexagon'" in stderr and "0='shape 0'" in stderr and "17='shape 17'" in stderr
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "--class", "18"], capsys)
    assert code == 2 and "valid ids are 0..17" in stderr


def test_foreign_output_folder_is_left_alone(exported_tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, stderr = _cli(["generate", str(exported_tiny_run.root), "-c", "1", "--n", "1", "--steps", "1",
                            "--out", str(out)], capsys)
    assert code == 2 and "not written by `mmgen generate`" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_quickstart_stage_generates_a_grid(exported_tiny_run, capsys) -> None:
    from types import SimpleNamespace

    from mmgen_deploy.cli.quickstart import generate_stage

    ctx = SimpleNamespace(run=exported_tiny_run, seed=0, threads=1, results={})
    grid = generate_stage(ctx)
    assert grid.endswith("samples/onnxruntime-fp32/grid.png")
    sidecar = json.loads((exported_tiny_run.samples_dir / "onnxruntime-fp32" / "samples.json").read_text())
    assert sidecar["backend"]["backend"] == "onnxruntime"
    assert len(list((exported_tiny_run.samples_dir / "onnxruntime-fp32").glob("0*.png"))) == 36  # 18 classes x 2


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--cfg-scale", "1e30"], "--cfg-scale must be in 0..50"),
    (["eval", "--seed", "-1"], "--seed must be an integer in 0.."),
    (["eval", "--samples-per-class", "100000"], "--samples-per-class must be at most 2048"),
    (["parity", "--cfg-scale", "nan"], "--cfg-scale must be in 0..50"),
    (["parity", "--seed", "-1"], "--seed must be an integer in 0.."),
    (["parity", "--images", "1000000"], "--images must be in 1..2048"),
    (["parity", "--batch-sizes", "1,100000"], "--batch-sizes values must be in 1..1024"),
    (["bench", "--cfg-scale", "1e30"], "--cfg-scale must be in 0..50"),
])
def test_every_sampling_command_holds_its_numbers_to_the_same_bounds(tmp_path, capsys, argv: list[str],
                                                                     message: str) -> None:
    # The run directory does not exist: the numbers are checked before anything is read.
    code, _, stderr = _cli([argv[0], str(tmp_path / "no-such-run"), *argv[1:]], capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
