"""`mmgen triton-repo`, `mmgen serve`, `mmgen client` against a real tritonserver (nvidia-pytriton wheel).

Server tests skip with a reason when no Triton can be found; nothing here fakes a server.
Every server started here listens on 127.0.0.1 only and is stopped by a finalizer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import pytest
from serve_helpers import (
    PORT_TAKEN,
    REPO_ROOT,
    ask_a_served_repository,
    child_env,
    ctrl_c_acts,
    needs_triton,
    with_free_loopback_ports,
)

from mmgen_deploy.cli.app import main
from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.errors import UsageError
from mmgen_deploy.rundir import save_run
from mmgen_deploy.serve import MODEL_NAME
from mmgen_deploy.serve.repository import RepositoryOptions, model_config_pbtxt, write_repository
from mmgen_deploy.serve.server import LONGEST_STOP_S, free_loopback_ports, summarize_failure


def _free_port() -> int:
    """A port free right now, for commands that fail before binding it; servers started here go
    through `with_free_loopback_ports`, which retries when another process took a port first."""
    return free_loopback_ports(1)[0]


T = TypeVar("T")


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has exited, only its parent has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


# -- repository writer (no server) ----------------------------------------------------------------
def test_repository_layout_config_and_readme(tmp_path, random_models) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    out = tmp_path / "repo"
    summary = write_repository(run.root, out, RepositoryOptions(max_batch_size=8, instances=2,
                                                                max_queue_delay_us=1000))
    model_dir = out / MODEL_NAME
    pbtxt = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in pbtxt and "max_batch_size: 8" in pbtxt
    assert "max_queue_delay_microseconds: 1000" in pbtxt and "count: 2" in pbtxt
    assert 'data_type: TYPE_UINT8 dims: [ 32, 32, 3 ]' in pbtxt
    assert 'key: "run_dir" value: { string_value: "run" }' in pbtxt
    # Copy mode: the weights inside the repository are byte-identical to the run's.
    for part in ("vqvae", "dit"):
        copied = model_dir / "1" / "run" / part / "model.safetensors"
        assert copied.read_bytes() == run.weights_path(part).read_bytes()
    assert (model_dir / "1" / "model.py").read_text().startswith('"""Triton Python-backend model')
    assert (model_dir / "1" / "mmgen_deploy" / "serve" / "triton_model.py").is_file()
    readme = (out / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver" in readme and "--model-repository=/models" in readme
    assert summary["num_classes"] == config.dit.num_classes

    # Reference mode points at the run instead of copying it.
    ref = write_repository(run.root, tmp_path / "ref", RepositoryOptions(artifacts="reference",
                                                                         vendor_source=False))
    assert ref["copied"] == [] and not (tmp_path / "ref" / MODEL_NAME / "1" / "run").exists()
    assert str(run.root.resolve()) in (tmp_path / "ref" / MODEL_NAME / "config.pbtxt").read_text()


def test_repository_refuses_bad_input_without_damage(tmp_path, random_models, capsys) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    with pytest.raises(UsageError, match=r"max_batch_size must be in 1\.\.1024") as refused:
        RepositoryOptions(max_batch_size=0).validate()
    assert describe_error(refused.value).startswith("--max-batch must be in 1..1024")  # the CLI's words for it
    with pytest.raises(UsageError) as refused:
        RepositoryOptions(default_steps=300).validate()
    assert describe_error(refused.value).startswith("--steps 300 must be in 1..250 (--max-steps)")
    with pytest.raises(UsageError, match="mmgen export"):  # the ensemble layout needs exported ONNX
        write_repository(run.root, tmp_path / "ens", RepositoryOptions(layout="ensemble"))
    assert not (tmp_path / "ens").exists()
    # An existing directory that is not an mmgen repository is never replaced.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, text = _cli(["triton-repo", str(run.root), "--out", str(precious)], capsys)
    assert code == 2 and "not an mmgen Triton repository" in text and "Traceback" not in text
    assert (precious / "notes.txt").read_text() == "keep me"
    code, text = _cli(["triton-repo", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and "does not exist" in text and not (tmp_path / "r").exists()
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--instance-kind", "tpu"],
                      capsys)
    assert code == 2 and "--instance-kind" in text
    # --threads as generate takes it: >= 1, or left out for the backend's default (the repository's 0).
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--threads", "0"], capsys)
    assert code == 2 and "--threads must be >= 1" in text and not (tmp_path / "r").exists()
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--max-batch", "1000000000"],
                      capsys)
    assert code == 2 and "--max-batch must be in 1..1024" in text and not (tmp_path / "r").exists()
    # --cache as generate takes it; a default policy needs the denoiser's parts, which this run lacks
    # (the torch backend builds them from the weights).
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--cache", "every:x"], capsys)
    assert code == 2 and "every:x: N must be a whole number >= 1" in text and not (tmp_path / "r").exists()
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--cache", "every:2"], capsys)
    assert code == 2 and "--cache every:2 needs the denoiser's parts" in text and "--components denoiser_parts" in text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    code, text = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "t"), "--cache", "every:2",
                       "--backend", "torch"], capsys)
    assert code == 0, text
    assert 'key: "default_cache" value: { string_value: "every:2" }' in \
        (tmp_path / "t" / MODEL_NAME / "config.pbtxt").read_text()
    # A second write replaces an old repository atomically.
    code, _ = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    assert 'key: "threads" value: { string_value: "0" }' in (tmp_path / "r" / MODEL_NAME / "config.pbtxt").read_text()
    code, _ = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r"), "--max-batch", "4"], capsys)
    assert code == 0 and "max_batch_size: 4" in (tmp_path / "r" / MODEL_NAME / "config.pbtxt").read_text()


