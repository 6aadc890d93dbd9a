"""Every backend mmgen runs, in one table, and the one `auto` order.

A backend is one `BackendSpec` in `REGISTRY` plus one runner module (a `BaseRunner` subclass
named by `BackendSpec.runner`). Everything else reads this table: the runner class takes its
name, precisions and default device from its entry, `select.resolve_backend` walks `AUTO_ORDER`,
`mmgen bench` asks `runnable_precisions`, and the CLI help and `mmgen doctor` are written from
`backend_help`, `precision_help` and `describe_auto_order`.

Nothing heavy is imported here: a backend's library (torch, onnxruntime, openvino, tensorrt) is
imported only inside the check that needs it, when it runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmgen_deploy.cpuinfo import CpuFeatures
from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.specs import PRECISIONS, RUN_PRECISIONS, RUNTIME_PRECISIONS

if TYPE_CHECKING:
    from mmgen_deploy.config import DiTConfig, ModelConfig
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime.base import BaseRunner

AUTO = "auto"


@dataclass
class BackendChoice:
    """What `resolve_backend` decided, and why (shown by `generate`, `batch` and `eval`)."""

    backend: str  # a REGISTRY name
    precision: str  # one of the backend's precisions
    device: str  # cpu | cuda[:N] | gpu[.N] | npu
    reason: str  # why this one (for auto: why the faster ones were skipped)
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}: {self.reason}"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: what it runs, where, from which files, and how to tell it is installed."""

    name: str  # what --backend takes
    label: str  # how prose names it
    runner: str  # "module:Class" of its BaseRunner subclass, imported on demand
    modules: tuple[str, ...]  # Python modules of which one must import for it to run
    install_hint: str
    precisions: tuple[str, ...]  # what it runs; the first is its default when nothing else decides
    devices: tuple[str, ...]  # device kinds it runs on (cpu, cuda, gpu, npu)
    default_device: str
    reads: Mapping[str, str]  # precision -> the exported ONNX set it reads (empty: the torch weights)
    engine_sets: bool = False  # runs engine sets built from `reads` (checked by mmgen_deploy.engines)
    precision_devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # precisions limited to some
    # How to fix a precision it does not run; {backend} and {precision} name those settings (MMGenError.params).
    precision_hint: str = ""

    def onnx_set(self, precision: str) -> str | None:
        """The exported ONNX set this backend reads for `precision` (None: none, or not its precision)."""
        return self.reads.get(precision)

    def runs_on(self, precision: str, device_kind: str) -> bool:
        return precision in self.precisions and device_kind in self.precision_devices.get(precision, self.devices)

    def missing(self) -> str | None:
        """None when one of its Python modules is installed; else what to install (no import is done)."""
        for module in self.modules:
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
                continue
            if spec is not None and spec.origin is not None:  # a namespace package (type stubs only) is no library
                return None
        return f"{self.label} is not installed ({self.install_hint})"

    def runner_class(self) -> type[BaseRunner]:
        module_name, _, class_name = self.runner.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise NotAvailableError(f"the {self.label} backend is not available ({exc})",
                                    f"{self.install_hint}, or use another {{backend}}", params=["backend"]) from None
        cls: type[BaseRunner] = getattr(module, class_name)
        return cls


_TENSORRT_SETS = ("fp16", "int8", "fp8")  # the ONNX sets engines are built from (fp16 first: the default)

REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        name="torch", label="PyTorch", runner="mmgen_deploy.runtime.torch_runner:TorchRunner",
        modules=("torch",), install_hint="pip install torch",
        precisions=("fp32", "bf16"), devices=("cpu", "cuda"), default_device="cpu", reads={},
        precision_hint="for FP16 use {backend} onnxruntime {precision} fp16 or {backend} tensorrt"),
    BackendSpec(
        name="onnxruntime", label="ONNX Runtime", runner="mmgen_deploy.runtime.ort_runner:OrtRunner",
        modules=("onnxruntime",), install_hint="pip install onnxruntime (onnxruntime-gpu for CUDA)",
        precisions=PRECISIONS, devices=("cpu", "cuda"), default_device="cpu", reads={p: p for p in PRECISIONS},
        precision_hint="for BF16 use {backend} openvino {precision} bf16 (or {backend} torch {precision} bf16)"),
    BackendSpec(
        name="openvino", label="OpenVINO", runner="mmgen_deploy.runtime.openvino_runner:OpenVinoRunner",
        modules=("openvino",), install_hint="pip install 'mmgen-deploy[openvino]'",
        # fp32, bf16 and fp16 are inference hints on the FP32 graph; int8 runs the quantized Q/DQ set.
        precisions=("fp32", "bf16", "fp16", "int8"), devices=("cpu", "gpu", "npu"), default_device="cpu",
        reads={"fp32": "fp32", "int8": "int8", "fp16": "fp32", **RUNTIME_PRECISIONS},
        precision_devices={"fp16": ("gpu", "npu")},
        precision_hint="use {precision} bf16 (CPUs with AMX / AVX-512 BF16) or fp32"),
    BackendSpec(
        name="tensorrt", label="TensorRT", runner="mmgen_deploy.runtime.tensorrt_runner:TensorRTRunner",
        modules=("tensorrt", "tensorrt_rtx"), install_hint="pip install 'mmgen-deploy[tensorrt]'",
        precisions=_TENSORRT_SETS, devices=("cuda",), default_device="cuda",
        reads={p: p for p in _TENSORRT_SETS}, engine_sets=True,
        precision_hint="TensorRT engines are built from the fp16, int8 or fp8 ONNX set: use one of those precisions"),
)}

BACKEND_NAMES: tuple[str, ...] = tuple(REGISTRY)
# The embedded default: what runs wherever mmgen is installed, and what `auto` must never be slower
# than (its FP32 set on the CPU).
DEFAULT_BACKEND = "onnxruntime"
BACKENDS: tuple[str, ...] = (AUTO, *BACKEND_NAMES)  # what --backend takes


