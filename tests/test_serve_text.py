"""Text runs behind Triton and `mmgen client` in `mmgen generate`'s words, against a real tritonserver.

Tiny runs with re-randomised weights, built here; every server listens on 127.0.0.1 only and is
stopped in a `finally`. Skipped with a reason where no Triton can be found; nothing fakes a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import (
    ask_a_served_repository,
    child_env,
    ctrl_c_acts,
    needs_triton,
    with_free_loopback_ports,
)
from text_helpers import PROMPT, make_text_run

from mmgen_deploy.cli.app import main
from mmgen_deploy.config import preset
from mmgen_deploy.models import DiT, VQModel, rerandomize_
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.serve import MODEL_NAME
from mmgen_deploy.serve.server import LONGEST_STOP_S, free_loopback_ports

CLASS_NAMES = ("red circle", *(f"shape {i}" for i in range(1, 18)))


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def make_class_run(root: Path) -> RunDir:
    config = preset("tiny").replace(class_names=CLASS_NAMES)
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    return save_run(root, config, vq.eval(), dit.eval())


def _export(run: RunDir) -> None:
    from mmgen_deploy.export import export_run

    components = ["denoiser", "quantizer", "decoder"] + (["text_encoder"] if run.load_config().uses_text else [])
    export_run(run.root, precisions=["fp32"], components=components)


class Served:
    def __init__(self, process: subprocess.Popen[str], endpoints: dict[str, object]) -> None:
        self.process = process
        self.url = str(endpoints["http"])
        self.pid = int(endpoints["pid"])  # type: ignore[call-overload]


def _start_serve(run_root: Path, tmp_path: Path, extra: tuple[str, ...], ports: list[int]) -> Served:
    """`mmgen serve RUN` on `ports`, returned once it wrote its endpoints (ready); an early exit raises
    with the server's error (a taken port makes `with_free_loopback_ports` try new ones)."""
    http, grpc, metrics = ports
    endpoints_file = tmp_path / f"endpoints-{http}.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "mmgen_deploy", "serve", str(run_root), "--port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1",
         "--max-queue-delay-us", "1000", "--json", str(endpoints_file), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
        preexec_fn=ctrl_c_acts)
    try:
        deadline = time.monotonic() + 180
        while not endpoints_file.is_file():
            if process.poll() is not None:
                raise AssertionError(f"mmgen serve exited early: {process.communicate()[1]}")
            assert time.monotonic() < deadline, "mmgen serve not ready within 180 s"
            time.sleep(0.2)
        time.sleep(0.1)  # the JSON file is renamed into place complete; give the writer a moment anyway
        return Served(process, json.loads(endpoints_file.read_text()))
    except BaseException:
        _stop(process, None)
        raise


def _stop(process: subprocess.Popen[str], served: Served | None) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=LONGEST_STOP_S + 30)  # + the interpreter's exit
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if served is not None:  # the server's process group must be gone with `mmgen serve`
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.pid, signal.SIGKILL)


@contextlib.contextmanager
def _serve(run_root: Path, tmp_path: Path, *extra: str) -> Iterator[Served]:
    """`mmgen serve RUN` as a user runs it (ONNX Runtime fp32, 1 thread); stopped with SIGINT afterwards."""
    served = with_free_loopback_ports(3, lambda ports: _start_serve(run_root, tmp_path, extra, ports))
    try:
        yield served
    finally:
        _stop(served.process, served)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)  # type: ignore[attr-defined]


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- no server ----------------------------------------------------------------------------------
def test_text_repository_declares_prompt_and_ships_the_tokenizer(tmp_path: Path) -> None:
    from mmgen_deploy.serve.repository import RepositoryOptions, write_repository

    run = make_text_run(tmp_path / "run")
    summary = write_repository(run.root, tmp_path / "repo", RepositoryOptions())
    assert summary["conditioning"] == "text"
    pbtxt = (tmp_path / "repo" / MODEL_NAME / "config.pbtxt").read_text()
    assert 'name: "PROMPT" data_type: TYPE_STRING' in pbtxt and 'name: "INDEX" data_type: TYPE_INT64' in pbtxt
    assert 'key: "conditioning" value: { string_value: "text" }' in pbtxt
    copied = tmp_path / "repo" / MODEL_NAME / "1" / "run" / "text_encoder"
    assert (copied / "tokenizer.json").read_bytes() == run.tokenizer_path.read_bytes()
    assert "| PROMPT | BYTES [1] | a text prompt" in (tmp_path / "repo" / "README.md").read_text()
    # The ensemble layout gains the text encoder as a Triton model of its own.
    _export(run)
    summary = write_repository(run.root, tmp_path / "ens", RepositoryOptions(layout="ensemble",
                                                                            component_backend="python"))
    assert list(summary["components"]) == ["denoiser", "quantizer", "decoder", "text_encoder"]
    assert 'name: "input_ids" data_type: TYPE_INT32 dims: [ 16 ]' in (
        tmp_path / "ens" / "mmgen_text_encoder" / "config.pbtxt").read_text()
    assert not (tmp_path / "ens" / MODEL_NAME / "1" / "run" / "text_encoder" / "model.safetensors").exists()
    assert (tmp_path / "ens" / MODEL_NAME / "1" / "run" / "text_encoder" / "tokenizer.json").is_file()


