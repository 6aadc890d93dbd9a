"""Which backend runs a run directory: the selection policy behind `--backend`.

`resolve_backend` decides backend, precision and device without loading any model;
`open_runner` opens what it decided and returns the runner together with that choice.
"auto" takes the fastest that is available and runnable here: TensorRT engines, then
ONNX Runtime CUDA, then OpenVINO BF16 (a CPU with AMX or AVX-512 BF16 and OpenVINO
installed), then ONNX Runtime CPU, then PyTorch; a TensorRT set or OpenVINO that passes
the checks but fails to load falls back to the next one. Heavy modules (torch,
onnxruntime, openvino, tensorrt) are imported only by the backend used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmgen_deploy.cpuinfo import cpu_features
from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.runtime.base import BACKENDS, BaseRunner
from mmgen_deploy.specs import RUN_PRECISIONS, sampling_components

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig



def _config_or_none(run: RunDir) -> ModelConfig | None:
    try:
        return run.load_config()
    except MMGenError:
        return None  # the backend's own loading reports the broken run


@dataclass
class BackendChoice:
    backend: str  # torch | onnxruntime | openvino | tensorrt
    precision: str  # fp32 | fp16 | bf16 | int8 | fp8
    device: str  # cpu | cuda (OpenVINO: cpu | gpu | npu)
    reason: str  # why this one (for auto: why the faster ones were skipped)
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}: {self.reason}"


def runner_class(backend: str) -> type[BaseRunner]:
    """The `BaseRunner` subclass of a concrete backend (imported on demand)."""
    if backend == "torch":
        from mmgen_deploy.runtime.torch_runner import TorchRunner

        return TorchRunner
    if backend == "onnxruntime":
        from mmgen_deploy.runtime.ort_runner import OrtRunner

        return OrtRunner
    if backend == "openvino":
        from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

        return OpenVinoRunner
    if backend == "tensorrt":
        try:
            from mmgen_deploy.runtime.tensorrt_runner import TensorRTRunner
        except ImportError as exc:
            raise NotAvailableError(f"the TensorRT backend is not available ({exc})",
                                    "install mmgen-deploy with the TensorRT extra, or use --backend onnxruntime"
                                    ) from None
        return TensorRTRunner
    raise UsageError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _tensorrt_check(run_dir: RunLike, needed: tuple[str, ...] | None = None, precision: str = "fp16") -> str | None:
    """None when a TensorRT engine set for this run is built, current and runnable here; else why not.
    `needed`: the components it must hold (default: what sampling this run needs)."""
    run = RunDir.of(run_dir)
    if needed is None:
        needed = sampling_components(_config_or_none(run))
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


def _bf16_units() -> str:
    flags = cpu_features().flags
    units = [name for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX-512 BF16", "avx512_bf16")) if flag in flags]
    return " and ".join(units) or "no BF16 units"


def _openvino_default_precision(device: str | None) -> str:
    """bf16 on a CPU with BF16 units, fp16 on Intel GPUs / NPUs, else fp32."""
    if device is not None and device.lower().split(".")[0] in ("gpu", "npu"):
        return "fp16"
    return "bf16" if cpu_features().native_bf16 else "fp32"


def _openvino_check(run: RunDir, needed: tuple[str, ...]) -> str | None:
    """None when OpenVINO can run BF16 here on this run's FP32 ONNX set; else why not."""
    from mmgen_deploy.runtime.openvino_runner import openvino_available

    if not cpu_features().native_bf16:
        return "this CPU has no AMX or AVX-512 BF16 (FP32 is its fastest exact path)"
    if not openvino_available():
        return "OpenVINO is not installed (pip install 'mmgen-deploy[openvino]')"
    missing = run.missing_onnx("fp32", needed)
    if missing:
        return f"no complete fp32 ONNX set (missing {', '.join(p.name for p in missing)}; run `mmgen export`)"
    return None


