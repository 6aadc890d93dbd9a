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
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.sampling.cache import parse_cache_policy
from mmgen_deploy.specs import COMPONENTS, DENOISER_PARTS, component_specs


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
    decoder_gflops: dict[int, float] = field(default_factory=dict)  # batch -> achieved GFLOP/s
    # batch -> share of one end-to-end run: denoiser calls, quantizer + decoder calls, everything else
    time_split: dict[int, dict[str, float]] = field(default_factory=dict)
    device: str = "cpu"
    error: str | None = None
    # batch -> the step-caching record of the end-to-end run (policy, block evaluations kept)
    cache: dict[int, dict[str, Any]] = field(default_factory=dict)


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
def component_flops(config: ModelConfig, component: str) -> float:
    """FLOPs of one call of a component at batch 1 (2 per multiply-add: matmuls, convolutions,
    attention), counted by torch's flop counter on the deployed module; they scale linearly with batch.

    Cached: it builds the models to count, and every backend of a bench asks for the same ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen_deploy.models import DiT, TextEncoder, VQModel, build_components
    from mmgen_deploy.models import components as parts
    from mmgen_deploy.models.fast_init import skip_weight_init

    module: torch.nn.Module
    with skip_weight_init():  # FLOPs do not depend on the weights
        if component == "denoiser":
            dit = DiT(config.dit)
            module = parts.TextDenoiserComponent(dit) if config.uses_text else parts.DenoiserComponent(dit)
        elif component == "text_encoder" and config.text is not None:
            module = parts.TextEncoderComponent(TextEncoder(config.text))
        else:
            if config.first_stage_kind == "kl":
                from mmgen_deploy.models.autoencoder_kl import AutoencoderKL

                first_stage: Any = AutoencoderKL(config.first_stage)  # type: ignore[arg-type]
            else:
                first_stage = VQModel(config.first_stage)  # type: ignore[arg-type]
            dit = DiT(config.dit)
            text = TextEncoder(config.text) if config.text is not None else None
            module = build_components(first_stage, dit, text, audio=config.audio)[component]
    module.eval()
    spec = component_specs(config)[component]
    feeds = spec.make_inputs(1, np.random.default_rng(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return float(counter.get_total_flops())


def denoiser_flops(config: ModelConfig, batch: int) -> float:
    """FLOPs of one denoiser call at `batch`."""
    return component_flops(config, "denoiser") * batch


# Which measured matmul peak a backend's precision is held against (fp16 on a CPU runs FP32
# kernels behind casts in ONNX Runtime, so FP32 is its ceiling there).
PEAK_OF_PRECISION = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8", "fp8": "int8"}


def matmul_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured FP32 matrix-multiply rate of this machine through NumPy/BLAS (no torch needed)."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.copy()
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def _torch_matmul_rate(dtype_name: str, size: int, seconds: float) -> float:
    import torch

    if dtype_name == "int8":
        a = torch.randint(-64, 64, (size, size), dtype=torch.int8)
        b = torch.randint(-64, 64, (size, size), dtype=torch.int8)

        def call() -> Any:
            return torch._int_mm(a, b)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)

        def call() -> Any:
            return torch.mm(a, b)
    call()  # warm-up (oneDNN picks its kernel: AMX tiles for bf16/int8 where present)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def matmul_peaks(size: int = 2048, seconds: float = 1.0) -> dict[str, float]:
    """This machine's measured CPU matrix-multiply rates (GFLOP/s, or GOP/s for int8), per precision:
    torch.mm in FP32 and BF16 (oneDNN: AMX / AVX-512 BF16 where present) and torch._int_mm in INT8.
    A precision the installed torch cannot multiply is left out."""
    peaks: dict[str, float] = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"fp32": matmul_peak_gflops()}
    for name in dict.fromkeys(PEAK_OF_PRECISION.values()):  # fp32, bf16, int8
        try:
            peaks[name] = _torch_matmul_rate(name, size, seconds)
        except (RuntimeError, NotImplementedError):
            continue
    return peaks


# Steps of the end-to-end measurement of a run that is not a distilled student.
BENCH_STEPS = 10


def bench_sampling(config: ModelConfig, steps: int | None, cfg_scale: float | None,
                   sampler: str | None = None) -> tuple[int, str, float]:
    """(steps, sampler, guidance scale) of the end-to-end measurement: the ones given, else the run's own
    (a distilled student's; otherwise BENCH_STEPS and `defaults.SAMPLING`). A student refuses settings
    it was not trained for."""
    from mmgen_deploy.sampling.loop import check_student_settings, run_sampling_defaults

    own = run_sampling_defaults(config)
    steps = steps if steps is not None else (int(own["steps"]) if config.student is not None else BENCH_STEPS)
    cfg_scale = float(own["cfg_scale"]) if cfg_scale is None else cfg_scale
    sampler = str(own["sampler"]) if sampler is None else sampler
    check_student_settings(config, steps=steps, sampler=sampler, cfg_scale=cfg_scale, eta=SAMPLING.eta)
    return steps, sampler, cfg_scale


def bench_backend(runner: Any, config: ModelConfig, batches: Sequence[int], *, warmup: int, runs: int,
                  steps: int, cfg_scale: float, sampler: str = SAMPLING.sampler, tokenizer: Any = None,
                  prompts: Sequence[str] | None = None, components: Sequence[str] | None = None,
                  cache: str = SAMPLING.cache) -> BackendResult:
    """A text model needs `tokenizer` and `prompts`: its end-to-end images/s include encoding
    the prompts (once per distinct prompt and once for the empty one, as `mmgen generate` does).
    `components`: time only these per component (default all; sampling always runs what it needs;
    the denoiser's parts only when named). `cache`: the step-caching policy of the end-to-end runs."""
    from mmgen_deploy.sampling import make_conditioning, sample

    result = BackendResult(backend=runner.backend, precision=runner.precision,
                           device=str(getattr(runner, "device", "cpu")))
    specs = component_specs(config, parts=components is not None and any(c in DENOISER_PARTS for c in components))
    rng = np.random.default_rng(0)
    guided = cfg_scale != 1.0
    reset_peak_rss()
    for name, spec in specs.items():
        if components is not None and name not in components:
            continue
        result.components[name] = {}
        for batch in batches:
            # What the sampling loop really feeds: the denoiser runs cond + uncond together.
            fed = batch * spec.batch_multiplier if guided else batch
            feeds = spec.make_inputs(fed, rng)
            lat = time_call(functools.partial(runner.run, name, feeds), warmup=warmup, runs=runs)
            result.components[name][batch] = lat
            if name == "denoiser":
                result.denoiser_gflops[batch] = denoiser_flops(config, fed) / (lat.median_ms / 1e3) / 1e9
            elif name == "decoder":
                result.decoder_gflops[batch] = component_flops(config, name) * fed / (lat.median_ms / 1e3) / 1e9
    if config.uses_text and (tokenizer is None or not prompts):
        raise ValueError("benchmarking a text model needs its tokenizer and prompts")
    for batch in batches:
        chosen = [prompts[i % len(prompts)] for i in range(batch)] if config.uses_text and prompts else []
        class_ids = [] if config.uses_text else [i % config.dit.num_classes for i in range(batch)]
        # A warm-up, then the measured run (a student samples only with its own steps).
        for run_steps in (steps if config.student is not None else 2, steps):
            condition = make_conditioning(runner, config, class_ids=class_ids, prompts=chosen, tokenizer=tokenizer)
            res = sample(runner, config, condition, steps=run_steps, sampler=sampler, cfg_scale=cfg_scale, seed=0,
                         batch_size=batch, cache=cache)
        result.cache[batch] = res.cache.to_dict()
        result.images_per_s[batch] = len(res.images) / (res.total_seconds + res.text_encoder_seconds)
        result.loop_overhead[batch] = res.loop_overhead_fraction
        total = res.total_seconds
        if total > 0:
            denoise, decode = res.denoise_model_seconds / total, (res.model_seconds - res.denoise_model_seconds) / total
            result.time_split[batch] = {"denoiser": denoise, "quantizer+decoder": decode,
                                        "other": max(0.0, 1.0 - denoise - decode)}
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


def backend_precisions(backend: str) -> tuple[str, ...] | None:
    """The precisions a backend runs (its registry entry says), or None for a name the registry does
    not know. `mmgen bench` runs every requested precision a backend has and lists the others as not run."""
    from mmgen_deploy.runtime.backends import REGISTRY

    spec = REGISTRY.get(backend)
    return spec.precisions if spec is not None else None


def _fraction(gflops: float | None, peak: float | None) -> str:
    if gflops is None:
        return "-"
    return f"{gflops:.1f}" + (f" ({100 * gflops / peak:.0f}%)" if peak else "")


@dataclass
class BenchResult:
    run_dir: str
    batches: list[int]
    steps: int
    cfg_scale: float
    matmul_peak_gflops: float  # the FP32 one (kept for scripts that read it)
    backends: list[BackendResult]
    matmul_peaks: dict[str, float] = field(default_factory=dict)  # precision -> GFLOP/s, measured this run
    machine: str = ""
    skipped: list[str] = field(default_factory=list)  # backend/precision pairs not run, and why
    cache: str = SAMPLING.cache  # the step-caching policy of the end-to-end runs
    sampler: str = SAMPLING.sampler  # the sampler of the end-to-end runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peak_for(self, res: BackendResult) -> float | None:
        """The measured CPU peak of the precision `res` ran (None on a GPU: no GPU peak is measured)."""
        if res.device.startswith(("cuda", "gpu", "npu")):
            return None
        return self.matmul_peaks.get(PEAK_OF_PRECISION.get(res.precision, "fp32"))

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
                den = res.components["denoiser"][batch].median_ms if "denoiser" in res.components else None
                ref = first_denoiser.setdefault((res.backend, batch), den) if den else None
                cells = [f"{lat[c]} ({ref / den:.2f}x)" if c == "denoiser" and den and ref else lat.get(c, "-")
                         for c in self.component_columns]
                peak = self.peak_for(res)
                split = res.time_split.get(batch)
                rows.append([
                    res.backend, res.precision, str(batch), *cells, f"{ips:.2f} ({ips / base[batch]:.2f}x)",
                    _fraction(res.denoiser_gflops.get(batch), peak), _fraction(res.decoder_gflops.get(batch), peak),
                    (f"{100 * split['denoiser']:.0f} / {100 * split['quantizer+decoder']:.0f} / "
                     f"{100 * split['other']:.1f}") if split else "-",
                    f"{res.peak_host_mib:.0f}" if res.peak_host_mib else "-",
                ])
        return rows

    HEADER = ("backend", "precision", "batch", "images/s (vs first)", "denoiser GFLOP/s (% of peak)",
              "decoder GFLOP/s (% of peak)", "time % denoiser / decode / other", "peak host MiB")

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

    def cache_line(self) -> str:
        """The policy, and the share of block evaluations it kept in the end-to-end runs (the same on
        every backend for every:N; adaptive decisions may differ)."""
        records = [r for res in self.backends for r in res.cache.values()]
        if self.cache == "none" or not records:
            return self.cache
        kept = sum(int(r["block_evaluations"]) for r in records) / max(1, sum(
            int(r["block_evaluations_total"]) for r in records))
        return f"{self.cache}: {100 * (1 - kept):.1f} % of block evaluations saved"

    def peaks_line(self) -> str:
        peaks = ", ".join(f"{name.upper()} {value:.0f}" for name, value in self.matmul_peaks.items())
        return (f"matmul peaks measured in this run (GFLOP/s; INT8 in GOP/s): {peaks}; each backend's "
                "GFLOP/s is against the peak of the precision it ran")

    def tables(self) -> list[Any]:
        """The side-by-side view as two tables that fit an 80-column terminal: each component's
        median latency, then throughput and where the time goes. The p90 latencies are in `to_dict`
        and `markdown` (one wide table); a backend that failed to open is in `notes` instead."""
        from rich import box
        from rich.table import Table

        keys, latencies = 3, len(self.component_columns)
        def compact(title: str) -> Table:
            return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)

        latency = compact(f"mmgen bench: median latency in ms ({self.steps} steps, cfg {self.cfg_scale}, "
                          f"cache {self.cache_line()}; "
                          "the denoiser's speed-up over the backend's first precision)")
        throughput = compact("mmgen bench: throughput and where the time goes")
        for table in (latency, throughput):
            table.add_column("backend", no_wrap=True)
            table.add_column("batch", no_wrap=True, justify="right")
        for col in self.header[keys:keys + latencies]:
            latency.add_column(col.removesuffix(" ms"), justify="right")
        short = {"time % denoiser / decode / other": "time % in den. dec. other", "peak host MiB": "host MiB"}
        for col in self.header[keys + latencies:]:
            throughput.add_column(short.get(col, col), justify="right")
        rows = iter(self.rows())
        for res in self.backends:
            for _batch in self.batches:
                row = next(rows)
                if res.error:
                    continue
                key = (f"{row[0]} {row[1]}", row[2])
                medians = [cell.split(" / ")[0] + (f" ({cell.split(' (')[1]}" if " (" in cell else "")
                           for cell in row[keys:keys + latencies]]
                latency.add_row(*key, *medians)
                throughput.add_row(*key, *(cell.replace(" / ", "/") for cell in row[keys + latencies:len(self.header)]))
        return [latency, throughput]

    def notes(self) -> list[str]:
        """What the tables leave out: backends that failed to open, pairs not run, the peaks."""
        failed = [f"{res.backend} {res.precision} failed: {res.error}" for res in self.backends if res.error]
        skipped = ["not run: " + "; ".join(self.skipped)] if self.skipped else []
        return [*failed, *skipped, self.peaks_line()]

    def markdown(self) -> str:
        peaks = self.peaks_line()
        lines = [f"Machine: {self.machine}. {peaks[0].upper()}{peaks[1:]}. {self.steps} steps, cfg "
                 f"{self.cfg_scale}, cache {self.cache_line()}; latencies median / p90 in ms; the denoiser's (x) is "
                 "its speed-up over the same "
                 "backend's first precision.", "",
                 "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row[: len(self.header)]) + " |" for row in self.rows()]
        if self.skipped:
            lines += ["", "Not run: " + "; ".join(self.skipped) + "."]
        return "\n".join(lines) + "\n"


def machine_description() -> str:
    import os

    from mmgen_deploy.cpuinfo import cpu_features

    features = cpu_features()
    flags = ", ".join(f for f in features.present() if f != "avx512f") or "no AVX-512 BF16 / AMX / VNNI"
    return f"{features.model}, {os.cpu_count()} logical CPUs ({flags})"


def available_precisions(run: Any, backend: str, precisions: Sequence[str]) -> list[str]:
    """`precisions`, or with ["auto"] every precision this backend has here (the registry's
    `runnable_precisions`: exported ONNX sets, built engine sets, bf16 on CPUs with BF16 units)."""
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime.backends import runnable_precisions

    if list(precisions) != ["auto"]:
        return list(precisions)
    return runnable_precisions(RunDir.of(run), backend, cpu_features())


def run_bench(run_dir: RunLike, backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int], *,
              runs: int, warmup: int, steps: int | None = None, cfg_scale: float | None = None,
              progress: Any = None, components: Sequence[str] | None = None, threads: int | None = None,
              cache: str = SAMPLING.cache, sampler: str | None = None) -> BenchResult:
    """Measure every backend x precision of `run_dir` at `batches`; `threads`: CPU threads of each
    backend (None: its default); `steps` / `cfg_scale` / `sampler` None: the run's own (`bench_sampling`)."""
    from mmgen_deploy.errors import MMGenError, UsageError
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.runtime.backends import BACKEND_NAMES

    unknown = [b for b in backends if b not in BACKEND_NAMES]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r} for bench", f"choose from {', '.join(BACKEND_NAMES)}")
    say = progress or (lambda _msg: None)
    run = RunDir.of(run_dir)
    config = run.load_config()
    steps, sampler, cfg_scale = bench_sampling(config, steps, cfg_scale, sampler)
    tokenizer, prompts = None, None
    if config.uses_text:
        from mmgen_deploy.parity.compare import default_prompts

        tokenizer = run.load_tokenizer()
        prompts = default_prompts(run, tokenizer, max(batches))
    say("measuring this machine's matrix-multiply peaks (FP32, BF16, INT8)")
    peaks = matmul_peaks()
    result = BenchResult(str(run.root), list(batches), steps, cfg_scale, peaks.get("fp32", 0.0), [],
                         matmul_peaks=peaks, machine=machine_description(), cache=parse_cache_policy(cache).spec,
                         sampler=sampler)
    for backend in backends:
        known = backend_precisions(backend)
        for precision in available_precisions(run, backend, precisions):
            if known is not None and precision not in known:
                result.skipped.append(f"{backend} {precision} (not a precision of {backend})")
                continue
            say(f"benchmarking {backend} {precision}")
            try:
                runner, _choice = open_runner(run, backend, precision, threads=threads)
            except MMGenError as exc:  # e.g. TensorRT absent: report it in the table, keep going
                result.backends.append(BackendResult(backend, precision, error=str(exc)))
                continue
            try:
                result.backends.append(bench_backend(runner, config, batches, warmup=warmup, runs=runs,
                                                     steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                                                     tokenizer=tokenizer,
                                                     prompts=prompts, components=components, cache=cache))
            finally:
                runner.close()
    return result
