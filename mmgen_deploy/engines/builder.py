"""Build one strongly typed engine per component from the FP16 (or INT8 / FP8 Q/DQ) ONNX set.

Same calls on TensorRT 10.x, 11.x and TensorRT-RTX; where they differ the `Flavour`
decides. One optimization profile per engine, taken from the component spec (the
denoiser's batch is doubled for classifier-free guidance). A component whose ONNX
and build options are unchanged since the last build reuses its plan; the timing
cache (classic TensorRT) carries tactic timings from one build to the next.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgen_deploy.engines.flavour import Flavour, load_flavour
from mmgen_deploy.engines.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    RUNTIME_CACHE_NAME,
    TIMING_CACHE_NAME,
    CorruptEngineError,
    current_gpu,
    engine_dir,
    engine_target,
    machine_record,
    read_manifest,
    source_onnx,
)
from mmgen_deploy.errors import MMGenError, NotAvailableError, RunDirError, UsageError
from mmgen_deploy.io_utils import atomic_dir, sha256_file, write_json
from mmgen_deploy.memory import check_extra
from mmgen_deploy.onnx_files import damage, onnx_bytes, onnx_sha256
from mmgen_deploy.rundir import RunDir, writes_run
from mmgen_deploy.specs import (
    PRECISIONS,
    BatchProfile,
    ComponentSpec,
    component_names,
    component_specs,
    expand_parts,
)

if TYPE_CHECKING:
    import tensorrt as trt


BUILD_BYTES_FACTOR = 3  # estimated builder memory per byte of ONNX (graph + weights)


class EngineBuildError(MMGenError):
    """TensorRT refused to parse or build a component."""


@dataclass(frozen=True)
class BuildOptions:
    runtime: str = "tensorrt-rtx"
    precision: str = "fp16"
    # Per-sample batch range overriding the spec's; the denoiser's is still doubled for guidance.
    batch: BatchProfile | None = None
    workspace_bytes: int | None = None
    opt_level: int | None = None  # TensorRT's builder_optimization_level (0..5, its default is 3)
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("sm86", "sm89")
    components: tuple[str, ...] = ()  # empty: every component of the run (five for a text model)
    force: bool = False  # rebuild even what could be reused
    verbose: bool = False

    def recorded(self) -> dict[str, Any]:
        """The options that shape a plan, as stored in the manifest."""
        return {
            "batch": None if self.batch is None else {"min": self.batch.min, "opt": self.batch.opt,
                                                      "max": self.batch.max},
            "workspace_bytes": self.workspace_bytes,
            "opt_level": self.opt_level,
            "compute_capabilities": list(self.compute_capabilities),
            "strongly_typed": True,
            "version_compatible": False,
            "hardware_compatibility_level": "NONE",
        }


@dataclass
class ComponentResult:
    name: str
    plan_bytes: int
    build_seconds: float
    reused: bool


@dataclass
class BuildResult:
    directory: Path
    manifest: dict[str, Any]
    components: list[ComponentResult] = field(default_factory=list)
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "runtime": self.manifest["runtime"],
            "version": self.manifest["version"],
            "target": self.manifest["target"],
            "total_seconds": round(self.total_seconds, 3),
            "components": {c.name: {"plan_bytes": c.plan_bytes, "build_seconds": round(c.build_seconds, 3),
                                    "reused": c.reused} for c in self.components},
        }


# Progress callback: (component, event, detail) with event in {"start", "built", "reused"}.
ProgressFn = Callable[[str, str, dict[str, Any]], None]


def _make_logger(flavour: Flavour, verbose: bool) -> tuple[Any, list[str]]:
    """A TensorRT logger that keeps warnings/errors for the error message (and echoes when verbose)."""
    trt_mod = flavour.trt
    messages: list[str] = []
    worst = trt_mod.Logger.INFO if verbose else trt_mod.Logger.WARNING

    class _Logger(trt_mod.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt_mod.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(worst):
                messages.append(f"[{severity.name}] {msg}")
                if verbose:
                    print(f"[TRT {severity.name}] {msg}", file=__import__("sys").stderr)

    return _Logger(), messages


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = getattr(error, "node_name", lambda: "")() or f"node #{error.node()}"
        op = getattr(error, "node_operator", lambda: "")()
        lines.append(f"{node}{f' ({op})' if op else ''}: {error.desc()}")
    return "; ".join(lines) or "no parser message"


def _profile_shapes(spec: ComponentSpec, batch: BatchProfile | None) -> dict[str, dict[str, list[int]]]:
    profile = spec.engine_profile if batch is None else batch.scaled(spec.batch_multiplier)
    return {t.name: {"min": list(t.concrete_shape(profile.min)), "opt": list(t.concrete_shape(profile.opt)),
                     "max": list(t.concrete_shape(profile.max))} for t in spec.inputs}


def _oom_hint(messages: list[str], workspace_bytes: int | None) -> str | None:
    """How to fix a build that ran out of memory, naming the settings `BUILD_HINT_PARAMS` lists."""
    text = " ".join(messages).lower()
    if workspace_bytes and "workspace" in text:
        return (f"the {{workspace_bytes}} cap of {workspace_bytes / 2**20:.0f} MiB is too small for this component: "
                "raise it or leave it out")
    if any(k in text for k in ("out of memory", "outofmemory", "memoryallocation", "failed to allocate",
                               "insufficient memory")):
        return ("the build ran out of memory: cap it with a smaller {workspace_bytes} (e.g. 512MiB) or a smaller "
                "{batch_profile}")
    return None


BUILD_HINT_PARAMS = ("workspace_bytes", "batch_profile", "verbose")


def build_component(flavour: Flavour, spec: ComponentSpec, onnx: Path, options: BuildOptions,
                    timing_cache: bytes) -> tuple[bytes, bytes | None]:
    """Parse and build one engine; returns (plan, updated timing cache or None)."""
    trt_mod = flavour.trt
    # The parser keeps the ONNX weights, the network and the builder make their own: ~3x the file.
    check_extra(f"building the {spec.name} engine", BUILD_BYTES_FACTOR * onnx_bytes(onnx),
                "build fewer components at a time ({components} NAME) or on a machine with more memory",
                params=["components"])
    logger, messages = _make_logger(flavour, options.verbose)
    builder: trt.Builder = trt_mod.Builder(logger)
    if builder is None:
        raise NotAvailableError(f"{flavour.label} could not create a builder",
                                "check the CUDA driver (`nvidia-smi`) or use {runtime} tensorrt-rtx",
                                params=["runtime"])
    network = builder.create_network(flavour.network_flags())
    parser: trt.OnnxParser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        damaged = damage(onnx)
        if damaged is not None:
            raise EngineBuildError(f"TensorRT cannot parse {onnx}: {damaged}",
                                   "re-export the run: `mmgen export RUN_DIR --overwrite`")
        raise EngineBuildError(f"TensorRT cannot parse {onnx.name}: {_parser_errors(parser)}",
                               "an op the runtime does not support; re-export with a different opset "
                               "or report the node above")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(spec.input_names):
        raise EngineBuildError(f"{onnx} has inputs {names}, the {spec.name} spec expects {spec.input_names}",
                               "re-export the ONNX files with `mmgen export`")

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shapes in _profile_shapes(spec, options.batch).items():
        profile.set_shape(name, trt_mod.Dims(shapes["min"]), trt_mod.Dims(shapes["opt"]), trt_mod.Dims(shapes["max"]))
    config.add_optimization_profile(profile)
    if options.workspace_bytes:
        config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if spec.keep_fp32:
        flavour.disable_tf32(config)
    flavour.configure_timing_cache(config, timing_cache)
    flavour.set_compute_capabilities(config, list(options.compute_capabilities))

    try:
        plan = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as exc:
        messages.append(str(exc))
        plan = None
    if plan is None or plan.nbytes == 0:
        errors = [m for m in messages if not m.startswith("[WARNING]")] or messages
        raise EngineBuildError(f"TensorRT failed to build {spec.name}: {' | '.join(errors[-3:]) or 'no message'}",
                               _oom_hint(messages, options.workspace_bytes)
                               or "run with {verbose} for the full TensorRT log", params=BUILD_HINT_PARAMS)
    return bytes(memoryview(plan)), flavour.serialized_timing_cache(config)


def _build_key(flavour: Flavour, options: BuildOptions, onnx_sha: str, shapes: dict[str, Any],
               keep_fp32: bool) -> dict[str, Any]:
    """Everything that decides a plan's bytes: equal keys -> the old plan can be reused."""
    return {"runtime": flavour.runtime, "version": flavour.version, "onnx_sha256": onnx_sha, "profile": shapes,
            "tf32": not keep_fp32,
            "options": {k: v for k, v in options.recorded().items() if k != "batch"}}