def test_client_refuses_bad_input_before_any_request(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = free_loopback_ports(1)[0]  # nothing listens there: each of these must fail before connecting
    for argv, expected in ((["--n", "0"], "--n must be in 1..2048"), (["--steps", "0"], "--steps must be >= 1"),
                           (["--cfg-scale", "-1"], "--cfg-scale must be in 0..50"), (["--sampler", "euler"], "euler"),
                           (["--seed", "-2"], "--seed must be an integer in 0.."),
                           (["--prompts-file", str(tmp_path / "none.txt")], "does not exist")):
        code, text = _cli(["client", f"http://127.0.0.1:{port}", *argv], capsys)
        assert code == 2 and expected in text and "Traceback" not in text, text


# -- a real tritonserver --------------------------------------------------------------------------
@pytest.mark.slow
@needs_triton
def test_text_run_served_images_equal_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmgen_deploy.numerics import psnr

    run = make_text_run(tmp_path / "run")
    _export(run)
    words = ["--n", "2", "--seed", "5", "--steps", "20", "--cfg-scale", "4"]
    code, text = _cli(["generate", str(run.root), "--prompt", PROMPT, *words, "--backend", "onnxruntime",
                       "--precision", "fp32", "--threads", "1", "--out", str(tmp_path / "generated")], capsys)
    assert code == 0, text
    with _serve(run.root, tmp_path) as served:
        code, text = _cli(["client", served.url, "--prompt", PROMPT, *words, "--out", str(tmp_path / "served")],
                          capsys)
        assert code == 0, text
        # A class sent to a text model: one line naming the problem, and the server keeps serving.
        code, text = _cli(["client", served.url, "--class", "3", "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and "conditioned on text" in text and "Traceback" not in text
        from mmgen_deploy.serve.client import GenerateClient, ImageRequest, RemoteError

        remote = GenerateClient(served.url, timeout_s=120)
        try:
            with pytest.raises(RemoteError, match="this model is text-to-image: send PROMPT"):
                remote.generate(ImageRequest(seeds=[0], classes=["3"], steps=2))
            # Two distinct prompts, one repeated: in one request, as image 0 and 1 of generate --seed 5.
            again = remote.generate(ImageRequest(seeds=[5, 5, 5], indices=[0, 1, 0], prompts=[PROMPT, PROMPT, "x"],
                                                 steps=20, cfg_scale=4.0))
        finally:
            remote.close()
    generated, served_files = _pngs(tmp_path / "generated"), _pngs(tmp_path / "served")
    assert [p.name for p in generated] == [p.name for p in served_files] and len(generated) == 2
    for ref, got in zip(generated, served_files, strict=True):
        assert psnr(_pixels(ref), _pixels(got)) >= 40.0
        ref_text, got_text = _png_text(ref), _png_text(got)
        for key in ("prompt", "index", "seed", "steps", "sampler", "cfg_scale"):
            assert got_text[key] == ref_text[key], key
        assert got_text["backend"] == "triton"
    assert psnr(_pixels(generated[0]), again[0]) >= 40.0 and psnr(_pixels(generated[1]), again[1]) >= 40.0
    ref_json = json.loads((tmp_path / "generated" / "samples.json").read_text())
    got_json = json.loads((tmp_path / "served" / "samples.json").read_text())
    assert got_json["images"] == ref_json["images"] and got_json["prompts"] == ref_json["prompts"]
    assert {k: got_json["settings"][k] for k in ("seed", "steps", "sampler", "cfg_scale", "images_per_prompt")} == \
        {k: ref_json["settings"][k] for k in ("seed", "steps", "sampler", "cfg_scale", "images_per_prompt")}


@pytest.mark.slow
@needs_triton
def test_class_model_takes_class_names_and_refuses_prompts(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from mmgen_deploy.numerics import psnr
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, RemoteError

    run = make_class_run(tmp_path / "run")
    _export(run)
    with _serve(run.root, tmp_path, "--samplers", "ddim,dpmpp-2m") as served:
        code, text = _cli(["client", served.url, "--class", "red circle", "--class", "2", "--n", "2", "--steps", "3",
                           "--seed", "9", "--out", str(tmp_path / "served")], capsys)
        assert code == 0, text
        code, text = _cli(["client", served.url, "--class", "blue moon", "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and "unknown class 'blue moon'" in text
        code, text = _cli(["client", served.url, "--class", "0", "--sampler", "ddpm", "--out", str(tmp_path / "b")],
                          capsys)
        assert code == 2 and "does not allow --sampler ddpm" in text
        remote = GenerateClient(served.url, timeout_s=120)
        try:
            # A prompt sent to a class model: a Triton error naming the problem...
            with pytest.raises(RemoteError, match="this model is class-conditioned: it takes CLASS"):
                remote.generate(ImageRequest(seeds=[0], prompts=[PROMPT], steps=3))
            from tritonclient.utils import InferenceServerException

            with pytest.raises(InferenceServerException, match="mixes CLASS and PROMPT"):
                remote.client.infer(MODEL_NAME, _mixed_inputs())
            with pytest.raises(RemoteError, match="sampler 'ddpm' is not served here"):
                remote.generate(ImageRequest(seeds=[0], classes=["red circle"], steps=3, sampler="ddpm"))
            # ...and the server keeps serving: CLASS by name equals the client's image 1 (seed 9, index 1).
            by_name = remote.generate(ImageRequest(seeds=[9], indices=[1], classes=["Red Circle"], steps=3))
        finally:
            remote.close()
        _bad_requests_in_a_burst_leave_the_good_ones_right(served.url, run)
    files = _pngs(tmp_path / "served")
    assert [p.name for p in files] == ["0000_red-circle.png", "0001_red-circle.png", "0002_shape-2.png",
                                       "0003_shape-2.png"]
    assert _png_text(files[1])["class_id"] == "0" and _png_text(files[1])["index"] == "1"
    assert psnr(_pixels(files[1]), by_name[0]) >= 40.0
    code, text = _cli(["generate", str(run.root), "--class", "red circle", "--class", "2", "--n", "2", "--steps", "3",
                       "--seed", "9", "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1",
                       "--out", str(tmp_path / "generated")], capsys)
    assert code == 0, text
    for ref, got in zip(_pngs(tmp_path / "generated"), files, strict=True):
        assert ref.name == got.name and psnr(_pixels(ref), _pixels(got)) >= 40.0


LONG_ROWS = 16  # the served model's largest batch (`triton-repo --max-batch` default)


def _bad_requests_in_a_burst_leave_the_good_ones_right(url: str, run: RunDir) -> None:
    """Good and bad requests sent together while a long request holds the model's one instance, so
    they can wait together and reach the model in one batch: each bad request gets its own error and
    each good one the image the library makes for it, merged or not."""
    from concurrent.futures import ThreadPoolExecutor

    from mmgen_deploy.numerics import psnr
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, RemoteError, batch_sizes_executed

    good = [ImageRequest(seeds=[20 + i], class_ids=[i], steps=3) for i in range(3)]
    bad = [(ImageRequest(seeds=[-1], class_ids=[0], steps=3), "seed -1 is negative"),
           (ImageRequest(seeds=[0], classes=["blue moon"], steps=3), "unknown class 'blue moon'"),
           (ImageRequest(seeds=[0], class_ids=[0], steps=3, cfg_scale=float("nan")), "cfg_scale nan is out of range"),
           (ImageRequest(seeds=[0], prompts=[PROMPT], steps=3), "this model is class-conditioned")]
    jobs = [good[0], bad[0][0], bad[1][0], good[1], bad[2][0], bad[3][0], good[2]]

    def send(client: GenerateClient, job: ImageRequest) -> np.ndarray | RemoteError:
        try:
            return client.generate(job)
        except RemoteError as exc:
            return exc

    def executions() -> dict[int, int]:
        client = GenerateClient(url, timeout_s=60)
        try:
            return batch_sizes_executed(client.statistics())
        finally:
            client.close()

    merged = 0
    for _round in range(3):  # on a very busy machine the long request may end before the burst queued
        before = executions()
        clients = [GenerateClient(url, timeout_s=180) for _ in range(len(jobs) + 1)]  # connected beforehand
        try:
            with ThreadPoolExecutor(len(clients)) as pool:
                # The largest request the model takes (16 images, 250 steps): long enough on a fast machine too.
                long_request = pool.submit(send, clients[-1], ImageRequest(seeds=[9] * LONG_ROWS,
                                                                           class_ids=[4] * LONG_ROWS, steps=250))
                time.sleep(0.3)
                results = list(pool.map(send, clients[:-1], jobs))
                assert isinstance(long_request.result(), np.ndarray)
        finally:
            for client in clients:
                client.close()
        after = executions()
        new = {size: count - before.get(size, 0) for size, count in after.items()}
        new[LONG_ROWS] -= 1  # the long request's own execution
        merged = max((size for size, count in new.items() if count > 0), default=0)
        if merged >= 3:
            break
    # Whether Triton merged the burst depends on the machine's timing (it did not on an idle two-core
    # machine with a fast long request); the merged-batch path itself is asserted deterministically by
    # tests/test_triton_model.py. What must hold either way: each request's own outcome.
    outcome = dict(zip(map(id, jobs), results, strict=True))
    for job, message in bad:
        error = outcome[id(job)]
        assert isinstance(error, RemoteError) and message in str(error), (message, error)
    runner, _ = open_runner(run.root, "onnxruntime", "fp32", threads=1)
    try:
        reference = sample_specs(runner, run.load_config(), [ImageSpec(seed=20 + i, class_id=i, steps=3)
                                                             for i in range(3)]).images
    finally:
        runner.close()
    for i, job in enumerate(good):
        served = outcome[id(job)]
        assert isinstance(served, np.ndarray) and served.shape == (1, 32, 32, 3), served
        assert psnr(reference[i], served[0]) >= 40.0


def _mixed_inputs() -> list[object]:
    """CLASS and PROMPT in one request (the client itself never sends this)."""
    import tritonclient.http as httpclient

    class_input = httpclient.InferInput("CLASS", [1, 1], "BYTES")
    class_input.set_data_from_numpy(np.asarray([[b"red circle"]], dtype=np.object_))
    prompt_input = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.asarray([[PROMPT.encode()]], dtype=np.object_))
    return [class_input, prompt_input]


@pytest.mark.slow
@needs_triton
def test_ensemble_text_encoder_runs_once_per_distinct_prompt(tmp_path: Path) -> None:
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs
    from mmgen_deploy.serve.client import ImageRequest, batch_sizes_executed
    from mmgen_deploy.serve.repository import RepositoryOptions, write_repository

    run = make_text_run(tmp_path / "run")
    _export(run)
    repo = tmp_path / "repo"
    write_repository(run.root, repo, RepositoryOptions(layout="ensemble", component_backend="python", threads=1))
    prompts = [PROMPT, "a small red circle", PROMPT]

    served, encoder_stats = ask_a_served_repository(
        repo, lambda client: client.generate(ImageRequest(seeds=[1, 2, 3], prompts=prompts, steps=2)),
        "mmgen_text_encoder")
    # One text encoder execution for the request: the two distinct prompts and the empty one.
    assert batch_sizes_executed(encoder_stats) == {3: 1}
    runner, _ = open_runner(run.root, "onnxruntime", "fp32", threads=1)
    try:
        reference = sample_specs(runner, run.load_config(),
                                    [ImageSpec(seed=s, prompt=p, steps=2) for s, p in zip([1, 2, 3], prompts,
                                                                                          strict=True)],
                                    tokenizer=run.load_tokenizer()).images
    finally:
        runner.close()
    assert np.array_equal(served, reference)
