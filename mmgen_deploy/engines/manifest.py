"""The engine directory, its manifest, and the checks that run before any GPU work.

    RUN_DIR/engines/<runtime>-<version>-<target>/
        encoder.plan quantizer.plan decoder.plan denoiser.plan
        timing.cache     (classic TensorRT: reused by the next build)
        runtime.cache    (TensorRT-RTX: JIT kernels, written by the runner on a GPU)
        manifest.json

`target` is `aot` for TensorRT-RTX (built ahead of time, JIT-specialised on the GPU at
load) and `sm<XY>` of the build GPU for classic TensorRT, whose plans are bound to it.

An engine is not portable: it is bound to the TensorRT build that made it, to a GPU
architecture and to the exact ONNX it came from. `check_engine_dir` compares the
manifest with what is installed and on disk, and refuses any mismatch with a message
saying what changed and the command that rebuilds. It touches no CUDA, so a stale
engine is reported as stale on a machine without a GPU.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.engines.flavour import Flavour, install_hint, installed_flavours, load_flavour
from mmgen_deploy.errors import NotAvailableError, RunDirError
from mmgen_deploy.io_utils import read_json, sha256_file
from mmgen_deploy.onnx_files import onnx_sha256
from mmgen_deploy.rundir import RunDir

MANIFEST_FORMAT = "mmgen-engines"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
TIMING_CACHE_NAME = "timing.cache"
RUNTIME_CACHE_NAME = "runtime.cache"
AOT_TARGET = "aot"
RTX_UNSUPPORTED = ("sm90",)  # TensorRT-RTX has no Hopper support


class StaleEngineError(RunDirError):
    """Engines that do not match the installed runtime, this GPU, or the current ONNX files."""


class CorruptEngineError(RunDirError):
    """A plan or manifest that is truncated, damaged or unreadable."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    total_memory_bytes: int

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": self.compute_capability,
                "total_memory_bytes": self.total_memory_bytes}


def current_gpu() -> GpuInfo | None:
    """The CUDA device torch sees (device 0), or None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=str(props.name), compute_capability=f"{props.major}.{props.minor}",
                   total_memory_bytes=int(props.total_memory))


def _cuda_driver_version() -> str | None:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 13 (no more `from cuda import cudart`)
    except Exception:
        return None
    try:
        error, version = cudart.cudaDriverGetVersion()
    except Exception:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}" if int(error) == 0 and version else None


def machine_record(gpu: GpuInfo | None) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_driver": _cuda_driver_version(),
        "gpu": gpu.to_dict() if gpu else None,
    }


def engine_target(flavour: Flavour, gpu: GpuInfo | None) -> str:
    return AOT_TARGET if flavour.is_rtx or gpu is None else gpu.sm


def engine_dir_name(flavour: Flavour, target: str, precision: str = "fp16") -> str:
    """`<runtime>-<version>-<target>` for the FP16 set (the default), with `-<precision>` for the
    others, so INT8 / FP8 engines sit beside the FP16 ones instead of replacing them."""
    suffix = "" if precision == "fp16" else f"-{precision}"
    return f"{flavour.runtime}-{flavour.version}-{target}{suffix}"


def engine_dir(run: RunDir, flavour: Flavour, gpu: GpuInfo | None, precision: str = "fp16") -> Path:
    return run.engine_set_dir(engine_dir_name(flavour, engine_target(flavour, gpu), precision))


def source_onnx(run: RunDir, precision: str, component: str) -> Path:
    """Where the export step put this component's ONNX (the fp16 set holds the FP32-typed quantizer)."""
    return run.onnx_path(precision, component)