def _export_manifest(run: RunDir) -> dict[str, Any]:
    """The run's export manifest; empty for hand-made ONNX files (no manifest)."""
    from mmgen_deploy.export import read_manifest as read_export_manifest

    if not run.onnx_manifest_path.is_file():
        return {}
    return read_export_manifest(run)


def _export_records(run: RunDir, precision: str) -> dict[str, Any]:
    """Per component, how its ONNX was made (exporter, opset, FP16 converter and arguments), as the
    export step recorded it; empty when there is no readable export manifest (hand-made ONNX files)."""
    try:
        from mmgen_deploy.export import read_manifest as read_export_manifest

        export_manifest = read_export_manifest(run)
        files = export_manifest["files"][precision]
    except Exception:  # no export manifest, or one of another layout: the ONNX hashes still bind the plans
        return {}
    return {name: {"exporter": export_manifest.get("exporter"), "opset": entry.get("opset"),
                   "export_sha256": entry.get("sha256"), "keep_fp32": entry.get("keep_fp32"),
                   "converter": entry.get("converter"),
                   **({"component_precision": entry.get("component_precision"),
                       "quantization": entry.get("quantization")} if "quantization" in entry else {})}
            for name, entry in files.items() if isinstance(entry, dict)}


def _old_manifest(directory: Path) -> dict[str, Any] | None:
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(directory)
    except CorruptEngineError:
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@writes_run("build engines")
def build_engines(run: RunDir, options: BuildOptions, progress: ProgressFn | None = None) -> BuildResult:
    """Build (or reuse) every requested component's engine into RUN_DIR/engines/<runtime>-<version>-<target>/."""
    started = time.perf_counter()
    flavour = load_flavour(options.runtime)
    if options.compute_capabilities:
        for cc in options.compute_capabilities:
            flavour.compute_capability(cc)  # validates before any work
    if options.precision not in ENGINE_PRECISIONS:
        raise UsageError(f"unknown precision {options.precision!r}",
                         "use fp16, int8 or fp8 (or fp32 for debugging)")
    config = run.load_config()
    available = component_names(config, parts=True)  # the denoiser's parts when asked (PARTS_WORD)
    options = replace(options, components=expand_parts(options.components))
    unknown = [c for c in options.components if c not in available]
    if unknown:
        why = " (a class-conditioned model has no text encoder)" if "text_encoder" in unknown else ""
        raise UsageError(f"unknown component(s) {', '.join(unknown)}{why}", f"choose from {', '.join(available)}")
    if not options.components:
        options = replace(options, components=component_names(config))
    specs = component_specs(config, parts=True)
    gpu = current_gpu() if flavour.needs_gpu_to_build else None
    if flavour.needs_gpu_to_build and gpu is None:
        raise NotAvailableError(f"{flavour.label} needs a CUDA GPU to build engines and none is visible",
                                "build on the target device, or build ahead of time with {runtime} tensorrt-rtx",
                                params=["runtime"])
    check_quantized_target(flavour, options, gpu)
    onnx_files = {name: source_onnx(run, options.precision, name) for name in options.components}
    for name, path in onnx_files.items():
        if not path.is_file():
            raise RunDirError(f"missing ONNX file {path} for the {name} engine",
                              f"export first: `mmgen export {run.root}`")
    export_manifest = _export_manifest(run)
    for name in onnx_files:
        run.check_onnx_current(export_manifest, options.precision, specs[name])  # never build from a replaced graph

    directory = engine_dir(run, flavour, gpu, options.precision)
    old = _old_manifest(directory)
    old_entries: dict[str, Any] = (old or {}).get("components", {})
    result_components: list[ComponentResult] = []
    entries: dict[str, Any] = {}
    with atomic_dir(directory) as tmp:
        timing_cache = b""
        if flavour.has_timing_cache and (directory / TIMING_CACHE_NAME).is_file():
            timing_cache = (directory / TIMING_CACHE_NAME).read_bytes()
        # Components not asked for this time keep their existing, still-valid plans.
        for name, entry in old_entries.items():
            if name not in options.components and (directory / entry["plan"]).is_file():
                _link_or_copy(directory / entry["plan"], tmp / entry["plan"])
                entries[name] = entry

        for name in options.components:
            spec = specs[name]
            onnx = onnx_files[name]
            onnx_sha = onnx_sha256(onnx)  # graph + external data file, if any
            shapes = _profile_shapes(spec, options.batch)
            key = _build_key(flavour, options, onnx_sha, shapes, spec.keep_fp32)
            plan_name = f"{name}.plan"
            previous = old_entries.get(name)
            if progress:
                progress(name, "start", {})
            reused = False
            t0 = time.perf_counter()
            if (not options.force and previous is not None and previous.get("build_key") == key
                    and (directory / previous["plan"]).is_file()
                    and sha256_file(directory / previous["plan"]) == previous.get("plan_sha256")):
                _link_or_copy(directory / previous["plan"], tmp / plan_name)
                plan_sha, plan_size, seconds = previous["plan_sha256"], previous["plan_bytes"], 0.0
                build_seconds = float(previous.get("build_seconds", 0.0))
                reused = True
            else:
                plan, new_cache = build_component(flavour, spec, onnx, options, timing_cache)
                if new_cache:
                    timing_cache = new_cache
                (tmp / plan_name).write_bytes(plan)
                seconds = time.perf_counter() - t0
                plan_sha, plan_size, build_seconds = sha256_file(tmp / plan_name), len(plan), seconds
            entries[name] = {
                "plan": plan_name,
                "plan_bytes": plan_size,
                "plan_sha256": plan_sha,
                "onnx": str(onnx.relative_to(run.root)) if onnx.is_relative_to(run.root) else str(onnx),
                "onnx_sha256": onnx_sha,
                "profile": shapes,
                "inputs": [t.to_dict() for t in spec.inputs],
                "outputs": [t.to_dict() for t in spec.outputs],
                "fp32_graph": spec.keep_fp32,
                "tf32": not spec.keep_fp32,  # the FP32-typed quantizer is built with TF32 off
                "build_seconds": round(build_seconds, 4),
                "build_key": key,
            }
            result_components.append(ComponentResult(name, plan_size, seconds if not reused else 0.0, reused))
            if progress:
                progress(name, "reused" if reused else "built", {"seconds": seconds, "plan_bytes": plan_size})

        if flavour.has_timing_cache and timing_cache:
            (tmp / TIMING_CACHE_NAME).write_bytes(timing_cache)
        # JIT kernels cached by the runner stay valid only while every plan is the one they were made for.
        if all(c.reused for c in result_components) and (directory / RUNTIME_CACHE_NAME).is_file():
            _link_or_copy(directory / RUNTIME_CACHE_NAME, tmp / RUNTIME_CACHE_NAME)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "runtime": flavour.runtime,
            "module": flavour.module.__name__,
            "version": flavour.version,
            "target": engine_target(flavour, gpu),
            "precision": options.precision,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_machine": machine_record(gpu),
            "options": options.recorded(),
            "weights_sha256": _weights_sha(run),
            "onnx_export": _export_records(run, options.precision),
            "timing_cache": TIMING_CACHE_NAME if flavour.has_timing_cache and timing_cache else None,
            "runtime_cache": RUNTIME_CACHE_NAME if flavour.has_runtime_cache else None,
            "components": entries,
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return BuildResult(directory=directory, manifest=manifest, components=result_components,
                       total_seconds=time.perf_counter() - started)


