"""OpenVINO backend: the exported FP32 ONNX set of a run directory on CPU (default), GPU or NPU.

OpenVINO reads ONNX directly. The precision is an inference hint on the FP32 graph, not
another graph: `fp32` asks for f32 (FP32-exact), `bf16` for bf16 (AMX / AVX-512 BF16 on
the CPU), `fp16` for f16 (Intel GPUs and NPUs). Components the spec keeps FP32 (the
quantizer: BF16 distances flip code indices) are always compiled with the f32 hint.

One compiled model per (component, batch): the graph is reshaped to the static batch and
compiled on first use of that batch (`batch_mode="static"`, the default; measured faster
than one dynamic-batch compilation at every batch, see the README), and each gets one
infer request whose output tensors wrap preallocated NumPy buffers, so a sampling step
allocates nothing new. No torch import here.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.errors import NotAvailableError, RunDirError, UsageError
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.runtime.base import BaseRunner
from mmgen_deploy.specs import RUN_PRECISIONS, RUNTIME_PRECISIONS, ComponentSpec

# precision -> OpenVINO's INFERENCE_PRECISION_HINT. The graph is the FP32 set for fp32 and the
# runtime precisions (bf16; fp16 too: OpenVINO lowers it itself, on GPUs and NPUs), else the set of
# that name (a quantized Q/DQ int8 set: OpenVINO runs its quantized ops in INT8, the rest in f32).
HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def onnx_set_of(precision: str) -> str:
    """The exported ONNX set OpenVINO reads for `precision`."""
    return "fp32" if precision == "fp16" else RUNTIME_PRECISIONS.get(precision, precision)


BATCH_MODES = ("static", "dynamic")
# Compiled batch sizes kept per component (the sampling loop uses one or two).
_KEEP_BATCHES = 4
_INSTALL_HINT = "pip install 'mmgen-deploy[openvino]' (or pip install openvino)"


def default_cache_dir() -> Path | None:
    """Where compiled models are cached across processes: $MMGEN_CACHE_DIR/openvino, else
    $XDG_CACHE_HOME/mmgen/openvino, else ~/.cache/mmgen/openvino; MMGEN_CACHE_DIR="" turns it off.
    OpenVINO keys each blob by the model and the device, so a re-export compiles anew; each inference
    hint gets its own subfolder (see `_compile_config`)."""
    root = os.environ.get("MMGEN_CACHE_DIR")
    if root is not None:
        return Path(root) / "openvino" if root else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmgen" / "openvino"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise NotAvailableError(f"OpenVINO is not installed ({exc})", _INSTALL_HINT) from None
    return openvino


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_device_name(device: str) -> str:
    """mmgen's device spelling (cpu, gpu, gpu.1, npu; any case) -> OpenVINO's (CPU, GPU.1, NPU)."""
    name = device.strip().upper()
    if name.split(".")[0] not in ("CPU", "GPU", "NPU", "AUTO"):
        raise UsageError(f"unknown OpenVINO device {device!r}", "use cpu, gpu, gpu.N or npu")
    return name


@dataclass
class _Compiled:
    compiled: Any
    request: Any
    inputs: dict[str, Any]  # name -> input port
    outputs: dict[str, np.ndarray]  # name -> the buffer OpenVINO writes into


@dataclass
class _Component:
    spec: ComponentSpec
    model: Any  # the ov.Model as read (dynamic batch)
    hint: str
    dynamic: Any = None  # the dynamic-batch compiled model (batch_mode "dynamic")
    batches: OrderedDict[int, _Compiled] = field(default_factory=OrderedDict)


class OpenVinoRunner(BaseRunner):
    """Runs RUN_DIR/onnx/fp32/ (or the int8 set) with OpenVINO.

    `device` cpu (default), gpu, gpu.N or npu, where OpenVINO finds them; `threads` sets
    INFERENCE_NUM_THREADS; `batch_mode` "static" (reshape per batch) or "dynamic";
    `cache_dir` is OpenVINO's compiled-model cache, so later processes load instead of compiling
    (default `default_cache_dir()`; "" turns it off).
    """

    backend = "openvino"
    precisions = tuple(p for p in RUN_PRECISIONS if p in HINTS)
    precision_hint = "use --precision bf16 (CPUs with AMX / AVX-512 BF16) or fp32"

    def __init__(self, run_dir: str | os.PathLike[str] | RunDir, precision: str = "fp32", *, device: str = "cpu",
                 threads: int | None = None, batch_mode: str = "static",
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        from mmgen_deploy.runtime.ort_runner import check_not_stale

        cache = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)

        self.check_precision(precision)
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if batch_mode not in BATCH_MODES:
            raise UsageError(f"unknown batch_mode {batch_mode!r}", f"choose one of {', '.join(BATCH_MODES)}")
        ov = import_openvino()
        self._ov = ov
        self.core = ov.Core()
        self.ov_device = openvino_device_name(device)
        available = list(self.core.available_devices)
        if self.ov_device != "AUTO" and self.ov_device not in available \
                and not (self.ov_device == "GPU" and any(d.startswith("GPU") for d in available)):
            raise NotAvailableError(f"OpenVINO finds no {self.ov_device} device here (it finds {', '.join(available)})",
                                    "use --device cpu, or install the device's OpenVINO driver")
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        super().__init__(self.run_dir.load_config(), precision, self.ov_device.lower())
        onnx_set, self.hint = onnx_set_of(precision), HINTS[precision]
        self._check_hint_supported()
        self.directory: Path = self.run_dir.onnx_dir / onnx_set
        if not self.directory.is_dir():
            raise NotAvailableError(f"no {onnx_set} ONNX set in {self.directory}",
                                    f"export it first: `mmgen export {self.run_dir.root}`")
        check_not_stale(self.run_dir)
        self.threads = threads
        self.batch_mode = batch_mode
        self.cache_dir = cache
        if cache is not None:
            try:
                for hint in {self.hint, "f32"}:
                    (cache / hint).mkdir(parents=True, exist_ok=True)
            except OSError:
                self.cache_dir = None  # a read-only home: compile every time rather than fail
        self._components: dict[str, _Component] = {}

    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, threads: int | None = None,
              batch_mode: str = "static", cache_dir: str | os.PathLike[str] | None = None,
              **_other: Any) -> OpenVinoRunner:
        return cls(run, precision, device=device, threads=threads, batch_mode=batch_mode, cache_dir=cache_dir)

    def _check_hint_supported(self) -> None:
        if self.hint == "f32" or self.ov_device == "AUTO":
            return
        wanted = {"bf16": "BF16", "f16": "FP16"}[self.hint]
        device = self.ov_device.split(".")[0] if self.ov_device.startswith("GPU") else self.ov_device
        try:
            capabilities = list(self.core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # a plugin without the property: let compilation decide
            return
        if wanted not in capabilities:
            raise NotAvailableError(f"OpenVINO's {device} plugin has no {wanted} support on this machine "
                                    f"(it offers {', '.join(capabilities)})",
                                    "use --precision fp32" + (" or fp16" if "FP16" in capabilities else ""))

    def _compile_config(self, hint: str) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.cache_dir is not None:
            # One cache folder per inference hint: OpenVINO 2026.4's cache key misses the hint of a
            # reshaped model, and a bf16 compile after an f32 one of the same graph loaded the f32 blob
            # (NaN outputs, measured; tests/test_runners.py runs f32 before bf16 on one cache).
            config["CACHE_DIR"] = str(self.cache_dir / hint)
        if self.ov_device == "CPU":
            config["NUM_STREAMS"] = 1
            if self.threads is not None:
                config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _component(self, spec: ComponentSpec) -> _Component:
        component = spec.name
        item = self._components.get(component)
        if item is not None:
            return item
        path = self.directory / f"{component}.onnx"
        if not path.is_file():
            raise NotAvailableError(f"missing {path}", f"re-export: `mmgen export {self.run_dir.root}`")
        try:
            model = self.core.read_model(str(path))
        except Exception as exc:
            raise RunDirError(f"OpenVINO cannot read {path}: {str(exc).strip().splitlines()[0]}",
                              f"re-export: `mmgen export {self.run_dir.root}`") from None
        names = sorted(name for p in model.inputs for name in p.get_names() if name in spec.input_names)
        if len(model.inputs) != len(spec.inputs) or names != sorted(spec.input_names):
            found = [sorted(p.get_names()) for p in model.inputs]
            raise RunDirError(f"{path} has inputs {found}, expected {spec.input_names}",
                              f"it was exported for another model; re-export: `mmgen export {self.run_dir.root}`")
        # The quantizer (keep_fp32) stays FP32 at every precision.
        item = _Component(spec, model, "f32" if spec.keep_fp32 else self.hint)
        self._components[component] = item
        return item

    def _compile(self, model: Any, item: _Component, what: str) -> Any:
        try:
            return self.core.compile_model(model, self.ov_device, self._compile_config(item.hint))
        except Exception as exc:
            raise RunDirError(f"OpenVINO cannot compile {item.spec.name} ({what}) for {self.ov_device}: "
                              f"{str(exc).strip().splitlines()[0]}",
                              "try --precision fp32, or another --device") from None

    def _compiled(self, item: _Component, batch: int) -> _Compiled:
        cached = item.batches.get(batch)
        if cached is not None:
            item.batches.move_to_end(batch)
            return cached
        if self.batch_mode == "dynamic":
            if item.dynamic is None:
                item.dynamic = self._compile(item.model, item, "dynamic batch")
            compiled = item.dynamic
        else:
            model = item.model.clone()
            model.reshape({t.name: list(t.concrete_shape(batch)) for t in item.spec.inputs})
            compiled = self._compile(model, item, f"batch {batch}")
        request = compiled.create_infer_request()
        inputs = {name: compiled.input(name) for name in item.spec.input_names}
        outputs: dict[str, np.ndarray] = {}
        for tensor in item.spec.outputs:
            port = compiled.output(tensor.name)
            dtype = port.get_element_type().to_dtype()
            buffer = np.empty(tensor.concrete_shape(batch), dtype=dtype)
            request.set_tensor(port, self._ov.Tensor(buffer, shared_memory=True))
            outputs[tensor.name] = buffer
        entry = _Compiled(compiled, request, inputs, outputs)
        if len(item.batches) >= _KEEP_BATCHES:
            item.batches.popitem(last=False)
        item.batches[batch] = entry
        return entry

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        item = self._component(spec)
        batch = int(feeds[spec.inputs[0].name].shape[0])
        entry = self._compiled(item, batch)
        ov = self._ov
        for name, port in entry.inputs.items():
            entry.request.set_tensor(port, ov.Tensor(np.ascontiguousarray(feeds[name]), shared_memory=True))
        entry.request.infer()
        result: dict[str, np.ndarray] = {}
        for tensor in item.spec.outputs:
            out = entry.outputs[tensor.name]
            result[tensor.name] = out if out.dtype == np.dtype(tensor.dtype) else out.astype(tensor.dtype)
        return result

    def compiled_batches(self, component: str) -> list[int]:
        """The batch sizes compiled so far for `component` (for tests and reports)."""
        item = self._components.get(component)
        return list(item.batches) if item is not None else []

    def close(self) -> None:
        self._components.clear()
