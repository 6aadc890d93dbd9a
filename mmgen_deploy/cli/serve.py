"""`mmgen triton-repo`, `mmgen serve`, `mmgen client`: generation behind NVIDIA Triton Inference Server."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import typer

from mmgen_deploy.cli.common import console, emit_json
from mmgen_deploy.errors import UsageError
from mmgen_deploy.specs import RUN_PRECISIONS

_BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")
_PRECISIONS = ("auto", *RUN_PRECISIONS)


def _repo_options(max_batch: int, instances: int, instance_kind: str, queue_delay_us: int, backend: str,
                  precision: str, steps: int, guidance: float, max_steps: int, artifacts: str,
                  layout: str, threads: int, component_backend: str = "onnxruntime") -> object:
    from mmgen_deploy.serve.repository import RepositoryOptions

    if backend not in _BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if precision not in _PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    options = RepositoryOptions(max_batch_size=max_batch, instances=instances, instance_kind=instance_kind,
                                max_queue_delay_us=queue_delay_us, backend=backend, precision=precision,
                                default_steps=steps, default_guidance=guidance, max_steps=max_steps,
                                artifacts=artifacts, layout=layout, threads=threads,
                                component_backend=component_backend)
    options.validate()
    return options


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"{name} {port} is not a TCP port", "use 1..65535")


def register(app: typer.Typer) -> None:
    @app.command("triton-repo", help=(
        "Write a Triton Inference Server model repository for a run: model `mmgen_generate` (class ids or class "
        "names, seed, steps, guidance in; uint8 images out), its config.pbtxt (dynamic batching, instance groups, "
        "max batch), the run's artifacts, and a README saying how to serve it with the official Triton container "
        "on a GPU host."))
    def triton_repo(
        run_dir: Path = typer.Argument(..., help="Run directory to serve."),
        out: Path = typer.Option(..., "--out", "-o", help="Repository directory to write (replaced atomically)."),
        max_batch: int = typer.Option(16, "--max-batch", help="Most images Triton merges into one sampling batch."),
        instances: int = typer.Option(1, "--instances", help="Model instances (parallel sampling loops) per server."),
        instance_kind: str = typer.Option("cpu", "--instance-kind",
                                          help="cpu: instances placed by count (the model picks its device); "
                                               "gpu: one group of instances per visible GPU."),
        queue_delay_us: int = typer.Option(20000, "--max-queue-delay-us",
                                           help="How long the dynamic batcher waits to fill a batch."),
        backend: str = typer.Option("auto", "--backend",
                                    help="Inference backend inside the server: auto (TensorRT engines, else ONNX "
                                         "Runtime CUDA, else OpenVINO BF16 on BF16 CPUs, else ONNX Runtime CPU), "
                                         "tensorrt, onnxruntime, openvino, torch."),
        precision: str = typer.Option("auto", "--precision",
                                      help="auto (fp16 on GPUs, bf16 with OpenVINO on BF16 CPUs, else fp32), "
                                           "fp32 or fp16 exported models, or bf16 (on the fp32 set)."),
        threads: int = typer.Option(0, "--threads", help="CPU threads per instance (0 = backend default)."),
        steps: int = typer.Option(50, "--steps", help="Default sampling steps when a request sends none."),
        guidance: float = typer.Option(4.0, "--guidance", help="Default guidance scale when a request sends none."),
        max_steps: int = typer.Option(250, "--max-steps", help="Requests asking for more steps are refused."),
        artifacts: str = typer.Option("copy", "--artifacts",
                                      help="copy: the run's weights/ONNX/engines go into the repository "
                                           "(self-contained, for containers); reference: absolute path to RUN_DIR."),
        layout: str = typer.Option("python", "--layout",
                                   help="python: one Python-backend model runs the whole sampling loop. "
                                        "ensemble: also the denoiser, quantizer and decoder as Triton models "
                                        "(exported ONNX), which the loop calls as BLS requests."),
        component_backend: str = typer.Option("onnxruntime", "--component-backend",
                                              help="Ensemble components on Triton's onnxruntime backend (official "
                                                   "container), or python: an ONNX Runtime wrapper for servers "
                                                   "without it (the nvidia-pytriton wheel)."),
        json_out: str | None = typer.Option(None, "--json", metavar="FILE", help="Write a summary as JSON."),
    ) -> None:
        from mmgen_deploy.serve.repository import RepositoryOptions, write_repository

        options = _repo_options(max_batch, instances, instance_kind, queue_delay_us, backend, precision, steps,
                                guidance, max_steps, artifacts, layout, threads, component_backend)
        assert isinstance(options, RepositoryOptions)
        summary = write_repository(run_dir, out, options)
        console.print(f"wrote Triton repository [bold]{out}[/] (model {summary['model']}, "
                      f"artifacts {summary['artifacts']}); serve it with `mmgen serve {out}` "
                      f"or the container command in {out / 'README.md'}")
        emit_json(summary, json_out)

    @app.command("serve", help=(
        "Start a real Triton Inference Server on the run (loopback by default) and block until Ctrl-C.\n\n"
        "Uses a system-wide tritonserver if there is one, else the binary and Python backend inside the "
        "nvidia-pytriton wheel (pip install 'mmgen-deploy\\[serve]'). Ready only once the model is loaded; exits "
        "non-zero with the server's own error line if the repository does not load. The server is stopped on "
        "Ctrl-C, SIGTERM, or when this process dies."))
    def serve(
        target: Path = typer.Argument(..., metavar="RUN_DIR",
                                      help="Run directory (a repository is written to a temp dir) or a "
                                           "repository written by `mmgen triton-repo`."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for all)."),
        port: int = typer.Option(8000, "--port", help="HTTP port."),
        grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
        metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (0 = off)."),
        max_batch: int = typer.Option(16, "--max-batch", help="Most images merged into one sampling batch."),
        instances: int = typer.Option(1, "--instances", help="Model instances."),
        queue_delay_us: int = typer.Option(20000, "--max-queue-delay-us", help="Dynamic batcher wait."),
        backend: str = typer.Option("auto", "--backend", help="auto, tensorrt, onnxruntime, openvino or torch."),
        precision: str = typer.Option("auto", "--precision", help="auto, fp32, fp16 or bf16."),
        threads: int = typer.Option(0, "--threads", help="CPU threads per instance (0 = backend default)."),
        ready_timeout: float = typer.Option(180.0, "--ready-timeout", help="Seconds to wait for the models to load."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Echo the server log."),
        log_file: Path | None = typer.Option(None, "--log-file", help="Append the server log to this file."),
        json_out: str | None = typer.Option(None, "--json", metavar="FILE",
                                            help="Once ready, write endpoints and the server pid as JSON."),
    ) -> None:
        from mmgen_deploy.serve import MODEL_NAME
        from mmgen_deploy.serve.repository import RepositoryOptions, write_repository
        from mmgen_deploy.serve.server import ServerError, TritonServer

        for name, value in (("--port", port), ("--grpc-port", grpc_port)):
            _check_port(name, value)
        if metrics_port:
            _check_port("--metrics-port", metrics_port)
        if len({port, grpc_port, metrics_port or -1}) != 3:
            raise UsageError("--port, --grpc-port and --metrics-port must differ")
        package_root = Path(__file__).resolve().parents[2]
        with tempfile.TemporaryDirectory(prefix="mmgen-serve-") as scratch:
            if (target / MODEL_NAME / "config.pbtxt").is_file():
                repository = target
            else:
                options = _repo_options(max_batch, instances, "cpu", queue_delay_us, backend, precision, 50, 4.0,
                                        250, "reference", "python", threads)
                assert isinstance(options, RepositoryOptions)
                repository = Path(scratch) / "repository"
                write_repository(target, repository, RepositoryOptions(**{**options.__dict__,
                                                                          "vendor_source": False}))
            server = TritonServer(repository, host=host, http_port=port, grpc_port=grpc_port,
                                  metrics_port=metrics_port or None, log_file=log_file,
                                  python_paths=[package_root], echo=(lambda line: console.print(
                                      line, markup=False, highlight=False, soft_wrap=True)) if verbose else None)

            def _terminate(signum: int, frame: FrameType | None) -> None:
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                with console.status(f"starting tritonserver ({server.install.origin}) and loading {MODEL_NAME}..."):
                    server.start()
                    server.wait_ready(ready_timeout)
                endpoints = {"http": server.http_url, "grpc": server.grpc_url,
                             "metrics": f"http://{host}:{metrics_port}/metrics" if metrics_port else None,
                             "model": MODEL_NAME, "pid": server.pid, "repository": str(repository),
                             "tritonserver": str(server.install.binary)}
                console.print(f"[bold green]ready[/]: model {MODEL_NAME}  HTTP {server.http_url}  gRPC "
                              f"{server.grpc_url}" + (f"  metrics {endpoints['metrics']}" if metrics_port else "")
                              + f"  (tritonserver pid {server.pid}; Ctrl-C stops)", soft_wrap=True)
                emit_json(endpoints, json_out)
                assert server.process is not None
                while server.process.poll() is None:
                    time.sleep(0.5)
                from mmgen_deploy.serve.server import summarize_failure

                raise ServerError(f"tritonserver stopped unexpectedly (exit code {server.process.returncode}): "
                                  f"{summarize_failure(list(server.log_tail))}")
            except KeyboardInterrupt:
                console.print("stopping tritonserver...")
            finally:
                server.stop()
                signal.signal(signal.SIGTERM, previous)
        console.print("tritonserver stopped")
        sys.exit(0)

    @app.command("client", help=(
        "Request images from a running `mmgen serve` (or any Triton serving an `mmgen triton-repo` repository) "
        "and write them as PNGs. All images go in one request; image i uses seed SEED+i."))
    def client(
        url: str = typer.Argument("http://127.0.0.1:8000", help="HTTP endpoint of `mmgen serve` / Triton."),
        class_ids: list[int] = typer.Option(None, "--class", "-c", help="Class id (repeat for several; cycled)."),
        prompts: list[str] = typer.Option(None, "--prompt", "-p", help="Class name instead of --class (repeatable)."),
        n: int = typer.Option(1, "--n", "-n", help="Number of images."),
        seed: int = typer.Option(0, "--seed", help="Image i uses seed SEED+i (= `mmgen generate --seed SEED+i`)."),
        steps: int | None = typer.Option(None, "--steps", help="Sampling steps (server default if omitted)."),
        guidance: float | None = typer.Option(None, "--guidance", help="Guidance scale (server default if omitted)."),
        out: Path = typer.Option(Path("samples"), "--out", "-o", help="Directory for the PNG files."),
        timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the server."),
        json_out: str | None = typer.Option(None, "--json", metavar="FILE", help="Write what was written as JSON."),
    ) -> None:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from mmgen_deploy.io_utils import atomic_path
        from mmgen_deploy.serve.client import GenerateClient, ImageRequest

        if n < 1:
            raise UsageError(f"--n must be >= 1, got {n}")
        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}")
        if bool(class_ids) == bool(prompts):
            raise UsageError("give --class ID or --prompt NAME (one of the two)", "e.g. --class 3 --n 4")
        seeds = [seed + i for i in range(n)]
        if class_ids:
            request = ImageRequest(seeds=seeds, class_ids=[class_ids[i % len(class_ids)] for i in range(n)],
                                   steps=steps, guidance=guidance)
        else:
            request = ImageRequest(seeds=seeds, prompts=[prompts[i % len(prompts)] for i in range(n)],
                                   steps=steps, guidance=guidance)
        remote = GenerateClient(url, timeout_s=timeout)
        try:
            started = time.perf_counter()
            images = remote.generate(request)
            elapsed = time.perf_counter() - started
        finally:
            remote.close()
        labels = request.class_ids if request.class_ids is not None else request.prompts
        assert labels is not None
        written = []
        for i, (image, label, image_seed) in enumerate(zip(images, labels, seeds, strict=True)):
            path = out / f"{i:04d}_class{label}_seed{image_seed}.png"
            info = PngInfo()  # the same kind of text chunks as `mmgen generate` writes
            for key, value in (("class", label), ("seed", image_seed), ("steps", steps), ("guidance", guidance),
                               ("server", url)):
                if value is not None:
                    info.add_text(key, str(value))
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
            written.append(str(path))
        console.print(f"wrote {len(written)} image(s) to {out} in {elapsed:.2f} s from {url}")
        emit_json({"url": url, "files": written, "seconds": elapsed, "seeds": seeds, "labels": labels}, json_out)