# FP8 GEMMs exist from Ada on (compute capability 8.9: Ada, Hopper, Blackwell). INT8 Q/DQ runs on
# Turing and later in TensorRT 10.x/11.x; TensorRT-RTX lists INT8 among its Q/DQ types as well.
FP8_MIN_SM = 89
ENGINE_PRECISIONS = PRECISIONS  # fp32 for debugging; fp16, int8, fp8 for deployment


def check_quantized_target(flavour: Flavour, options: BuildOptions, gpu: Any) -> None:
    """Refuse, in one line and before any work, an FP8 build for GPUs without FP8 (SM < 8.9)."""
    if options.precision != "fp8":
        return
    if not flavour.is_rtx:
        if gpu is not None and int(gpu.sm[2:]) < FP8_MIN_SM:
            raise UsageError(f"FP8 engines need compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU "
                             f"is {gpu.name} ({gpu.sm})",
                             "build {precision} int8 (Jetson Orin, Ampere) or fp16 instead", params=["precision"])
        return
    targets = list(options.compute_capabilities)
    if not targets:
        raise UsageError("FP8 engines need compute capability 8.9 or newer and TensorRT-RTX's default targets "
                         "include Ampere (sm80, sm86)",
                         "name FP8 targets: {compute_capabilities} sm89 and/or {compute_capabilities} sm120",
                         params=["compute_capabilities"])
    old = [cc for cc in targets if int(cc.upper().removeprefix("SM").replace(".", "")) < FP8_MIN_SM]
    if old:
        raise UsageError(f"FP8 engines need compute capability 8.9 or newer; {', '.join(old)} cannot run them",
                         "drop those targets ({compute_capabilities} sm89 / sm120), or build {precision} int8 or "
                         "fp16 for them", params=["compute_capabilities", "precision"])


def _weights_sha(run: RunDir) -> str | None:
    try:
        return run.weights_sha256()
    except RunDirError:
        return None