def backend_spec(name: str) -> BackendSpec:
    """The registry entry of a concrete backend; a UsageError naming the choices for anything else."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise UsageError(f"unknown backend {name!r}", f"choose one of {', '.join(BACKENDS)}")
    return spec


def backends_on(device_kind: str) -> tuple[str, ...]:
    """The backends that run on a device kind, in registry order (cpu: torch, onnxruntime, openvino)."""
    return tuple(name for name, spec in REGISTRY.items() if device_kind in spec.devices)


def backend_labels(device_kind: str) -> str:
    """How prose names the backends that run on a device kind: "PyTorch / ONNX Runtime / OpenVINO"."""
    return " / ".join(REGISTRY[name].label for name in backends_on(device_kind))


def deployment_targets() -> str:
    """The backends that run exported graphs, in prose: "ONNX Runtime, OpenVINO and TensorRT"."""
    labels = [spec.label for spec in REGISTRY.values() if spec.reads]
    return f"{', '.join(labels[:-1])} and {labels[-1]}"


def spec_of_runner(path: str) -> BackendSpec | None:
    """The entry whose runner is `module:Class` (None for a runner no entry names)."""
    return next((spec for spec in REGISTRY.values() if spec.runner == path), None)


# -- the auto rule for OpenVINO BF16 on a CPU -------------------------------------------------------

# Below this many GFLOP per denoiser evaluation (one image, batch 1) OpenVINO's fixed cost per
# process (compiling or importing each component, ~1-3 s) outweighs what BF16 saves per step even
# on an AMX CPU; above it OpenVINO BF16 generates faster than ONNX Runtime FP32. Measured with whole
# `mmgen generate` processes (docs/design/auto-backend.md, benchmarks/RESULTS.md).
OPENVINO_BF16_MIN_GFLOP = 2.0


def denoiser_gflop(dit: DiTConfig) -> float:
    """GFLOP of one denoiser evaluation of one image (2 per multiply-add), from the config alone:
    patch embedding, per block attention (+ cross-attention for text), MLP and adaLN, final layer."""
    tokens = (dit.input_size // dit.patch_size) ** 2
    width = dit.hidden_size
    mlp = int(width * dit.mlp_ratio)
    per_block = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width + 6 * width * width
    if dit.uses_cross_attention:
        text = dit.text_length
        per_block += 2 * tokens * width * width + 2 * text * dit.text_dim * width + 2 * tokens * text * width
    patch_in = dit.patch_size ** 2 * dit.in_channels
    patch_out = dit.patch_size ** 2 * dit.out_channels
    macs = dit.depth * per_block + tokens * width * (patch_in + patch_out) + 2 * width * width
    return 2 * macs / 1e9


def openvino_bf16_verdict(features: CpuFeatures, gflop: float | None) -> str | None:
    """None when OpenVINO BF16 is expected to generate faster than ONNX Runtime FP32 (the embedded
    default) on a CPU with `features` for a denoiser of `gflop` per evaluation; else why not.

    A pure function of what it is given: BF16 pays only on AMX (on AVX-512 BF16 without AMX it
    measured 0.93x FP32), and only for a model large enough to repay OpenVINO's fixed cost."""
    if not features.amx:
        if features.native_bf16:
            return ("this CPU has AVX-512 BF16 but no AMX, where BF16 measured no faster than FP32 "
                    "(ONNX Runtime FP32 is its fastest path)")
        return "this CPU has no AMX or AVX-512 BF16 (FP32 is its fastest exact path)"
    if gflop is None:
        return "the run's config is unreadable, so its size is unknown"
    if gflop < OPENVINO_BF16_MIN_GFLOP:
        return (f"the denoiser is {gflop:.2g} GFLOP per evaluation, below {OPENVINO_BF16_MIN_GFLOP:g}: "
                "OpenVINO's compile / import time outweighs what BF16 saves")
    return None


def openvino_default_precision(features: CpuFeatures, device: str | None) -> tuple[str, str]:
    """OpenVINO's precision when none is asked for, and why: fp16 on Intel GPUs / NPUs, bf16 on an
    AMX CPU, else fp32 (AVX-512 BF16 without AMX is no faster than FP32)."""
    kind = device_kind(device) if device else "cpu"
    if kind in ("gpu", "npu"):
        return "fp16", f"fp16 is OpenVINO's precision on {kind.upper()}s"
    if features.amx:
        return "bf16", "bf16 because this CPU has AMX (precision fp32 is FP32-exact)"
    return "fp32", "fp32 because this CPU has no AMX, where BF16 is no faster"


def named_choice(backend: str, run: RunDir, precision: str | None, device: str | None,
                 features: CpuFeatures) -> BackendChoice:
    """A backend asked for by name: its precision and device (asked for, or its default here) and why."""
    from mmgen_deploy.specs import sampling_components

    spec = backend_spec(backend)
    if precision is not None and precision not in spec.precisions:
        raise UsageError(f"the {backend} backend runs {' or '.join(spec.precisions)}, not {precision!r}",
                         spec.precision_hint, params=["backend", "precision"])
    reason = "requested"
    if backend == "openvino" and precision is None:
        precision, why = openvino_default_precision(features, device)
        reason = f"requested; {why}"
    elif backend == "onnxruntime":
        cuda = device.startswith("cuda") if device else ort_cuda_usable()
        device = "cuda" if cuda else "cpu"
        if precision is None:
            # FP16 on GPUs when that set was exported; CPUs have no fast FP16 kernels.
            try:
                needed = sampling_components(run.load_config())
            except MMGenError:
                needed = sampling_components(None)  # the backend's own loading reports the broken run
            fp16 = cuda and not run.missing_onnx("fp16", needed)
            precision = "fp16" if fp16 else spec.precisions[0]
    elif backend == "torch" and device is None:
        device = "cuda" if torch_cuda() else "cpu"
    return BackendChoice(backend, precision or spec.precisions[0], device or spec.default_device, reason)