def test_pbtxt_escapes_paths() -> None:
    text = model_config_pbtxt((8, 8, 3), RepositoryOptions(), 'C:\\runs\\"odd"')
    assert 'string_value: "C:\\\\runs\\\\\\"odd\\"" }' in text


def test_failure_summary_extracts_the_servers_error_lines() -> None:
    log = textwrap.dedent("""\
        I1124 14:15:03.956094 7693 server.cc:674]
        +----------------+---------+--------------------------------------------------+
        | Model          | Version | Status                                           |
        +----------------+---------+--------------------------------------------------+
        | mmgen_generate | 1       | UNAVAILABLE: Internal: RunDirError: missing      |
        |                |         | weight file /r/dit/model.safetensors             |
        +----------------+---------+--------------------------------------------------+
        error: creating server: Internal - failed to load all models
        """).splitlines()
    summary = summarize_failure(log)
    assert "model mmgen_generate: UNAVAILABLE: Internal: RunDirError: missing weight file" in summary
    assert "error: creating server: Internal - failed to load all models" in summary


# -- real tritonserver ------------------------------------------------------------------------
_ECHO_CONFIG = """backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
_ECHO_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * np.float32(2))]) for r in requests]
"""


def _echo_repository(root: Path) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(_ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(_ECHO_MODEL)
    return root


@needs_triton
def test_server_serves_tensors_intact_and_dies_with_its_parent(tmp_path) -> None:
    """The wheel's server runs a Python-backend model with exact tensors (numpy ABI), and a
    SIGKILLed parent takes the server (and its stub) with it."""
    repo = _echo_repository(tmp_path / "repo")

    def launch(ports: list[int]) -> tuple[subprocess.Popen[str], str]:
        script = textwrap.dedent(f"""
            import json, sys, time, urllib.request
            from pathlib import Path
            from mmgen_deploy.serve.server import TritonServer
            server = TritonServer(Path({str(repo)!r}), http_port={ports[0]}, grpc_port={ports[1]}, metrics_port=None)
            server.start(); server.wait_ready(60)
            body = json.dumps({{"inputs": [{{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.5, -2.0]}}]}})
            reply = urllib.request.urlopen(urllib.request.Request(
                server.http_url + "/v2/models/echo/infer", data=body.encode()), timeout=30).read()
            print(json.dumps({{"pid": server.pid, "reply": json.loads(reply)}}), flush=True)
            time.sleep(600)
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=child_env())
        line = child.stdout.readline() if child.stdout else ""
        if not line:  # the server did not start: say why (a taken port makes with_free_loopback_ports retry)
            child.kill()
            _, err = child.communicate(timeout=30)
            raise AssertionError(f"the launcher child printed nothing: {err[-2000:]}")
        return child, line

    child, line = with_free_loopback_ports(2, launch)
    server_pid = None
    try:
        info = json.loads(line)
        server_pid = int(info["pid"])
        assert info["reply"]["outputs"][0]["data"] == [3.0, -4.0]
        stubs = [int(p) for p in subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True,
                                                 text=True).stdout.split()]
        assert server_pid in stubs and len(stubs) >= 2  # the server and its Python-backend stub
        child.kill()  # SIGKILL: no cleanup code runs in the parent; PR_SET_PDEATHSIG must do it
        child.wait(timeout=10)
        for pid in stubs:
            assert _wait_gone(pid), f"process {pid} of the server's group outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
        if server_pid is not None and _pid_alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


@needs_triton
def test_serve_exits_with_the_servers_error_when_the_repository_fails_to_load(tmp_path, random_models) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    repo = tmp_path / "repo"
    write_repository(run.root, repo)
    (repo / MODEL_NAME / "1" / "run" / "dit" / "model.safetensors").unlink()

    def serve(ports: list[int]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "mmgen_deploy", "serve", str(repo), "--port", str(ports[0]),
                                 "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--ready-timeout",
                                 "60"], capture_output=True, text=True, env=child_env(), timeout=120)
        if PORT_TAKEN in result.stderr:
            raise AssertionError(result.stderr)
        return result

    result = with_free_loopback_ports(3, serve)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines and "missing weight file" in result.stderr and "mmgen_generate" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and " At: " not in lines[0]


@needs_triton
def test_serve_reports_a_busy_port_in_one_line(tmp_path, random_models) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        def serve(ports: list[int]) -> subprocess.CompletedProcess[str]:
            result = subprocess.run([sys.executable, "-m", "mmgen_deploy", "serve", str(run.root), "--port",
                                     str(port), "--grpc-port", str(ports[0]), "--metrics-port", "0"],
                                    capture_output=True, text=True, env=child_env(), timeout=120)
            if f":{ports[0]}' {PORT_TAKEN}" in result.stderr:  # the gRPC port, not the one held busy here
                raise AssertionError(result.stderr)
            return result

        result = with_free_loopback_ports(1, serve)
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}' already in use" in result.stderr and "CudaDriverHelper" not in result.stderr


# -- end to end: mmgen serve + concurrent clients vs in-process generation ------------------------
def _generate_cli_image(run_root: Path, out: Path, class_id: int, seed: int, steps: int, capsys) -> np.ndarray:
    """`mmgen generate --seed S --n 1`, run through the real entry point; returns its one PNG."""
    from PIL import Image

    code, text = _cli(["generate", str(run_root), "--class", str(class_id), "--n", "1", "--seed", str(seed),
                       "--steps", str(steps), "--backend", "onnxruntime", "--precision", "fp32",
                       "--threads", "1", "--out", str(out)], capsys)
    assert code == 0, text
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 1, pngs
    return np.asarray(Image.open(pngs[0]).convert("RGB"))


def _pending_requests(metrics_url: str) -> int:
    """Requests waiting in the mmgen_generate queue right now (Triton's pending-request gauge)."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{MODEL_NAME}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError(f"no pending-request gauge for {MODEL_NAME} in {metrics_url}")


def _start_serve(run_root: Path, endpoints_file: Path, ports: list[int]) -> subprocess.Popen[str]:
    """`mmgen serve` in the background, returned once it wrote its endpoints (ready)."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "mmgen_deploy", "serve", str(run_root), "--port", str(ports[0]), "--grpc-port",
         str(ports[1]), "--metrics-port", str(ports[2]), "--backend", "onnxruntime", "--precision", "fp32",
         "--threads", "1", "--max-batch", "8", "--json", str(endpoints_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), preexec_fn=ctrl_c_acts)
    deadline = time.monotonic() + 120
    while not endpoints_file.is_file():
        if serve.poll() is not None:
            raise AssertionError(f"mmgen serve exited early: {serve.communicate()[1]}")
        if time.monotonic() > deadline:
            serve.kill()
            raise AssertionError("mmgen serve not ready within 120 s")
        time.sleep(0.2)
    return serve


def _run_all(calls: list[Callable[[], T]], timeout_s: float = 180.0) -> list[T | BaseException]:
    """Each call in its own thread, started together; every result (or exception) once all are done."""
    barrier = threading.Barrier(len(calls))
    results: list[T | BaseException | None] = [None] * len(calls)

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = calls[index]()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [i for i, thread in enumerate(threads) if thread.is_alive()]
    assert not hung, f"requests {hung} got no answer within {timeout_s:.0f} s"
    return [r if r is not None else AssertionError("no result") for r in results]


@pytest.mark.slow
@needs_triton
def test_serve_end_to_end_concurrent_clients_match_generate(tmp_path, random_models, capsys) -> None:
    """`mmgen serve` answers concurrent clients with the images `mmgen generate` makes, and its dynamic
    batcher merges requests that wait together. The merge is not left to timing: the server's queue is
    watched (Triton's pending-request gauge) while requests queue behind a long one on the single model
    instance, and requests seen waiting together must have run in one execution."""
    from mmgen_deploy.export import export_run
    from mmgen_deploy.numerics import psnr
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, RemoteError, batch_sizes_executed

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    steps = 4
    endpoints_file = tmp_path / "endpoints.json"
    serve = with_free_loopback_ports(3, lambda ports: _start_serve(run.root, endpoints_file, ports))
    server_pid = None
    try:
        endpoints = json.loads(endpoints_file.read_text())
        server_pid = int(endpoints["pid"])
        url, metrics = endpoints["http"], endpoints["metrics"]

        def generate(job: ImageRequest) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                client = GenerateClient(url, timeout_s=120)
                try:
                    return client.generate(job)
                finally:
                    client.close()
            return call

        # A long request (250 steps) occupies the single model instance; seven requests (one with two
        # images) sent behind it by seven client threads queue meanwhile, and the queue is watched.
        jobs = [ImageRequest(seeds=[100 + i], class_ids=[(3 * i) % config.dit.num_classes], steps=steps)
                for i in range(6)]
        jobs.append(ImageRequest(seeds=[7, 8], class_ids=[1, 2], steps=steps))
        long_job = ImageRequest(seeds=[9], class_ids=[4], steps=250)

        def burst_behind_long_request() -> tuple[int, list[np.ndarray | BaseException]]:
            outcome: list[np.ndarray | BaseException] = []
            long_sender = threading.Thread(target=lambda: outcome.extend(_run_all([generate(long_job)])),
                                           daemon=True)
            long_sender.start()
            time.sleep(0.3)  # a head start only; what is asserted below does not depend on it
            burst: list[np.ndarray | BaseException] = []
            sender = threading.Thread(target=lambda: burst.extend(_run_all([generate(j) for j in jobs])),
                                      daemon=True)
            sender.start()
            most_waiting = 0
            while sender.is_alive() or long_sender.is_alive():
                most_waiting = max(most_waiting, _pending_requests(metrics))
                time.sleep(0.01)
            assert len(outcome) == 1 and len(burst) == len(jobs), "a client thread got no answer within 180 s"
            assert isinstance(outcome[0], np.ndarray), f"the long request failed: {outcome[0]!r}"
            return most_waiting, burst

        # If the long request happened to finish before three others queued (a very busy machine),
        # the round proves nothing either way and is sent again.
        rounds = 0
        while rounds < 3:
            rounds += 1
            most_waiting, burst = burst_behind_long_request()
            if most_waiting >= 3:
                break
        assert most_waiting >= 3, f"never more than {most_waiting} requests waited together in {rounds} rounds"
        results = dict(enumerate(burst))
        for index, job in enumerate(jobs):
            images = results[index]
            assert isinstance(images, np.ndarray), f"request {index} failed: {images!r}"
            assert images.shape == (len(job.seeds), 32, 32, 3) and images.dtype == np.uint8
        # Requests seen waiting together must have been merged: once the instance is free, the
        # dynamic batcher takes every waiting request that fits the max batch (8 images) at once, so
        # some execution held at least 3 images, more than any one request carries.
        client = GenerateClient(url, timeout_s=60)
        try:
            executed = batch_sizes_executed(client.statistics())
        finally:
            client.close()
        assert sum(size * count for size, count in executed.items()) == 9 * rounds, executed
        assert max(executed) >= 3, (most_waiting, executed)

        # Each served image equals `mmgen generate` with the same class, seed and steps.
        checks = [(0, 0), (len(jobs) - 1, 0), (len(jobs) - 1, 1)]
        for job_index, row in checks:
            job = jobs[job_index]
            assert job.class_ids is not None
            reference = _generate_cli_image(run.root, tmp_path / f"gen{job_index}_{row}", job.class_ids[row],
                                            job.seeds[row], steps, capsys)
            served = results[job_index]
            assert isinstance(served, np.ndarray)
            assert psnr(reference, served[row]) >= 40.0

        client = GenerateClient(url, timeout_s=60)
        try:
            # A malformed request gets an error; the server keeps serving.
            with pytest.raises(RemoteError, match="out of range"):
                client.generate(ImageRequest(seeds=[0], class_ids=[config.dit.num_classes + 5], steps=steps))
            with pytest.raises(RemoteError, match="steps 0 is out of range"):
                client.generate(ImageRequest(seeds=[0], class_ids=[0], steps=0))
            again = client.generate(ImageRequest(seeds=[100], class_ids=[0], steps=steps))
            first = results[0]
            # Same image alone as when it was batched with others (float kernels may differ by batch size).
            assert isinstance(first, np.ndarray) and psnr(first[0], again[0]) >= 40.0
        finally:
            client.close()
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                serve.wait(timeout=LONGEST_STOP_S + 30)  # + the interpreter's exit
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        if server_pid is not None and not _wait_gone(server_pid, 20):
            os.killpg(server_pid, signal.SIGKILL)
            pytest.fail("tritonserver outlived `mmgen serve`")
    assert serve.returncode == 0, "".join(stream.read() for stream in (serve.stdout, serve.stderr) if stream)
    assert server_pid is not None and not _pid_alive(server_pid)


@pytest.mark.slow
@needs_triton
def test_ensemble_layout_runs_the_loop_through_component_models(tmp_path, random_models) -> None:
    """--layout ensemble: denoiser/quantizer/decoder are Triton models (here the Python ONNX Runtime
    wrapper, since the wheel's server has no onnxruntime backend) and the loop calls them via BLS."""
    from mmgen_deploy.export import export_run
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample
    from mmgen_deploy.serve.client import ImageRequest, batch_sizes_executed

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    repo = tmp_path / "repo"
    summary = write_repository(run.root, repo, RepositoryOptions(layout="ensemble", component_backend="python",
                                                                 threads=1))
    assert set(summary["components"]) == {"denoiser", "quantizer", "decoder"}
    assert not (repo / MODEL_NAME / "1" / "run" / "dit" / "model.safetensors").exists()  # weights are in the ONNX
    # ONNX Runtime on the CPU: the decoder ships with its GroupNorms in the precise form (ort_graphs),
    # the graph the ONNX Runtime runner runs, so served images equal the runner's below bit for bit.
    decoder_ops = {n.op_type for n in onnx.load(str(repo / "mmgen_decoder" / "1" / "model.onnx")).graph.node}
    assert "InstanceNormalization" not in decoder_ops and "ReduceMean" in decoder_ops
    pbtxt = (repo / "mmgen_denoiser" / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in pbtxt and 'name: "t" data_type: TYPE_FP32 dims: [ 1 ] reshape' in pbtxt

    served, denoiser_stats = ask_a_served_repository(
        repo, lambda client: client.generate(ImageRequest(seeds=[5], class_ids=[3], steps=3)), "mmgen_denoiser")
    # 3 steps -> 3 denoiser executions of batch 2 (conditional + unconditional), all through Triton.
    assert batch_sizes_executed(denoiser_stats) == {2: 3}
    runner, _choice = open_runner(run.root, "onnxruntime", "fp32", threads=1)
    try:
        reference = sample(runner, config, [3], steps=3, seed=5).images
    finally:
        runner.close()
    assert np.array_equal(served, reference)


@pytest.mark.slow
@needs_triton
def test_a_cached_run_is_served_through_the_parts_and_matches_generate(tmp_path, random_models, capsys) -> None:
    """An ensemble repository of a run with the denoiser's parts serves them as component models too: a
    request under every:2 (here the repository's default) runs the head and tail every step and the body
    on steps 0, 2, 3 only, one under none the whole denoiser; `mmgen client --cache every:2` writes the
    image `mmgen generate --cache every:2` writes and records the policy."""
    from PIL import Image

    from mmgen_deploy.export import export_run
    from mmgen_deploy.io_utils import read_json
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, batch_sizes_executed
    from mmgen_deploy.serve.server import running_server

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    export_run(run.root, precisions=["fp32"], components=["denoiser_parts"])
    repo = tmp_path / "repo"
    summary = write_repository(run.root, repo, RepositoryOptions(layout="ensemble", component_backend="python",
                                                                 threads=1, cache="every:2"))
    assert set(summary["components"]) == {"denoiser", "quantizer", "decoder", "denoiser_head", "denoiser_body",
                                          "denoiser_tail"}
    steps = 4

    def serve(ports: list[int]) -> dict[str, dict[int, int]]:
        with running_server(repo, http_port=ports[0], grpc_port=ports[1], metrics_port=None,
                            python_paths=[REPO_ROOT]) as server:
            client = GenerateClient(server.http_url, timeout_s=120)
            try:
                client.generate(ImageRequest(seeds=[5], class_ids=[3], steps=steps))  # the default: every:2
                client.generate(ImageRequest(seeds=[5], class_ids=[3], steps=steps, cache="none"))
                executed = {name: batch_sizes_executed(dict(client.client.get_inference_statistics(
                    f"mmgen_{name}"))) for name in ("denoiser", "denoiser_head", "denoiser_body", "denoiser_tail")}
            finally:
                client.close()
            code, text = _cli(["client", server.http_url, "--class", "3", "--n", "1", "--seed", "5", "--steps",
                               str(steps), "--cache", "every:2", "--out", str(tmp_path / "served")], capsys)
            assert code == 0, text
            return executed

    executed = with_free_loopback_ports(2, serve)
    # Batch 2: the conditional and unconditional halves; one more execution of each part: the server's check,
    # on first use, that it can run them (at the smallest batch an engine takes, 2).
    assert executed == {"denoiser": {2: steps}, "denoiser_head": {2: steps + 1}, "denoiser_body": {2: 3 + 1},
                        "denoiser_tail": {2: steps + 1}}
    served_cache = read_json(tmp_path / "served" / "samples.json")["cache"]
    # The server decided which steps computed the body; the client names the policy, not made-up counts.
    assert served_cache["policy"] == "every:2" and served_cache["block_evaluations"] is None
    code, text = _cli(["generate", str(run.root), "--class", "3", "--n", "1", "--seed", "5", "--steps", str(steps),
                       "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1", "--cache", "every:2",
                       "--out", str(tmp_path / "generated")], capsys)
    assert code == 0, text

    def image(folder: Path) -> np.ndarray:
        pngs = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
        assert len(pngs) == 1, pngs
        return np.asarray(Image.open(pngs[0]).convert("RGB"))

    assert np.array_equal(image(tmp_path / "served"), image(tmp_path / "generated"))


@needs_triton
def test_missing_numpy1_for_the_wheels_stub_is_one_clear_line(tmp_path, random_models, capsys, monkeypatch) -> None:
    from mmgen_deploy.serve.server import _numpy_major, find_triton

    if find_triton().origin != "nvidia-pytriton" or _numpy_major() < 2:
        pytest.skip("only environments with numpy 2 need the numpy 1 directory for the wheel's stub")
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    monkeypatch.setenv("MMGEN_TRITON_NUMPY1", str(tmp_path / "no-numpy-here"))
    code, text = _cli(["serve", str(run.root), "--port", str(_free_port()), "--grpc-port", str(_free_port()),
                       "--metrics-port", "0"], capsys)
    assert code == 1 and "needs numpy<2" in text and "pip install --target" in text and "Traceback" not in text


@pytest.mark.slow
@needs_triton
def test_mmgen_client_on_an_audio_server_writes_the_wavs_generate_writes(tmp_path, audio_run, capsys) -> None:
    """A real server of an audio run: `mmgen client` writes generate's WAV file names with generate's
    sample data (ONNX Runtime FP32, one thread on both sides)."""
    from mmgen_deploy.data.wav import decode_wav
    from mmgen_deploy.sampling.generate import GenerateRequest, generate_to_folder
    from mmgen_deploy.serve.server import running_server

    generated = generate_to_folder(audio_run, GenerateRequest(
        classes=["square rising", "1"], n=1, steps=2, seed=3, backend="onnxruntime", precision="fp32", threads=1,
        out=tmp_path / "generated"))
    repo = tmp_path / "repo"
    write_repository(audio_run.root, repo, RepositoryOptions(backend="onnxruntime", precision="fp32", threads=1,
                                                             artifacts="reference", vendor_source=False))

    def client(ports: list[int]) -> tuple[int, str]:
        with running_server(repo, http_port=ports[0], grpc_port=ports[1], metrics_port=None,
                            python_paths=[REPO_ROOT]) as server:
            return _cli(["client", server.http_url, "--class", "square rising", "--class", "1", "--n", "1",
                         "--steps", "2", "--seed", "3", "--out", str(tmp_path / "served")], capsys)

    code, output = with_free_loopback_ports(2, client)
    assert code == 0, output
    assert "wrote 2 clips to" in " ".join(output.split()), output  # the console wraps long lines
    sidecar = json.loads((tmp_path / "served" / "samples.json").read_text())
    assert [e["file"] for e in sidecar["images"]] == [e["file"] for e in generated.sidecar["images"]]
    for entry in sidecar["images"]:
        served = decode_wav((tmp_path / "served" / entry["file"]).read_bytes())
        expected = decode_wav((tmp_path / "generated" / entry["file"]).read_bytes())
        np.testing.assert_array_equal(served.samples, expected.samples)


@pytest.mark.slow
@needs_triton
def test_an_audio_ensemble_runs_the_vocoder_as_a_component_model(tmp_path, audio_run) -> None:
    """--layout ensemble of an audio run: the vocoder is `mmgen_vocoder`, and the waveform the BLS loop
    returns equals the in-process ONNX Runtime loop's."""
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs
    from mmgen_deploy.serve.client import ImageRequest, batch_sizes_executed

    repo = tmp_path / "repo"
    summary = write_repository(audio_run.root, repo, RepositoryOptions(layout="ensemble", component_backend="python",
                                                                       threads=1))
    assert "vocoder" in summary["components"]

    served, vocoder_stats = ask_a_served_repository(
        repo, lambda client: client.generate_outputs(ImageRequest(seeds=[5], class_ids=[3], steps=2), audio=True)[1],
        "mmgen_vocoder")
    assert batch_sizes_executed(vocoder_stats) == {1: 1}
    runner, _choice = open_runner(audio_run.root, "onnxruntime", "fp32", threads=1)
    try:
        reference = sample_specs(runner, audio_run.load_config(), [ImageSpec(seed=5, class_id=3, steps=2)]).audio
    finally:
        runner.close()
    assert served is not None and reference is not None
    np.testing.assert_array_equal(served, reference)
