"""`mmgen bench`: per-component latency and end-to-end throughput, backends side by side.

All backends are measured in one process, one after another, on the same inputs, so the
ratios between them are meaningful even on a busy machine. Device timings synchronise
through the runner (its `run` returns host arrays, i.e. after the device finished).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.specs import COMPONENTS, component_specs


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int


@dataclass
class BackendResult:
    backend: str
    precision: str
    components: dict[str, dict[int, Latency]] = field(default_factory=dict)  # component -> batch -> latency
    images_per_s: dict[int, float] = field(default_factory=dict)  # batch -> end-to-end throughput
    loop_overhead: dict[int, float] = field(default_factory=dict)  # batch -> loop time outside denoiser calls
    peak_host_mib: float | None = None
    peak_device_mib: float | None = None
    denoiser_gflops: dict[int, float] = field(default_factory=dict)  # batch -> achieved GFLOP/s
    error: str | None = None


def time_call(fn: Callable[[], Any], *, warmup: int, runs: int) -> Latency:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    arr = np.array(samples) * 1e3
    return Latency(float(np.median(arr)), float(np.percentile(arr, 90)), runs)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0) so each backend gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


@functools.lru_cache(maxsize=32)
def denoiser_flops(config: ModelConfig, batch: int) -> float:
    """FLOPs of one denoiser call at `batch` (2 per multiply-add), counted by torch on the model.

    Cached: it builds a DiT to count, and every backend of a bench asks for the same batches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen_deploy.models import DiT
    from mmgen_deploy.models.components import DenoiserComponent, TextDenoiserComponent

    dit = DiT(config.dit).eval()
    # The deployed component (its inputs are the spec's, class ids or text conditions).
    denoiser = TextDenoiserComponent(dit) if config.uses_text else DenoiserComponent(dit)
    spec = component_specs(config)["denoiser"]
    feeds = spec.make_inputs(batch, np.random.default_rng(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        denoiser(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return float(counter.get_total_flops())


def matmul_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured FP32 matrix-multiply rate of this machine (NumPy/BLAS), the roofline to compare to."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.copy()
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def bench_backend(runner: Any, config: ModelConfig, batches: Sequence[int], *, warmup: int, runs: int,
                  steps: int, cfg_scale: float, tokenizer: Any = None,
                  prompts: Sequence[str] | None = None) -> BackendResult:
    """A text model needs `tokenizer` and `prompts`: its end-to-end images/s include encoding
    the prompts (once per distinct prompt and once for the empty one, as `mmgen generate` does)."""
    from mmgen_deploy.sampling import make_conditioning, sample

    result = BackendResult(backend=runner.backend, precision=runner.precision)
    specs = component_specs(config)
    rng = np.random.default_rng(0)
    guided = cfg_scale != 1.0
    reset_peak_rss()
    for name, spec in specs.items():
        result.components[name] = {}
        for batch in batches:
            # What the sampling loop really feeds: the denoiser runs cond + uncond together.
            fed = batch * spec.batch_multiplier if guided else batch
            feeds = spec.make_inputs(fed, rng)
            lat = time_call(functools.partial(runner.run, name, feeds), warmup=warmup, runs=runs)
            result.components[name][batch] = lat
            if name == "denoiser":
                result.denoiser_gflops[batch] = denoiser_flops(config, fed) / (lat.median_ms / 1e3) / 1e9
    if config.uses_text and (tokenizer is None or not prompts):
        raise ValueError("benchmarking a text model needs its tokenizer and prompts")
    for batch in batches:
        chosen = [prompts[i % len(prompts)] for i in range(batch)] if config.uses_text and prompts else []
        class_ids = [] if config.uses_text else [i % config.dit.num_classes for i in range(batch)]
        for run_steps in (2, steps):  # a warm-up, then the measured run
            condition = make_conditioning(runner, config, class_ids=class_ids, prompts=chosen, tokenizer=tokenizer)
            res = sample(runner, config, condition, steps=run_steps, cfg_scale=cfg_scale, seed=0, batch_size=batch)
        result.images_per_s[batch] = len(res.images) / (res.total_seconds + res.text_encoder_seconds)
        result.loop_overhead[batch] = res.loop_overhead_fraction
    result.peak_host_mib = peak_rss_mib()
    result.peak_device_mib = _peak_device_mib(runner)
    return result


def _peak_device_mib(runner: Any) -> float | None:
    if not str(getattr(runner, "device", "cpu")).startswith("cuda"):
        return None
    try:
        import torch

        return float(torch.cuda.max_memory_allocated()) / 2**20
    except Exception:
        return None


@dataclass
class BenchResult:
    run_dir: str
    batches: list[int]
    steps: int
    cfg_scale: float
    matmul_peak_gflops: float
    backends: list[BackendResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[list[str]]:
        """One row per (backend, precision, batch): the side-by-side view."""
        rows = []
        base: dict[int, float] = {}
        # The denoiser's speed-up over the same backend's first precision (fp32 when measured).
        first_denoiser: dict[tuple[str, int], float] = {}
        for res in self.backends:
            for batch in self.batches:
                if res.error:
                    dashes = ["-"] * (len(self.header) - 4)  # the error goes in the last column
                    rows.append([res.backend, res.precision, str(batch), *dashes, res.error])
                    continue
                ips = res.images_per_s[batch]
                base.setdefault(batch, ips)
                lat = {n: f"{v[batch].median_ms:.2f} / {v[batch].p90_ms:.2f}" for n, v in res.components.items()}
                den = res.components["denoiser"][batch].median_ms
                ref = first_denoiser.setdefault((res.backend, batch), den)
                cells = [f"{lat[c]} ({ref / den:.2f}x)" if c == "denoiser" else lat.get(c, "-")
                         for c in self.component_columns]
                rows.append([
                    res.backend, res.precision, str(batch), *cells, f"{ips:.2f} ({ips / base[batch]:.2f}x)",
                    f"{res.denoiser_gflops[batch]:.1f}", f"{100 * res.loop_overhead.get(batch, 0):.2f}%",
                    f"{res.peak_host_mib:.0f}" if res.peak_host_mib else "-",
                ])
        return rows

    HEADER = ("backend", "precision", "batch", "images/s (vs first)", "denoiser GFLOP/s", "loop overhead",
              "peak host MiB")

    @property
    def component_columns(self) -> tuple[str, ...]:
        """The measured components in pipeline order (they follow the run's first stage: a KL
        autoencoder has no quantizer; a text model adds its text encoder)."""
        measured = {name for res in self.backends for name in res.components}
        return tuple(c for c in COMPONENTS if c in measured)

    @property
    def header(self) -> tuple[str, ...]:
        """HEADER with one latency column per measured component after the batch (the denoiser's
        cells also show its speed-up over the same backend's first precision, in parentheses)."""
        columns = tuple(f"{c.replace('_', ' ')} ms" for c in self.component_columns)
        return (*self.HEADER[:3], *columns, *self.HEADER[3:])

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"mmgen bench ({self.steps} steps, cfg {self.cfg_scale}; latencies median / p90; "
                      f"matmul peak {self.matmul_peak_gflops:.1f} GFLOP/s)")
        for col in self.header:
            table.add_column(col)
        for row in self.rows():
            table.add_row(*row[: len(self.header)])
        return table

    def markdown(self) -> str:
        lines = [f"Machine FP32 matmul peak: {self.matmul_peak_gflops:.1f} GFLOP/s; {self.steps} steps, "
                 f"cfg {self.cfg_scale}; latencies median / p90 in ms; the denoiser's (x) is its speed-up over the "
                 "same backend's first precision.", "",
                 "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row[: len(self.header)]) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"


def available_precisions(run: Any, backend: str, precisions: Sequence[str]) -> list[str]:
    """`precisions`, or with ["auto"] every precision this backend has a set for: the exported ONNX
    sets (ONNX Runtime), the built engine sets (TensorRT, which has no fp32 set)."""
    from mmgen_deploy.specs import PRECISIONS

    if list(precisions) != ["auto"]:
        return list(precisions)
    if backend == "tensorrt":
        names = [p.name for p in run.engines_dir.glob("*") if (p / "manifest.json").is_file()] \
            if run.engines_dir.is_dir() else []
        found = [p for p in PRECISIONS if p != "fp32"
                 and any(n.endswith(f"-{p}") if p != "fp16" else not n.endswith(("-int8", "-fp8")) for n in names)]
        return found or ["fp16"]
    return [p for p in PRECISIONS if (run.onnx_dir / p).is_dir()] or ["fp32"]


def run_bench(run_dir: RunLike, backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int], *,
              runs: int, warmup: int, steps: int, cfg_scale: float, progress: Any = None) -> BenchResult:
    from mmgen_deploy.errors import MMGenError
    from mmgen_deploy.runtime import open_runner

    say = progress or (lambda _msg: None)
    run = RunDir.of(run_dir)
    config = run.load_config()
    tokenizer, prompts = None, None
    if config.uses_text:
        from mmgen_deploy.parity.compare import default_prompts

        tokenizer = run.load_tokenizer()
        prompts = default_prompts(run, tokenizer, max(batches))
    say("measuring this machine's matrix-multiply peak")
    result = BenchResult(str(run.root), list(batches), steps, cfg_scale, matmul_peak_gflops(), [])
    for backend in backends:
        for precision in (["fp32"] if backend == "torch" else available_precisions(run, backend, precisions)):
            say(f"benchmarking {backend} {precision}")
            try:
                runner, _choice = open_runner(run, backend, precision)
            except MMGenError as exc:  # e.g. TensorRT absent: report it in the table, keep going
                result.backends.append(BackendResult(backend, precision, error=str(exc)))
                continue
            try:
                result.backends.append(bench_backend(runner, config, batches, warmup=warmup, runs=runs,
                                                     steps=steps, cfg_scale=cfg_scale, tokenizer=tokenizer,
                                                     prompts=prompts))
            finally:
                runner.close()
    return result