# -- devices ------------------------------------------------------------------------------------------

DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda", "gpu", "npu")


def device_kind(device: str) -> str:
    """cuda:1 -> cuda, gpu.0 -> gpu, NPU -> npu."""
    return device.strip().lower().split(":")[0].split(".")[0]


# -- the auto walk ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoRequest:
    """What the walk is asked: the run, the precision and device asked for (None: any)."""

    run: RunDir
    config: ModelConfig | None
    needed: tuple[str, ...]  # the components sampling this run needs
    precision: str | None
    device: str | None
    features: CpuFeatures

    def wants_device(self, kind: str) -> bool:
        return self.device is None or device_kind(self.device) == kind


# A step's answer: a choice, why it was skipped, or None (it does not apply: nothing to say).
StepAnswer = BackendChoice | str | None


@dataclass(frozen=True)
class AutoStep:
    backend: str
    label: str  # how `BackendChoice.skipped` names it
    summary: str  # how the help names it
    consider: Callable[[AutoRequest], StepAnswer]
    fall_through: bool = False  # passing the checks but failing to load continues the walk


def _tensorrt_step(req: AutoRequest) -> StepAnswer:
    if req.precision is not None and req.precision not in REGISTRY["tensorrt"].precisions:
        return f"engines are {' / '.join(REGISTRY['tensorrt'].precisions)} and {req.precision} was asked for"
    if not req.wants_device("cuda"):
        return f"needs a GPU and device {req.device} was asked for"
    precision = req.precision or REGISTRY["tensorrt"].precisions[0]
    problem = tensorrt_problem(req.run, req.needed, precision)
    if problem is not None:
        return problem
    return BackendChoice("tensorrt", precision, "cuda", "engines are built and a GPU is visible")


def _ort_cuda_step(req: AutoRequest) -> StepAnswer:
    if req.precision is not None and not REGISTRY["onnxruntime"].runs_on(req.precision, "cuda"):
        return None
    if not req.wants_device("cuda"):
        return None
    if not ort_cuda_usable():
        return "onnxruntime-gpu or a GPU missing"
    precision = req.precision or "fp16"
    if req.run.missing_onnx(precision, req.needed):
        return f"no {precision} ONNX set"
    return BackendChoice("onnxruntime", precision, "cuda", "ONNX set exported and CUDA provider usable")


def _openvino_step(req: AutoRequest) -> StepAnswer:
    runtime_precision = next(iter(RUNTIME_PRECISIONS))  # bf16, lowered from the FP32 set
    if req.precision not in (None, runtime_precision) or not req.wants_device("cpu"):
        return None
    if req.precision is None:
        gflop = denoiser_gflop(req.config.dit) if req.config is not None else None
        problem = openvino_bf16_verdict(req.features, gflop)
        why = (f"this CPU has AMX and the denoiser is {gflop or 0:.3g} GFLOP per evaluation (>= "
               f"{OPENVINO_BF16_MIN_GFLOP:g}), where OpenVINO BF16 measured faster than ONNX Runtime FP32; "
               "precision fp32 is FP32-exact")
    else:
        problem = None if req.features.native_bf16 else "this CPU has no AMX or AVX-512 BF16"
        why = f"{runtime_precision} asked for and this CPU has {bf16_units(req.features)}"
    problem = problem or REGISTRY["openvino"].missing()
    if problem is None:
        source = REGISTRY["openvino"].reads[runtime_precision]
        missing = req.run.missing_onnx(source, req.needed)
        if missing:
            problem = (f"no complete {source} ONNX set (missing {', '.join(p.name for p in missing)}; "
                       "run `mmgen export`)")
    if problem is not None:
        return problem
    return BackendChoice("openvino", runtime_precision, "cpu", why)


