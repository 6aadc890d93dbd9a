"""`mmgen triton-repo`, `mmgen serve`, `mmgen client`: generation behind NVIDIA Triton Inference Server."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from mmgen_deploy.cli.common import (
    CLASS_OPTION,
    CLIENT_CACHE_OPTION,
    PROMPT_OPTION,
    PROMPTS_FILE_OPTION,
    RECIPE_OPTION,
    SERVED_CACHE_OPTION,
    checked_json_destination,
    console,
    emit_json,
    json_option,
    plural,
    refuse_recipe_conflicts,
    sample_noun,
    sampling_seed_option,
)
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.runtime.backends import backend_help, precision_help
from mmgen_deploy.specs import RUN_PRECISIONS

if TYPE_CHECKING:
    from mmgen_deploy.sampling.loop import SampleResult
    from mmgen_deploy.serve.client import GenerateClient, ServedModel
    from mmgen_deploy.serve.repository import RepositoryOptions

_PRECISIONS = ("auto", *RUN_PRECISIONS)


def _repo_options(*, backend: str, precision: str, sampler: str = SAMPLING.sampler, samplers: str = "all",
                  threads: int | None = None, **fields: object) -> RepositoryOptions:
    from mmgen_deploy.runtime.select import check_backend_name
    from mmgen_deploy.sampling.schedulers import SAMPLERS
    from mmgen_deploy.serve.repository import RepositoryOptions

    check_backend_name(backend)
    if precision not in _PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    allowed = SAMPLERS if samplers == "all" else tuple(s.strip() for s in samplers.split(",") if s.strip())
    options = RepositoryOptions(backend=backend, precision=precision, sampler=sampler, samplers=allowed,
                                threads=_threads(threads), **fields)  # type: ignore[arg-type]
    options.validate()
    return options


# The served options a recipe sets (parameter name -> option): the engine, and the defaults of requests that
# send no settings of their own (a request's own steps, guidance, sampler or cache still apply to it).
SERVED_RECIPE_SETS = {"backend": "--backend", "precision": "--precision", "threads": "--threads",
                      "steps": "--steps", "cfg_scale": "--cfg-scale", "sampler": "--sampler", "cache": "--cache"}


@dataclass(frozen=True)
class ServedSettings:
    """The engine a server samples on and the defaults of requests that send no settings of their own."""

    backend: str
    precision: str
    threads: int | None
    steps: int
    cfg_scale: float
    sampler: str
    cache: str


def _with_recipe(ctx: typer.Context, run_dir: Path) -> tuple[Path, ServedSettings]:
    """The run to serve (the tuned run, or the student the recipe chose) and the served settings from its
    recipe.json; an option the recipe sets given as well is refused."""
    from mmgen_deploy.tuning.recipe import load_recipe

    refuse_recipe_conflicts(ctx, SERVED_RECIPE_SETS)
    chosen = load_recipe(run_dir)
    engine, settings = chosen.candidate.engine, chosen.candidate.settings
    console.print(f"recipe: {chosen.candidate.label()} ({chosen.path}); requests' own settings still apply")
    return chosen.model_dir, ServedSettings(engine.backend, engine.precision, chosen.threads, settings.steps,
                                            settings.cfg_scale, settings.sampler, settings.cache)


_SAMPLER_HELP = "Sampler when a request names none: ddim, ddpm or dpmpp-2m."
_SAMPLERS_HELP = "Samplers requests may ask for: all, or a comma list such as ddim,dpmpp-2m."

# The options `triton-repo` and `serve` share: one definition each, so both say the same.
_MAX_BATCH_OPT = typer.Option(SAMPLING.batch_size, "--max-batch",
                              help="Most images Triton merges into one sampling batch.")
_INSTANCES_OPT = typer.Option(1, "--instances", help="Model instances (parallel sampling loops) per server.")
_QUEUE_DELAY_OPT = typer.Option(20000, "--max-queue-delay-us",
                                help="How long the dynamic batcher waits to fill a batch (microseconds).")
_BACKEND_OPT = typer.Option("auto", "--backend", help=f"Inference backend inside the server: {backend_help()}")
_PRECISION_OPT = typer.Option("auto", "--precision",
                              help=f"auto (the backend's own) or {precision_help(backend_default=False)}")
_THREADS_OPT = typer.Option(None, "--threads", help="CPU threads per instance, as in generate (default: the "
                                                   "backend's).")
_STEPS_OPT = typer.Option(SAMPLING.steps, "--steps", help="Default sampling steps when a request sends none.")
_CFG_SCALE_OPT = typer.Option(SAMPLING.cfg_scale, "--cfg-scale",
                              help="Default guidance scale when a request sends none.")
_SAMPLER_OPT = typer.Option(SAMPLING.sampler, "--sampler", help=_SAMPLER_HELP)
_SAMPLERS_OPT = typer.Option("all", "--samplers", help=_SAMPLERS_HELP)


def _threads(threads: int | None) -> int:
    """--threads as `generate` takes it (unset: the backend's default; else >= 1) -> the repository's
    field, where 0 stands for the backend's default."""
    if threads is None:
        return 0
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}", "leave it out for the backend's default")
    return threads


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"{name} {port} is not a TCP port", "use 1..65535")