def check_backend_name(backend: str, precision: str | None = None) -> None:
    """A UsageError for a backend or precision name that no runner has (checked before any work)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in RUN_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}", f"choose one of {', '.join(RUN_PRECISIONS)}")


# Device names: cpu and cuda[:N] (torch, ONNX Runtime, TensorRT), and OpenVINO's own gpu[.N] / npu
# (Intel GPUs and NPUs).
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|gpu(\.\d+)?|npu)$")
_OPENVINO_ONLY = re.compile(r"^(gpu(\.\d+)?|npu)$")


def check_device(backend: str, device: str | None) -> str | None:
    """`device` lower-cased, or a UsageError when it is no device name or not one `backend` runs on."""
    if device is None:
        return None
    name = device.strip().lower()
    if not _DEVICE.match(name):
        raise UsageError(f"unknown device {device!r}", "use cpu or cuda (cuda:N); with --backend openvino also "
                                                       "gpu, gpu.N or npu")
    if _OPENVINO_ONLY.match(name) and backend not in ("openvino", "auto"):
        raise UsageError(f"--device {name} is an OpenVINO device (Intel GPU / NPU), not one {backend} runs on",
                         "use --backend openvino, or --device cuda for an NVIDIA GPU")
    if name.startswith("cuda") and backend == "openvino":
        raise UsageError("OpenVINO runs on cpu, gpu or npu, not cuda",
                         "use --backend onnxruntime or tensorrt for an NVIDIA GPU")
    return name


def resolve_backend(backend: str, run_dir: RunLike, precision: str | None = None, *,
                    device: str | None = None, allow_tensorrt: bool = True,
                    allow_openvino: bool = True) -> BackendChoice:
    """Decide backend, precision and device without loading any model.

    `precision` None means the backend's natural choice (fp16 for TensorRT and ONNX Runtime
    CUDA, fp32 on CPUs, where FP16 kernels are slower; OpenVINO: bf16 on CPUs with BF16 units).
    For "auto" the order is TensorRT, ONNX Runtime CUDA, OpenVINO BF16 (CPU with AMX or AVX-512
    BF16, OpenVINO installed, FP32 set exported), ONNX Runtime CPU, PyTorch. `--precision fp32`
    keeps ONNX Runtime, the FP32-exact path.
    """
    check_backend_name(backend, precision)
    device = check_device(backend, device)
    run = RunDir.of(run_dir)
    if backend == "auto" and device is not None and _OPENVINO_ONLY.match(device):
        backend = "openvino"  # only OpenVINO runs on an Intel GPU or NPU
    if backend == "torch":
        if precision not in (None, "fp32", "bf16"):
            raise UsageError("the torch backend runs FP32 or BF16 (autocast)",
                             f"use --backend onnxruntime --precision {precision} or --backend tensorrt")
        dev = device or ("cuda" if _torch_cuda() else "cpu")
        return BackendChoice("torch", precision or "fp32", dev, "requested")
    if backend == "openvino":
        return BackendChoice("openvino", precision or _openvino_default_precision(device), device or "cpu",
                             "requested")
    if backend == "onnxruntime" and precision == "bf16":
        raise UsageError("ONNX Runtime has no BF16 path for these graphs",
                         "use --backend openvino --precision bf16 (or --backend torch --precision bf16)")
    if backend == "tensorrt":
        if precision in ("fp32", "bf16"):
            raise UsageError("TensorRT engines are built from the fp16, int8 or fp8 ONNX set",
                             "use --precision fp16 (or leave it out), int8 or fp8 with --backend tensorrt")
        return BackendChoice("tensorrt", precision or "fp16", device or "cuda", "requested")
    from mmgen_deploy.runtime.ort_runner import cuda_provider_usable

    needed = sampling_components(_config_or_none(run))
    if backend == "onnxruntime":
        cuda = device.startswith("cuda") if device else cuda_provider_usable()
        # FP16 on GPUs when that set was exported; CPUs have no fast FP16 kernels.
        prec = precision or ("fp16" if cuda and not run.missing_onnx("fp16", needed) else "fp32")
        return BackendChoice("onnxruntime", prec, "cuda" if cuda else "cpu", "requested")

    # auto
    skipped: list[str] = []
    if not allow_tensorrt:
        pass  # the caller already knows why (a failed load)
    elif precision in ("fp32", "bf16"):
        skipped.append(f"tensorrt: engines are fp16 / int8 / fp8 and {precision} was asked for")
    elif device is not None and not device.startswith("cuda"):
        skipped.append(f"tensorrt: needs a GPU and --device {device} was asked for")
    else:
        trt_precision = precision or "fp16"
        problem = _tensorrt_check(run, needed, trt_precision)
        if problem is None:
            return BackendChoice("tensorrt", trt_precision, "cuda", "engines are built and a GPU is visible", skipped)
        skipped.append(f"tensorrt: {problem}")
    if precision == "bf16":
        pass  # ONNX Runtime has no BF16 path
    elif device is None or device.startswith("cuda"):
        if cuda_provider_usable():
            prec = precision or "fp16"
            if not run.missing_onnx(prec, needed):
                return BackendChoice("onnxruntime", prec, "cuda", "ONNX set exported and CUDA provider usable",
                                     skipped)
            skipped.append(f"onnxruntime cuda: no {prec} ONNX set")
        else:
            skipped.append("onnxruntime cuda: onnxruntime-gpu or a GPU missing")
    if precision in (None, "bf16") and (device is None or device == "cpu"):
        problem = _openvino_check(run, needed) if allow_openvino else None
        if allow_openvino and problem is None:
            return BackendChoice("openvino", "bf16", "cpu", f"this CPU has {_bf16_units()} and OpenVINO is "
                                 "installed: BF16 on the FP32 ONNX set (pass --precision fp32 for FP32)", skipped)
        if problem is not None:
            skipped.append(f"openvino bf16: {problem}")
        if precision == "bf16":
            if not cpu_features().native_bf16:
                raise NotAvailableError("bf16 was asked for but this CPU has no AMX or AVX-512 BF16",
                                        "use --precision fp32")
            return BackendChoice("torch", "bf16", "cpu", "BF16 asked for and OpenVINO cannot run it: PyTorch "
                                 "autocast", skipped)
    prec = precision or "fp32"
    missing = run.missing_onnx(prec, needed)
    if not missing:
        return BackendChoice("onnxruntime", prec, "cpu", f"fastest available here ({prec} ONNX set on CPU)",
                             skipped)
    skipped.append(f"onnxruntime cpu: no complete {prec} ONNX set (missing {', '.join(p.name for p in missing)}; "
                   "run `mmgen export`)")
    if prec != "fp32":
        export = "`mmgen export RUN_DIR`" if prec == "fp16" else f"`mmgen export RUN_DIR --precision {prec}`"
        raise NotAvailableError(f"no backend can run {prec} here (no engines, no {prec} ONNX set)",
                                f"run {export} or use --precision fp32")
    return BackendChoice("torch", "fp32", "cuda" if _torch_cuda() else "cpu",
                         "nothing exported yet, using PyTorch eager", skipped)


def open_choice(choice: BackendChoice, run_dir: RunLike, **options: Any) -> BaseRunner:
    """Open the backend a `BackendChoice` names; options it does not take are ignored."""
    return runner_class(choice.backend).from_run_dir(RunDir.of(run_dir), choice.precision, choice.device, **options)


def open_runner(run_dir: RunLike, backend: str = "auto", precision: str | None = None, *,
                device: str | None = None, **options: Any) -> tuple[BaseRunner, BackendChoice]:
    """Open a runner for a run directory; return it with the `BackendChoice` that says what ran and why.

    With "auto", a TensorRT set or OpenVINO that passes the checks but fails to load falls back
    to the next backend (the reason is kept in `choice.skipped`). `options` go to the backend
    (`threads=` for torch and ONNX Runtime, `cuda_graph=`, `runtime=` for TensorRT, ...).
    """
    run = RunDir.of(run_dir)
    choice = resolve_backend(backend, run, precision, device=device)
    try:
        return open_choice(choice, run, **options), choice
    except MMGenError as exc:
        if backend != "auto" or choice.backend not in ("tensorrt", "openvino"):
            raise
        fallback = resolve_backend("auto", run, precision, device=device, allow_tensorrt=False,
                                   allow_openvino=choice.backend != "openvino")
        fallback.skipped.insert(0, f"{choice.backend}: failed to load ({exc.message})")
        return open_choice(fallback, run, **options), fallback