def _ort_cpu_step(req: AutoRequest) -> StepAnswer:
    precision = req.precision or "fp32"
    if not REGISTRY["onnxruntime"].runs_on(precision, "cpu"):
        return None
    missing = req.run.missing_onnx(precision, req.needed)
    if missing:
        return (f"no complete {precision} ONNX set (missing {', '.join(p.name for p in missing)}; "
                "run `mmgen export`)")
    return BackendChoice("onnxruntime", precision, "cpu", f"fastest available here ({precision} ONNX set on CPU)")


def _torch_step(req: AutoRequest) -> StepAnswer:
    precision = req.precision or REGISTRY["torch"].precisions[0]
    if precision not in REGISTRY["torch"].precisions:
        return None
    if precision in RUNTIME_PRECISIONS:
        if not req.features.native_bf16:
            return None  # nothing runs it here: the walk's end says so
        return BackendChoice("torch", precision, "cpu", f"{precision} asked for and OpenVINO cannot run it: "
                             "PyTorch autocast")
    device = "cuda" if torch_cuda() else "cpu"
    return BackendChoice("torch", precision, device, "nothing exported yet, using PyTorch eager")


AUTO_ORDER: tuple[AutoStep, ...] = (
    AutoStep("tensorrt", "tensorrt", "TensorRT engines", _tensorrt_step, fall_through=True),
    AutoStep("onnxruntime", "onnxruntime cuda", "ONNX Runtime CUDA", _ort_cuda_step),
    AutoStep("openvino", "openvino bf16", f"OpenVINO BF16 (AMX CPU, denoiser >= {OPENVINO_BF16_MIN_GFLOP:g} "
             "GFLOP)", _openvino_step, fall_through=True),
    AutoStep("onnxruntime", "onnxruntime cpu", "ONNX Runtime CPU", _ort_cpu_step),
    AutoStep("torch", "torch", "PyTorch", _torch_step),
)


def nothing_runs(precision: str | None, features: CpuFeatures) -> MMGenError:
    """The error at the end of a walk that found no backend for `precision`."""
    if precision in RUNTIME_PRECISIONS:
        return NotAvailableError(f"{precision} was asked for but this CPU has no AMX or AVX-512 BF16",
                                 "use {precision} fp32", params=["precision"])
    export = "`mmgen export RUN_DIR`" if precision == "fp16" else f"`mmgen export RUN_DIR --precision {precision}`"
    return NotAvailableError(f"no backend can run {precision} here (no engines, no {precision} ONNX set)",
                             f"run {export} or use {{precision}} fp32", params=["precision"])


# -- checks the steps use (each imports its library only when called) ---------------------------------

def bf16_units(features: CpuFeatures) -> str:
    """"AMX-BF16 and AVX-512 BF16", "AVX-512 BF16 (no AMX)" or "no BF16 units"."""
    units = [name for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16"))
             if flag in features.flags]
    if units and not features.amx:
        return " and ".join(units) + " (no AMX)"
    return " and ".join(units) or "no BF16 units"


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def ort_cuda_usable() -> bool:
    from mmgen_deploy.runtime.ort_runner import cuda_provider_usable

    return cuda_provider_usable()


def tensorrt_problem(run: RunDir, needed: tuple[str, ...], precision: str) -> str | None:
    """None when a TensorRT engine set of `precision` for this run is built, current and runnable
    here with every component in `needed`; else why not."""
    try:
        from mmgen_deploy.engines.manifest import current_gpu, select_engine_set
    except ImportError as exc:
        return f"TensorRT backend unavailable ({exc.name or exc})"
    try:
        gpu = current_gpu()
        _flavour, engine_set = select_engine_set(run, None, precision, gpu)
        # A set built with -c for a few components (or before the text encoder existed) cannot sample.
        missing = [c for c in needed if c not in engine_set.components]
        if missing:
            return f"the engine set has no {', '.join(missing)} engine (build it: `mmgen build-engine RUN_DIR`)"
    except MMGenError as exc:
        return f"no usable TensorRT engines ({exc.message})"
    except Exception as exc:  # an engines module of another version: do not let auto crash on it
        return f"TensorRT check failed ({type(exc).__name__}: {exc})"
    if gpu is None:
        return "TensorRT engines are built but no CUDA device is visible"
    return None