def register(app: typer.Typer) -> None:
    @app.command("triton-repo", help=(
        "Write a Triton Inference Server model repository for a run: model `mmgen_generate` (class names or ids, "
        "or text prompts; seed, index, steps, cfg scale, sampler in; uint8 images out), its config.pbtxt "
        "(dynamic batching, instance groups, "
        "max batch), the run's artifacts, and a README saying how to serve it with the official Triton container "
        "on a GPU host."))
    def triton_repo(
        ctx: typer.Context,
        run_dir: Path = typer.Argument(..., help="Run directory to serve."),
        out: Path = typer.Option(..., "--out", "-o", help="Repository directory to write (replaced atomically)."),
        max_batch: int = _MAX_BATCH_OPT,
        instances: int = _INSTANCES_OPT,
        instance_kind: str = typer.Option("cpu", "--instance-kind",
                                          help="cpu: instances placed by count (the model picks its device); "
                                               "gpu: one group of instances per visible GPU."),
        queue_delay_us: int = _QUEUE_DELAY_OPT,
        backend: str = _BACKEND_OPT,
        precision: str = _PRECISION_OPT,
        threads: int | None = _THREADS_OPT,
        steps: int = _STEPS_OPT,
        cfg_scale: float = _CFG_SCALE_OPT,
        sampler: str = _SAMPLER_OPT,
        samplers: str = _SAMPLERS_OPT,
        cache: str = SERVED_CACHE_OPTION,
        max_steps: int = typer.Option(SAMPLING.max_steps, "--max-steps",
                                      help="Requests asking for more steps are refused."),
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
        json_out: str | None = json_option("a summary"),
        recipe: bool = RECIPE_OPTION,
    ) -> None:
        from mmgen_deploy.serve.repository import write_repository

        served = ServedSettings(backend, precision, threads, steps, cfg_scale, sampler, cache)
        if recipe:
            run_dir, served = _with_recipe(ctx, run_dir)
        options = _repo_options(backend=served.backend, precision=served.precision, sampler=served.sampler,
                                samplers=samplers, max_batch_size=max_batch, instances=instances,
                                instance_kind=instance_kind, max_queue_delay_us=queue_delay_us,
                                default_steps=served.steps, default_cfg_scale=served.cfg_scale, max_steps=max_steps,
                                artifacts=artifacts, layout=layout, threads=served.threads,
                                component_backend=component_backend, cache=served.cache)
        summary = write_repository(run_dir, out, options)
        console.print(f"wrote Triton repository [bold]{out}[/] (model {summary['model']}, "
                      f"artifacts {summary['artifacts']}); serve it with `mmgen serve {out}` "
                      f"or the container command in {out / 'README.md'}")
        emit_json(summary, json_out)

    @app.command("serve", help=(
        "Start a real Triton Inference Server on the run (loopback by default) and block until Ctrl-C.\n\n"
        "Uses a system-wide tritonserver if there is one, else the binary and Python backend inside the "
        "nvidia-pytriton wheel (pip install 'mmgen-deploy[serve]'). Ready only once the model is loaded; exits "
        "non-zero with the server's own error line if the repository does not load. The server is stopped on "
        "Ctrl-C, SIGTERM, or when this process dies."))
    def serve(
        ctx: typer.Context,
        target: Path = typer.Argument(..., metavar="RUN_DIR",
                                      help="Run directory (a repository is written to a temp dir) or a "
                                           "repository written by `mmgen triton-repo`."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for all)."),
        port: int = typer.Option(8000, "--port", help="HTTP port."),
        grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
        metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (0 = off)."),
        max_batch: int = _MAX_BATCH_OPT,
        instances: int = _INSTANCES_OPT,
        queue_delay_us: int = _QUEUE_DELAY_OPT,
        backend: str = _BACKEND_OPT,
        precision: str = _PRECISION_OPT,
        threads: int | None = _THREADS_OPT,
        steps: int = _STEPS_OPT,
        cfg_scale: float = _CFG_SCALE_OPT,
        sampler: str = _SAMPLER_OPT,
        samplers: str = _SAMPLERS_OPT,
        cache: str = SERVED_CACHE_OPTION,
        ready_timeout: float = typer.Option(180.0, "--ready-timeout", help="Seconds to wait for the models to load."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Echo the server log."),
        log_file: Path | None = typer.Option(None, "--log-file", help="Append the server log to this file."),
        json_out: str | None = typer.Option(None, "--json", metavar="FILE", callback=checked_json_destination,
                                            help="Once ready, write endpoints and the server pid as JSON."),
        recipe: bool = RECIPE_OPTION,
    ) -> None:
        from mmgen_deploy.serve import MODEL_NAME
        from mmgen_deploy.serve.repository import write_repository
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
                if recipe:
                    raise UsageError(f"{target} is a Triton repository: its settings were fixed when it was written",
                                     "pass --recipe to `mmgen triton-repo RUN_DIR`, or serve RUN_DIR --recipe")
                repository = target
            else:
                served = ServedSettings(backend, precision, threads, steps, cfg_scale, sampler, cache)
                if recipe:
                    target, served = _with_recipe(ctx, target)
                options = _repo_options(backend=served.backend, precision=served.precision, sampler=served.sampler,
                                        samplers=samplers, max_batch_size=max_batch, instances=instances,
                                        max_queue_delay_us=queue_delay_us, default_steps=served.steps,
                                        default_cfg_scale=served.cfg_scale, artifacts="reference",
                                        threads=served.threads, vendor_source=False, cache=served.cache)
                repository = Path(scratch) / "repository"
                write_repository(target, repository, options)
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
        "Request images from a running `mmgen serve` (or any Triton serving an `mmgen triton-repo` repository), "
        "in `mmgen generate`'s words: --class NAME|ID (repeatable; default every class) or --prompt / "
        "--prompts-file, --n per class or prompt, --seed (image i draws its noise from (SEED, i), as in generate), "
        "--steps, --cfg-scale, --sampler, --cache. Writes the same PNGs (with generate's text chunks; an audio run: "
        "WAVs), grid.png and samples.json as `mmgen generate`; a served image or clip equals the in-process one for "
        "the same arguments."))
    def client(
        url: str = typer.Argument("http://127.0.0.1:8000", help="HTTP endpoint of `mmgen serve` / Triton."),
        classes: list[str] = CLASS_OPTION,
        prompts: list[str] = PROMPT_OPTION,
        prompts_file: Path | None = PROMPTS_FILE_OPTION,
        n: int = typer.Option(4, "--n", "-n", help="Images per class or prompt."),
        steps: int | None = typer.Option(None, "--steps",
                                         help=f"Denoising steps (default: the server's, {SAMPLING.steps})."),
        cfg_scale: float | None = typer.Option(None, "--cfg-scale",
                                               help="Classifier-free guidance scale (default: the server's, "
                                                    f"{SAMPLING.cfg_scale})."),
        sampler: str | None = typer.Option(None, "--sampler",
                                           help="ddim, ddpm or dpmpp-2m, where the server allows it (default: "
                                                "the server's)."),
        cache: str | None = CLIENT_CACHE_OPTION,
        seed: int = sampling_seed_option("The server makes the image generate makes for the same seed."),
        out: Path = typer.Option(Path("samples"), "--out", "-o",
                                 help="Output folder (a previous `generate` / `client` folder is replaced)."),
        timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for the server."),
        json_out: str | None = json_option("settings and files"),
    ) -> None:
        from mmgen_deploy.cli.generate import read_prompts_file, warn_about_prompts
        from mmgen_deploy.io_utils import atomic_dir, write_json
        from mmgen_deploy.sampling.cache import parse_cache_policy
        from mmgen_deploy.sampling.generate import check_image_count, check_output_dir
        from mmgen_deploy.sampling.loop import check_sampling_numbers
        from mmgen_deploy.sampling.requests import expand_conditions
        from mmgen_deploy.serve.client import GenerateClient

        # generate's checks and messages, before any request (None: the server's default, checked there)
        if not 1 <= n <= SAMPLING.max_generate_images:
            raise UsageError(f"--n must be in 1..{SAMPLING.max_generate_images}, got {n}")
        check_sampling_numbers(steps=1 if steps is None else steps, sampler=sampler or SAMPLING.sampler,
                               cfg_scale=0.0 if cfg_scale is None else cfg_scale, batch_size=1, eta=SAMPLING.eta,
                               seed=seed)
        policy = None if cache is None else parse_cache_policy(cache).spec
        all_prompts = [*prompts, *(read_prompts_file(prompts_file) if prompts_file is not None else [])]
        check_output_dir(out, "mmgen client")
        remote = GenerateClient(url, timeout_s=timeout)
        try:
            served = remote.model()
            class_ids, prompt_rows = expand_conditions(served.config, classes, all_prompts, n)
            check_image_count(class_ids, prompt_rows, n)
            settings = (steps or served.default_steps,
                        served.default_cfg_scale if cfg_scale is None else cfg_scale,
                        sampler or served.default_sampler)
            if settings[2] not in served.samplers:
                raise UsageError(f"the server does not allow --sampler {settings[2]}",
                                 f"it serves {', '.join(served.samplers)}")
            if settings[0] > served.max_steps or settings[1] > served.max_cfg_scale:
                raise UsageError(f"--steps {settings[0]} / --cfg-scale {settings[1]:g} exceed the server's limits",
                                 f"it allows steps up to {served.max_steps}, cfg scale up to "
                                 f"{served.max_cfg_scale:g}")
            if served.tokenizer is not None:
                distinct = list(dict.fromkeys(all_prompts))
                encoding = served.tokenizer.encode(distinct)
                warn_about_prompts(encoding.unknown_words, [distinct[i] for i in encoding.truncated], served.config)
            result = _request_images(remote, served, class_ids, prompt_rows, seed=seed, steps=settings[0],
                                     cfg_scale=settings[1], sampler=settings[2], cache=policy or served.default_cache)
        finally:
            remote.close()
        with atomic_dir(out) as tmp:
            from mmgen_deploy.sampling.files import write_samples

            sidecar = write_samples(result, served.config, tmp, images_per_class=n,
                                    extra={"server": url, "server_backend": served.backend})
            write_json(tmp / "samples.json", sidecar)
        noun = sample_noun(served.config)
        console.print(f"wrote {plural(len(result.images), noun)} to {out} in {result.total_seconds:.2f} s from {url} "
                      f"({result.images_per_second:.2f} {noun}s/s)")
        sidecar["out"] = str(out)
        emit_json(sidecar, json_out)


