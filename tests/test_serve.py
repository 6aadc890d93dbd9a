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
from pathlib import Path

import numpy as np
import pytest

from mmgen_deploy.cli.app import main
from mmgen_deploy.errors import UsageError
from mmgen_deploy.rundir import save_run
from mmgen_deploy.serve import MODEL_NAME
from mmgen_deploy.serve.repository import RepositoryOptions, model_config_pbtxt, write_repository
from mmgen_deploy.serve.server import summarize_failure

REPO_ROOT = Path(__file__).resolve().parents[1]


def _triton_missing_reason() -> str | None:
    from mmgen_deploy.errors import MMGenError
    from mmgen_deploy.serve.server import find_triton, prepare_stub_python

    try:
        install = find_triton()
        if install.origin == "nvidia-pytriton":
            import tempfile

            with tempfile.TemporaryDirectory() as scratch:
                prepare_stub_python(install, Path(scratch))
    except MMGenError as exc:
        return f"no usable Triton server: {exc}"
    return None


TRITON_MISSING = _triton_missing_reason()
needs_triton = pytest.mark.skipif(TRITON_MISSING is not None, reason=TRITON_MISSING or "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


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
    with pytest.raises(UsageError, match="--max-batch"):
        RepositoryOptions(max_batch_size=0).validate()
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
    # A second write replaces an old repository atomically.
    code, _ = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "r")], capsys)
    assert code == 0
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