def rebuild_command(run: RunDir, manifest: dict[str, Any] | None, runtime: str, precision: str = "fp16") -> str:
    """The command that rebuilds this engine set with the options it was built with."""
    parts = ["mmgen", "build-engine", str(run.root), "--runtime", runtime]
    if precision != "fp16":
        parts += ["--precision", precision]
    options = (manifest or {}).get("options", {})
    if options.get("batch"):
        b = options["batch"]
        parts += ["--batch-profile", f"{b['min']}:{b['opt']}:{b['max']}"]
    if options.get("workspace_bytes"):
        parts += ["--workspace", f"{options['workspace_bytes'] // 2**20}MiB"]
    for cc in options.get("compute_capabilities") or []:
        parts += ["--compute-capability", cc]
    return " ".join(parts)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CorruptEngineError(f"{directory} has no {MANIFEST_NAME}",
                                 "it is not a complete engine set; rebuild with `mmgen build-engine`")
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptEngineError(f"{path} is unreadable: {exc}", "rebuild with `mmgen build-engine`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptEngineError(f"{path} is not an mmgen engine manifest", "rebuild with `mmgen build-engine`")
    if int(manifest.get("format_version", 0)) > MANIFEST_VERSION:
        raise CorruptEngineError(f"{path} was written by a newer mmgen-deploy", "upgrade mmgen-deploy")
    return manifest


def built_engine_precisions(run: RunDir) -> list[str]:
    """The precisions of the engine sets built for this run (read from their manifests, unchecked:
    `check_engine_dir` says whether one is current)."""
    found = []
    for directory in sorted(run.engines_dir.iterdir()) if run.engines_dir.is_dir() else ():
        try:
            precision = str(read_manifest(directory).get("precision", "fp16"))
        except RunDirError:
            continue
        if precision not in found:
            found.append(precision)
    return found


@dataclass(frozen=True)
class EngineSet:
    """A checked engine directory: every plan matches the manifest, the runtime and the ONNX files."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    def plan_path(self, component: str) -> Path:
        return self.directory / self.manifest["components"][component]["plan"]

    @property
    def runtime_cache_path(self) -> Path:
        return self.directory / RUNTIME_CACHE_NAME


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def check_engine_dir(run: RunDir, flavour: Flavour, *, gpu: GpuInfo | None = None,
                     components: tuple[str, ...] | None = None, precision: str = "fp16",
                     verify_plans: bool = True) -> EngineSet:
    """Find and verify the engine set this machine would load; raise on anything stale or corrupt.

    No CUDA is touched: `gpu` is what the caller already knows (None on a CPU machine,
    where only runtime version, ONNX hashes and plan integrity can be checked).
    """
    directory = engine_dir(run, flavour, gpu, precision)
    if not (directory / MANIFEST_NAME).is_file():
        rebuild = rebuild_command(run, None, flavour.runtime, precision)
        others = sorted(p.name for p in run.engines_dir.glob("*") if (p / MANIFEST_NAME).is_file()) \
            if run.engines_dir.is_dir() else []
        if others:
            raise StaleEngineError(
                f"no engines for {flavour.label} on this machine (expected {directory.name}); "
                f"found only {', '.join(others)}, built for another runtime version or GPU",
                f"rebuild with `{rebuild}`")
        raise StaleEngineError(f"no engines built in {run.engines_dir}", f"build them with `{rebuild}`")

    manifest = read_manifest(directory)
    rebuild = f"rebuild with `{rebuild_command(run, manifest, flavour.runtime, precision)}`"
    changes: list[str] = []
    if manifest.get("runtime") != flavour.runtime or manifest.get("version") != flavour.version:
        changes.append(f"built with {manifest.get('runtime')} {manifest.get('version')}, "
                       f"installed is {flavour.label}")
    if manifest.get("precision") != precision:
        changes.append(f"built from the {manifest.get('precision')} ONNX set, {precision} requested")
    if gpu is not None:
        built_gpu = (manifest.get("build_machine") or {}).get("gpu")
        targets = (manifest.get("options") or {}).get("compute_capabilities") or []
        if not flavour.is_rtx and built_gpu and built_gpu.get("compute_capability") != gpu.compute_capability:
            changes.append(f"built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), "
                           f"this GPU is {gpu.name} (sm {gpu.compute_capability})")
        if flavour.is_rtx and targets and gpu.sm not in targets:
            changes.append(f"built for {', '.join(targets)}, this GPU is {gpu.name} ({gpu.sm})")
        if precision == "fp8" and int(gpu.sm[2:]) < 89:
            changes.append(f"FP8 engines need compute capability 8.9 or newer, this GPU is {gpu.name} ({gpu.sm})")
        if flavour.is_rtx and not targets and (gpu.sm in RTX_UNSUPPORTED or int(gpu.sm[2:]) < 80):
            # RTX's default targets are Ampere and later (8.0, 8.6, 8.9, 12.x); Turing must be named.
            changes.append(f"built for TensorRT-RTX's default targets (Ampere and later), this GPU is "
                           f"{gpu.name} ({gpu.sm})")

    wanted = components or tuple(manifest.get("components", {}))
    entries = manifest.get("components", {})
    for name in wanted:
        entry = entries.get(name)
        if entry is None:
            changes.append(f"no {name} engine in the set")
            continue
        onnx = source_onnx(run, precision, name)
        if not onnx.is_file():
            changes.append(f"its source {onnx.relative_to(run.root)} is gone")
            continue
        try:
            digest = onnx_sha256(onnx)  # graph + external data file, if any
        except FileNotFoundError as exc:
            changes.append(str(exc))
            continue
        if digest != entry.get("onnx_sha256"):
            changes.append(f"{onnx.relative_to(run.root)} changed since the build "
                           f"(sha256 {_short(entry.get('onnx_sha256'))}... -> {_short(digest)}...)")
    if changes:
        raise StaleEngineError(f"stale engines in {directory}: " + "; ".join(changes), rebuild)

    if verify_plans:
        for name in wanted:
            entry = entries[name]
            plan = directory / entry["plan"]
            if not plan.is_file():
                raise CorruptEngineError(f"engine plan {plan} is missing", rebuild)
            size = plan.stat().st_size
            if size != entry.get("plan_bytes"):
                raise CorruptEngineError(
                    f"engine plan {plan} is truncated or corrupt ({size} bytes, the build wrote "
                    f"{entry.get('plan_bytes')})", rebuild)
            if sha256_file(plan) != entry.get("plan_sha256"):
                raise CorruptEngineError(f"engine plan {plan} is corrupt (sha256 differs from the manifest)", rebuild)
    return EngineSet(directory=directory, manifest=manifest)


def select_engine_set(run: RunDir, runtime: str | None, precision: str,
                      gpu: GpuInfo | None) -> tuple[Flavour, EngineSet]:
    """The installed flavour whose engines match this run and machine; raise the most useful reason if none."""
    if runtime is not None:
        flavour = load_flavour(runtime)
        return flavour, check_engine_dir(run, flavour, gpu=gpu, precision=precision)
    flavours = installed_flavours()
    if not flavours:
        raise NotAvailableError("neither TensorRT nor TensorRT-RTX is installed", install_hint("tensorrt"))
    first_error: RunDirError | None = None
    for flavour in flavours:
        try:
            return flavour, check_engine_dir(run, flavour, gpu=gpu, precision=precision)
        except RunDirError as exc:
            # Prefer the complaint about engines that exist for this flavour (stale/corrupt) over "none built".
            has_own = run.engines_dir.is_dir() and any(run.engines_dir.glob(f"{flavour.runtime}-[0-9]*"))
            if first_error is None or has_own:
                first_error = exc
    assert first_error is not None
    raise first_error