def runnable_precisions(run: RunDir, backend: str, features: CpuFeatures) -> list[str]:
    """Every precision `backend` can run on this run here, on its default device: those whose
    exported set (or built engine set) exists, and the runtime precisions (bf16) where the CPU
    has BF16 units; at least its default precision, so that opening it says what is missing."""
    spec = backend_spec(backend)
    if spec.engine_sets:
        from mmgen_deploy.engines.manifest import built_engine_precisions

        built = built_engine_precisions(run)
        found = [p for p in spec.precisions if p in built]
    else:
        found = []
        for precision in spec.precisions:
            if not spec.runs_on(precision, spec.default_device):
                continue
            if precision in RUNTIME_PRECISIONS and not features.native_bf16:
                continue
            source = spec.onnx_set(precision)
            if source is None or (run.onnx_dir / source).is_dir():
                found.append(precision)
    return found or [spec.precisions[0]]


# -- what the CLI help and `mmgen doctor` say ---------------------------------------------------------

def describe_auto_order() -> str:
    """The auto order in words: "TensorRT engines, then ONNX Runtime CUDA, then ..."."""
    return ", then ".join(step.summary for step in AUTO_ORDER)


def backend_list(*, with_auto: bool = False) -> str:
    """The backend names in prose: "torch, onnxruntime, openvino or tensorrt" (auto first if asked)."""
    names = BACKENDS if with_auto else BACKEND_NAMES
    return f"{', '.join(names[:-1])} or {names[-1]}"


def backend_help() -> str:
    """The help of a --backend option that takes auto."""
    return (f"{backend_list(with_auto=True)}. {AUTO} picks the fastest available here: {describe_auto_order()}; "
            "the choice and its reason are printed.")


def precision_list() -> str:
    """Every precision name in prose: "fp32, fp16, int8, fp8 or bf16"."""
    return f"{', '.join(RUN_PRECISIONS[:-1])} or {RUN_PRECISIONS[-1]}"


def precision_help(*, backend_default: bool = True) -> str:
    """The help of a --precision option that picks what a backend runs (`backend_default`: leaving
    it out lets the backend choose)."""
    exported = ", ".join(PRECISIONS)
    runtime = ", ".join(RUNTIME_PRECISIONS)
    lowering = " or ".join(name for name, spec in REGISTRY.items()
                           if any(p in spec.precisions for p in RUNTIME_PRECISIONS))
    text = (f"{exported}: which exported ONNX set (or engine set) to run; {runtime}: the FP32 set lowered at "
            f"run time ({lowering}).")
    if backend_default:
        text += " Default: the backend's own (fp16 on GPUs, bf16 for OpenVINO on AMX CPUs, else fp32)."
    return text


def capabilities() -> list[tuple[str, str]]:
    """(backend, "precisions on devices") per entry, for tables such as `mmgen doctor`'s."""
    rows = []
    for spec in REGISTRY.values():
        parts = []
        for precision in spec.precisions:
            devices = spec.precision_devices.get(precision, spec.devices)
            parts.append(precision if devices == spec.devices else f"{precision} ({'/'.join(devices)})")
        rows.append((spec.name, f"{', '.join(parts)} on {', '.join(spec.devices)}"))
    return rows


def check_precision_name(precision: str | None) -> None:
    if precision is not None and precision not in RUN_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}", f"choose one of {', '.join(RUN_PRECISIONS)}")