def _open_runner_missing() -> str | None:
    try:
        from mmgen_deploy.runtime import open_runner  # noqa: F401
    except ImportError:
        return "needs mmgen_deploy.runtime.open_runner (the sampling runtime) on this branch"
    return None


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
    port = _free_port()
    script = textwrap.dedent(f"""
        import json, sys, time, urllib.request
        from pathlib import Path
        from mmgen_deploy.serve.server import TritonServer
        server = TritonServer(Path({str(repo)!r}), http_port={port}, grpc_port={_free_port()}, metrics_port=None)
        server.start(); server.wait_ready(60)
        body = json.dumps({{"inputs": [{{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.5, -2.0]}}]}})
        reply = urllib.request.urlopen(urllib.request.Request(
            server.http_url + "/v2/models/echo/infer", data=body.encode()), timeout=30).read()
        print(json.dumps({{"pid": server.pid, "reply": json.loads(reply)}}), flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_env())
    server_pid = None
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line, "the launcher child printed nothing (server did not start?)"
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
    ports = [str(_free_port()) for _ in range(3)]
    result = subprocess.run([sys.executable, "-m", "mmgen_deploy", "serve", str(repo), "--port", ports[0],
                             "--grpc-port", ports[1], "--metrics-port", ports[2], "--ready-timeout", "60"],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines and "missing weight file" in result.stderr and "mmgen_generate" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and " At: " not in lines[0]


@needs_triton
def test_serve_reports_a_busy_port_in_one_line(tmp_path, random_models) -> None:
    if _open_runner_missing():
        pytest.skip(_open_runner_missing() or "")  # the model loads before Triton opens its ports
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "mmgen_deploy", "serve", str(run.root), "--port", str(port),
                                 "--grpc-port", str(_free_port()), "--metrics-port", "0"],
                                capture_output=True, text=True, env=_env(), timeout=120)
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


@pytest.mark.slow
@needs_triton
def test_serve_end_to_end_concurrent_clients_match_generate(tmp_path, random_models, capsys) -> None:
    missing = _open_runner_missing()
    if missing:
        pytest.skip(missing)
    from mmgen_deploy.export import export_run
    from mmgen_deploy.parity.metrics import psnr
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, RemoteError, batch_sizes_executed

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    steps = 4
    ports = [_free_port() for _ in range(3)]
    endpoints_file = tmp_path / "endpoints.json"
    # A long queue delay makes the dynamic batcher merge the concurrent requests reliably.
    serve = subprocess.Popen(
        [sys.executable, "-m", "mmgen_deploy", "serve", str(run.root), "--port", str(ports[0]), "--grpc-port",
         str(ports[1]), "--metrics-port", str(ports[2]), "--backend", "onnxruntime", "--precision", "fp32",
         "--threads", "1", "--max-batch", "8", "--max-queue-delay-us", "300000", "--json", str(endpoints_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    server_pid = None
    try:
        deadline = time.monotonic() + 120
        while not endpoints_file.is_file():
            assert serve.poll() is None, f"mmgen serve exited early: {serve.communicate()[1]}"
            assert time.monotonic() < deadline, "mmgen serve not ready within 120 s"
            time.sleep(0.2)
        endpoints = json.loads(endpoints_file.read_text())
        server_pid = int(endpoints["pid"])
        url = endpoints["http"]
        assert url == f"http://127.0.0.1:{ports[0]}"

        # Several client threads at once; one request carries two images.
        jobs = [ImageRequest(seeds=[100 + i], class_ids=[(3 * i) % config.dit.num_classes], steps=steps)
                for i in range(6)]
        jobs.append(ImageRequest(seeds=[7, 8], class_ids=[1, 2], steps=steps))
        barrier = threading.Barrier(len(jobs))
        results: dict[int, np.ndarray | BaseException] = {}

        def worker(index: int) -> None:
            client = GenerateClient(url, timeout_s=120)
            try:
                barrier.wait(timeout=30)
                results[index] = client.generate(jobs[index])
            except BaseException as exc:
                results[index] = exc
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        for index, job in enumerate(jobs):
            images = results[index]
            assert isinstance(images, np.ndarray), f"request {index} failed: {images!r}"
            assert images.shape == (len(job.seeds), 32, 32, 3) and images.dtype == np.uint8

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

        # The dynamic batcher merged requests into executions of more than one image.
        client = GenerateClient(url, timeout_s=60)
        try:
            executed = batch_sizes_executed(client.statistics())
            assert max(executed) > 1, executed
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
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        if server_pid is not None and not _wait_gone(server_pid, 20):
            os.killpg(server_pid, signal.SIGKILL)
            pytest.fail("tritonserver outlived `mmgen serve`")
    assert serve.returncode == 0, serve.stderr.read() if serve.stderr else ""
    assert server_pid is not None and not _pid_alive(server_pid)


@pytest.mark.slow
@needs_triton
def test_ensemble_layout_runs_the_loop_through_component_models(tmp_path, random_models) -> None:
    """--layout ensemble: denoiser/quantizer/decoder are Triton models (here the Python ONNX Runtime
    wrapper, since the wheel's server has no onnxruntime backend) and the loop calls them via BLS."""
    missing = _open_runner_missing()
    if missing:
        pytest.skip(missing)
    from mmgen_deploy.export import export_run
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest, batch_sizes_executed
    from mmgen_deploy.serve.server import running_server

    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    repo = tmp_path / "repo"
    summary = write_repository(run.root, repo, RepositoryOptions(layout="ensemble", component_backend="python",
                                                                 threads=1))
    assert set(summary["components"]) == {"denoiser", "quantizer", "decoder"}
    assert not (repo / MODEL_NAME / "1" / "run" / "dit" / "model.safetensors").exists()  # weights are in the ONNX
    pbtxt = (repo / "mmgen_denoiser" / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in pbtxt and 'name: "t" data_type: TYPE_FP32 dims: [ 1 ] reshape' in pbtxt

    with running_server(repo, http_port=_free_port(), grpc_port=_free_port(), metrics_port=None,
                        python_paths=[REPO_ROOT]) as server:
        client = GenerateClient(server.http_url, timeout_s=120)
        try:
            served = client.generate(ImageRequest(seeds=[5], class_ids=[3], steps=3))
            denoiser_stats = dict(client.client.get_inference_statistics("mmgen_denoiser"))
        finally:
            client.close()
    # 3 steps -> 3 denoiser executions of batch 2 (conditional + unconditional), all through Triton.
    assert batch_sizes_executed(denoiser_stats) == {2: 3}
    runner, _choice = open_runner(run.root, "onnxruntime", "fp32", threads=1)
    try:
        reference = sample(runner, config, [3], steps=3, seed=5).images
    finally:
        runner.close()
    assert np.array_equal(served, reference)


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
