"""Which backend runs a run directory: the selection policy behind `--backend`.

`resolve_backend` decides backend, precision and device without loading any model;
`open_runner` opens what it decided and returns the runner together with that choice.
"auto" walks `backends.AUTO_ORDER`, the one order (see `backends.describe_auto_order`), and
takes the first step whose checks pass; a step that passes its checks but fails to load
(TensorRT, OpenVINO) continues the same walk. Heavy modules (torch, onnxruntime, openvino,
tensorrt) are imported only by the backend used.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from mmgen_deploy.cpuinfo import CpuFeatures, cpu_features
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.runtime.backends import (
    AUTO,
    AUTO_ORDER,
    BACKENDS,
    DEVICE_KINDS,
    REGISTRY,
    AutoRequest,
    AutoStep,
    BackendChoice,
    backend_spec,
    check_precision_name,
    device_kind,
    named_choice,
    nothing_runs,
)
from mmgen_deploy.runtime.base import BaseRunner
from mmgen_deploy.specs import sampling_components

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig

__all__ = ["BackendChoice", "check_backend_name", "check_device", "open_choice", "open_runner", "resolve_backend",
           "runner_class"]


def _config_or_none(run: RunDir) -> ModelConfig | None:
    try:
        return run.load_config()
    except MMGenError:
        return None  # the backend's own loading reports the broken run


def runner_class(backend: str) -> type[BaseRunner]:
    """The `BaseRunner` subclass of a concrete backend (imported on demand)."""
    return backend_spec(backend).runner_class()


def check_backend_name(backend: str, precision: str | None = None) -> None:
    """A UsageError for a backend or precision name that no runner has (checked before any work)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    check_precision_name(precision)


def _device_names(backends: list[str]) -> str:
    return ", ".join(sorted({kind for name in backends for kind in REGISTRY[name].devices}))


def check_device(backend: str, device: str | None) -> str | None:
    """`device` lower-cased, or a UsageError when it is no device name or not one `backend` runs on.
    Device names: cpu, cuda[:N], and OpenVINO's gpu[.N] and npu (Intel GPUs and NPUs)."""
    if device is None:
        return None
    name = device.strip().lower()
    kind = device_kind(name)
    index = name[len(kind):]
    separator = "." if kind == "gpu" else ":"
    if kind not in DEVICE_KINDS or not (index == "" or (kind in ("cuda", "gpu") and index[:1] == separator
                                                           and index[1:].isdigit())):
        raise UsageError(f"unknown device {device!r}", "use cpu or cuda (cuda:N); with {backend} openvino also "
                                                       "gpu, gpu.N or npu", params=["backend"])
    if backend == AUTO:
        return name
    spec = backend_spec(backend)
    if kind not in spec.devices:
        owners = [n for n, s in REGISTRY.items() if kind in s.devices]
        raise UsageError(f"{spec.label} runs on {', '.join(spec.devices)}, not {kind}",
                         f"use {{backend}} {' or '.join(owners)} for {kind}, or {{device}} "
                         f"{' or '.join(spec.devices)}", params=["backend", "device"])
    return name


def auto_choices(run_dir: RunLike, precision: str | None = None, *, device: str | None = None,
                 features: CpuFeatures | None = None) -> Generator[tuple[AutoStep, BackendChoice], str, None]:
    """Walk `AUTO_ORDER`, yielding every step whose checks pass, in order, with its choice (whose
    `skipped` says why the steps before it were not taken). Send why a yielded choice failed to load
    to go on walking; at the end of the walk it raises why nothing can run `precision`."""
    run = RunDir.of(run_dir)
    config = _config_or_none(run)
    request = AutoRequest(run, config, sampling_components(config), precision, device, features or cpu_features())
    skipped: list[str] = []
    for step in AUTO_ORDER:
        answer = step.consider(request)
        if isinstance(answer, BackendChoice):
            answer.skipped = list(skipped)
            failure = yield step, answer
            skipped.append(f"{step.label}: failed to load ({failure})")
        elif answer is not None:
            skipped.append(f"{step.label}: {answer}")
    raise nothing_runs(precision, request.features)


def _named_backend(backend: str, device: str | None) -> str:
    """`backend`, or under auto the one backend that runs on `device` when only one does (OpenVINO on
    an Intel GPU or NPU)."""
    if backend == AUTO and device is not None:
        owners = [name for name, spec in REGISTRY.items() if device_kind(device) in spec.devices]
        if len(owners) == 1:
            return owners[0]
    return backend


def resolve_backend(backend: str, run_dir: RunLike, precision: str | None = None, *,
                    device: str | None = None) -> BackendChoice:
    """Decide backend, precision and device without loading any model.

    `precision` None means the backend's natural choice (fp16 for TensorRT and ONNX Runtime
    CUDA, fp32 on CPUs, where FP16 kernels are slower; OpenVINO: bf16 on AMX CPUs).
    "auto" takes the first step of `backends.AUTO_ORDER` whose checks pass here.
    """
    check_backend_name(backend, precision)
    device = check_device(backend, device)
    run = RunDir.of(run_dir)
    backend = _named_backend(backend, device)
    if backend != AUTO:
        return named_choice(backend, run, precision, device, cpu_features())
    _step, choice = next(auto_choices(run, precision, device=device))
    return choice


def open_choice(choice: BackendChoice, run_dir: RunLike, **options: Any) -> BaseRunner:
    """Open the backend a `BackendChoice` names; options it does not take are ignored."""
    return runner_class(choice.backend).from_run_dir(RunDir.of(run_dir), choice.precision, choice.device, **options)


def open_runner(run_dir: RunLike, backend: str = AUTO, precision: str | None = None, *,
                device: str | None = None, **options: Any) -> tuple[BaseRunner, BackendChoice]:
    """Open a runner for a run directory; return it with the `BackendChoice` that says what ran and why.

    With "auto", a step that passes its checks but fails to load (a TensorRT set, OpenVINO)
    continues the same walk (the reason is kept in `choice.skipped`). `options` go to the backend
    (`threads=` for torch and ONNX Runtime, `cuda_graph=`, `runtime=` for TensorRT, ...).
    """
    run = RunDir.of(run_dir)
    check_backend_name(backend, precision)
    device = check_device(backend, device)
    if _named_backend(backend, device) != AUTO:
        choice = resolve_backend(backend, run, precision, device=device)
        return open_choice(choice, run, **options), choice
    walk = auto_choices(run, precision, device=device)
    step, choice = next(walk)
    while True:
        try:
            return open_choice(choice, run, **options), choice
        except MMGenError as exc:
            if not step.fall_through:
                raise
            step, choice = walk.send(exc.message)