def _request_images(remote: GenerateClient, served: ServedModel, class_ids: list[int] | None,
                    prompts: list[str] | None, *, seed: int, steps: int, cfg_scale: float,
                    sampler: str, cache: str) -> SampleResult:
    """All images, in requests of at most the server's max batch; returns a SampleResult like generate's."""
    import numpy as np

    from mmgen_deploy.sampling.cache import CacheStats
    from mmgen_deploy.sampling.loop import SampleResult
    from mmgen_deploy.serve.client import ImageRequest

    labels: list[int] | list[str] = class_ids if class_ids is not None else (prompts or [])
    chunk = max(1, served.max_batch_size)
    parts = []
    started = time.perf_counter()
    for first in range(0, len(labels), chunk):
        rows = list(range(first, min(first + chunk, len(labels))))
        request = ImageRequest(seeds=[seed] * len(rows), indices=rows, steps=steps, cfg_scale=cfg_scale,
                               sampler=sampler, cache=cache,
                               class_ids=[int(labels[r]) for r in rows] if class_ids is not None else None,
                               prompts=[str(labels[r]) for r in rows] if class_ids is None else None)
        parts.append(remote.generate_outputs(request, audio=served.config.audio is not None))
    elapsed = time.perf_counter() - started
    images = np.concatenate([images for images, _ in parts])
    audio = None if served.config.audio is None else np.concatenate([clips for _, clips in parts
                                                                     if clips is not None])
    return SampleResult(images=images, latents=np.empty((0,), np.float32), indices=np.empty((0,), np.int32),
                        class_ids=list(class_ids or []), seed=seed, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                        batch_size=chunk, backend="triton", precision=served.precision, device=remote.url,
                        total_seconds=elapsed, prompts=list(prompts or []),
                        cache=CacheStats(policy=cache, counted=False), audio=audio)
