"""OpenVINO backend: the exported FP32 ONNX set of a run directory on CPU (default), GPU or NPU.

OpenVINO reads ONNX directly. The precision is an inference hint on the FP32 graph, not
another graph: `fp32` asks for f32 (FP32-exact), `bf16` for bf16 (AMX / AVX-512 BF16 on
the CPU), `fp16` for f16 (Intel GPUs and NPUs). Components the spec keeps FP32 (the
quantizer: BF16 distances flip code indices) are always compiled with the f32 hint, and
under a low-precision hint the spec's FP32 scopes (the timestep embedding) are marked to
stay FP32 before compiling (`openvino_graphs`).

One compiled model per (component, batch): the graph is reshaped to the static batch and
compiled on first use of that batch (`batch_mode="static"`, the default; measured faster
than one dynamic-batch compilation at every batch, see docs/design/openvino-process-start.md), and each gets one
infer request whose output tensors wrap preallocated NumPy buffers, so a sampling step
allocates nothing new. No torch import here.

On a CPU a batch of two or more is split across `streams` (default 2) infer requests that run at
once, each on its own threads, and write into one output buffer (OpenVINO's multi-stream
execution). On the 2-core development machine this beat one request using both threads by
1.05-1.5x for the DiT-B/2 denoiser at batch 4 and 1.3-1.8x for the 256 px VQ-f8 decoder at
batch 2 (measured side by side, alternating): two threads in lockstep wait for each other at
every layer, two streams do not.

Compiled models outlive the process (`CompiledBlobs`): the first process exports each one to
a blob keyed by what it was compiled from, later ones memory-map and import it without reading
the ONNX at all. OpenVINO's own CACHE_DIR still reads and hashes the whole graph every process
(3.0 s against 0.8 s for a DiT-B/2 denoiser, measured) and keys a reshaped model's blob without
its inference hint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.errors import NotAvailableError, RunDirError, UsageError
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.runtime.backends import backend_spec
from mmgen_deploy.runtime.base import BaseRunner, missing_graph_hint
from mmgen_deploy.specs import ComponentSpec

# precision -> OpenVINO's INFERENCE_PRECISION_HINT, for every precision the registry gives OpenVINO.
# The graph is the set the registry's `reads` names: the FP32 set for fp32, bf16 and fp16 (OpenVINO
# lowers it itself), the quantized Q/DQ set for int8 (its quantized ops run in INT8, the rest in f32).
HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


BATCH_MODES = ("static", "dynamic")
# Compiled batch sizes kept per component (the sampling loop uses one or two).
_KEEP_BATCHES = 4
# Infer requests a CPU batch is split across (see the module doc).
_CPU_STREAMS = 2
_INSTALL_HINT = "pip install 'mmgen-deploy[openvino]' (or pip install openvino)"


def default_cache_dir() -> Path | None:
    """Where compiled models are kept across processes: `io_utils.cache_root()`/openvino
    (~/.cache/mmgen/openvino by default; MMGEN_CACHE_DIR="" turns it off). Blobs are keyed by the
    exported graph, OpenVINO's version, the device and the compile settings (see `CompiledBlobs`),
    so a re-export or an upgrade compiles anew."""
    from mmgen_deploy.io_utils import cache_root

    root = cache_root()
    return root / "openvino" if root is not None else None


# The blob folder's default size limit; MMGEN_OPENVINO_CACHE_GB overrides it.
DEFAULT_CACHE_GB = 20.0


def cache_limit_bytes() -> int:
    """How large the OpenVINO blob folder may grow: $MMGEN_OPENVINO_CACHE_GB, else 20 GB (a DiT-XL/2
    denoiser blob is 2.7 GB per compiled batch size)."""
    value = os.environ.get("MMGEN_OPENVINO_CACHE_GB")
    try:
        gigabytes = float(value) if value else DEFAULT_CACHE_GB
    except ValueError:
        raise UsageError(f"MMGEN_OPENVINO_CACHE_GB={value!r} is not a number",
                         "set it to a size in GB, e.g. MMGEN_OPENVINO_CACHE_GB=20") from None
    return int(gigabytes * 1e9)


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


def _recorded_sha256(manifest: dict[str, Any], onnx_set: str) -> dict[str, str]:
    """component -> the graph's sha256 as the export manifest records it (empty without one)."""
    files = manifest.get("files", {}).get(onnx_set, {})
    if not isinstance(files, dict):
        return {}
    return {name: entry["sha256"] for name, entry in files.items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def openvino_device_name(device: str) -> str:
    """mmgen's device spelling (cpu, gpu, gpu.1, npu; any case) -> OpenVINO's (CPU, GPU.1, NPU)."""
    name = device.strip().upper()
    if name.split(".")[0] not in ("CPU", "GPU", "NPU", "AUTO"):
        raise UsageError(f"unknown OpenVINO device {device!r}", "use cpu, gpu, gpu.N or npu")
    return name


class CompiledBlobs:
    """Compiled models on disk: `<cache>/<source>-<component>-<hint>-<device>-b<batch>[x<streams>]-<key>.blob`.

    `source` names the ONNX file (a hash of its path), `key` everything the compiled model depends on:
    the graph's identity (its sha256 from the export manifest, else from its bytes, plus the size and
    mtime of the graph and its external data, so an edited file is never mistaken for the exported
    one), what was done to the graph before compiling it (`rewrite`), OpenVINO's version, the device
    and the compile configuration. Writing a blob removes the
    older ones of the same source, component, hint, device and batch: one blob per compiled shape,
    however often a run is re-exported. A blob is written to a temporary name and renamed, so a
    killed process leaves none half-written; one OpenVINO cannot import is recompiled and replaced.
    The folder is kept under `max_bytes` (default `cache_limit_bytes()`): after a write, the blobs
    used longest ago go first (an import marks its blob used).
    """

    def __init__(self, folder: Path, ov: Any, core: Any, max_bytes: int | None = None) -> None:
        self.folder = folder
        self.ov = ov
        self.core = core
        self.version = str(ov.get_version())
        self.max_bytes = cache_limit_bytes() if max_bytes is None else max_bytes
        self._identities: dict[Path, str] = {}

    def path(self, onnx_path: Path, manifest_sha256: str | None, component: str, hint: str, device: str,
             batch: int | None, streams: int, config: dict[str, Any], rewrite: str = "") -> Path:
        source = hashlib.sha256(str(onnx_path.resolve()).encode()).hexdigest()[:12]
        identity = {"graph": self._identity(onnx_path, manifest_sha256), "openvino": self.version,
                    "config": {k: str(v) for k, v in sorted(config.items())}, "rewrite": rewrite}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        shape = ("dynamic" if batch is None else f"b{batch}") + (f"x{streams}" if streams > 1 else "")
        return self.folder / f"{source}-{component}-{hint}-{device.lower()}-{shape}-{key}.blob"

    def _identity(self, onnx_path: Path, manifest_sha256: str | None) -> str:
        from mmgen_deploy.onnx_files import file_stats, onnx_sha256

        stats = file_stats(onnx_path)
        if manifest_sha256 is None:  # a hand-made graph: hash its bytes (once per process)
            manifest_sha256 = self._identities.get(onnx_path)
            if manifest_sha256 is None:
                manifest_sha256 = self._identities[onnx_path] = onnx_sha256(onnx_path)
        return f"{manifest_sha256}:{stats}"

    def load(self, path: Path, device: str, config: dict[str, Any]) -> tuple[Any, np.memmap] | None:
        """The compiled model stored at `path` and the mapping of its file, or None (absent, or
        unreadable: then it is removed). The compiled model reads weights from the mapping in place
        (dropping it crashed the next inference, OpenVINO 2026.4), so the caller keeps both for as
        long as it uses the model."""
        if not path.is_file():
            return None
        try:
            # Memory-mapped, copy-on-write: OpenVINO reads the blob without a second copy in memory.
            mapped = np.memmap(path, dtype=np.uint8, mode="c")
            compiled = self.core.import_model(self.ov.Tensor(mapped, shared_memory=True), device, config)
        except Exception:
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be evicted
        return compiled, mapped

    def store(self, path: Path, compiled: Any) -> None:
        """Write `compiled` to `path` and drop the older blobs it replaces; a read-only or full
        cache folder only costs the next process a compilation."""
        from mmgen_deploy.io_utils import CACHE_WRITE_ERRORS, store_in_cache

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            stream = io.BytesIO()  # OpenVINO exports into a BytesIO only
            compiled.export_model(stream)
            prefix = path.name[: path.name.rindex("-") + 1]
            store_in_cache(path, functools.partial(Path.write_bytes, data=stream.getbuffer()), prefix + "*.blob",
                           self.max_bytes)
            del stream
        except CACHE_WRITE_ERRORS:
            pass


@dataclass
class _Compiled:
    """One batch size of a component: a model compiled for `chunk` samples and one infer request per
    stream, request i taking samples [i*chunk, (i+1)*chunk) of the batch (the last chunk padded with
    copies of the last sample when the batch does not divide)."""

    compiled: Any
    requests: list[Any]
    chunk: int
    inputs: dict[str, Any]  # name -> input port
    outputs: dict[str, np.ndarray]  # name -> the batch's rows of the buffer OpenVINO writes into
    origin: str  # "compiled" (from the ONNX graph in this process) or "cache" (an imported blob)
    mapping: Any = None  # the memory-mapped blob an imported model may read its weights from


@dataclass
class _Component:
    spec: ComponentSpec
    path: Path  # the ONNX graph
    sha256: str | None  # its identity as the export manifest records it
    hint: str
    dynamic: tuple[Any, str, Any] | None = None  # the dynamic-batch model, its origin and mapping
    batches: OrderedDict[int, _Compiled] = field(default_factory=OrderedDict)


class OpenVinoRunner(BaseRunner):
    """Runs RUN_DIR/onnx/fp32/ (or the int8 set) with OpenVINO.

    `device` cpu (default), gpu, gpu.N or npu, where OpenVINO finds them; `threads` sets
    INFERENCE_NUM_THREADS (all streams together); `streams` how many requests share a CPU batch
    (default 2, 1 with one thread; GPUs and NPUs run one); `batch_mode` "static" (reshape per
    batch) or "dynamic" (one request);
    `cache_dir` is where compiled models are kept as blobs (`CompiledBlobs`), so later processes
    import instead of compiling (default `default_cache_dir()`; "" turns it off).
    """

    def __init__(self, run_dir: str | os.PathLike[str] | RunDir, precision: str = "fp32", *, device: str = "cpu",
                 threads: int | None = None, streams: int | None = None, batch_mode: str = "static",
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        from mmgen_deploy.runtime.ort_runner import check_not_stale

        cache = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)

        self.check_precision(precision)
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if streams is not None and streams < 1:
            raise UsageError(f"streams must be >= 1, got {streams}")
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
                                    "use {device} cpu, or install the device's OpenVINO driver", params=["device"])
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        super().__init__(self.run_dir.load_config(), precision, self.ov_device.lower())
        onnx_set, self.hint = backend_spec(self.backend).reads[precision], HINTS[precision]
        self._check_hint_supported()
        self.directory: Path = self.run_dir.onnx_set_dir(onnx_set)
        if not self.directory.is_dir():
            raise NotAvailableError(f"no {onnx_set} ONNX set in {self.directory}",
                                    f"export it first: `mmgen export {self.run_dir.root}`")
        manifest = check_not_stale(self.run_dir)
        self.threads = threads
        self.batch_mode = batch_mode
        if self.ov_device != "CPU" or batch_mode == "dynamic":
            self.streams = 1
        else:
            self.streams = streams if streams is not None else (1 if threads == 1 else _CPU_STREAMS)
        self.cache_dir = cache
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:
                self.cache_dir = None  # a read-only home: compile every time rather than fail
        self.blobs = CompiledBlobs(self.cache_dir, ov, self.core) if self.cache_dir is not None else None
        self._manifest = manifest
        self.onnx_set = onnx_set
        self._recorded = _recorded_sha256(manifest, onnx_set)
        self._components: dict[str, _Component] = {}

    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, threads: int | None = None,
              streams: int | None = None, batch_mode: str = "static",
              cache_dir: str | os.PathLike[str] | None = None, **_other: Any) -> OpenVinoRunner:
        return cls(run, precision, device=device, threads=threads, streams=streams, batch_mode=batch_mode,
                   cache_dir=cache_dir)

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
                                    "use {precision} fp32" + (" or fp16" if "FP16" in capabilities else ""),
                                    params=["precision"])

    def _compile_config(self, hint: str, streams: int = 1) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint}
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if self.ov_device == "CPU":
            config["NUM_STREAMS"] = streams
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
            raise NotAvailableError(f"missing {path}", missing_graph_hint(self.run_dir.root, spec.name))
        self.run_dir.check_onnx_current(self._manifest, self.onnx_set, spec)
        # The quantizer (keep_fp32) stays FP32 at every precision.
        item = _Component(spec, path, self._recorded.get(component), "f32" if spec.keep_fp32 else self.hint)
        self._components[component] = item
        return item

    def _read(self, item: _Component) -> Any:
        """The graph as read (dynamic batch). Not kept: it holds every FP32 weight (2.7 GB for a
        DiT-XL/2), and is read again only for a shape that is neither compiled nor stored."""
        try:
            return self.core.read_model(str(item.path))
        except Exception as exc:
            raise RunDirError(f"OpenVINO cannot read {item.path}: {str(exc).strip().splitlines()[0]}",
                              f"re-export: `mmgen export {self.run_dir.root}`") from None

    def _load(self, item: _Component, batch: int | None, streams: int = 1) -> tuple[Any, str, Any]:
        """The compiled model of `item` at `batch` (None: dynamic) for `streams` concurrent requests,
        from the blob cache when it holds one, else compiled from the ONNX graph (and stored for the
        next process)."""
        config = self._compile_config(item.hint, streams)
        rewrite = self._rewrite(item)
        blob = None
        if self.blobs is not None:
            blob = self.blobs.path(item.path, item.sha256, item.spec.name, item.hint, self.ov_device, batch,
                                   streams, config, rewrite)
            loaded = self.blobs.load(blob, self.ov_device, config)
            if loaded is not None and self._tensor_mismatch(loaded[0], item.spec) is None:
                return loaded[0], "cache", loaded[1]
        model = self._read(item)
        mismatch = self._tensor_mismatch(model, item.spec)
        if mismatch is not None:
            raise RunDirError(f"{item.path} {mismatch}", self.run_dir.stale_graph_hint(item.spec.name))
        if rewrite:
            from mmgen_deploy.runtime.openvino_graphs import keep_scopes_fp32

            try:
                keep_scopes_fp32(self._ov, self.core, model, item.spec.fp32_scopes)
            except Exception as exc:  # an OpenVINO whose IR or graph API differs from 2026.4's
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise NotAvailableError(
                    f"OpenVINO {self._ov.get_version()} cannot keep {item.spec.name}'s "
                    f"{', '.join(item.spec.fp32_scopes)} FP32 under the {item.hint} hint: {reason}",
                    "use {precision} fp32; this was built against OpenVINO 2026.4", params=["precision"]) from None
        what = "dynamic batch"
        if batch is not None:
            model.reshape({t.name: list(t.concrete_shape(batch)) for t in item.spec.inputs})
            what = f"batch {batch}"
        try:
            compiled = self.core.compile_model(model, self.ov_device, config)
        except Exception as exc:
            raise RunDirError(f"OpenVINO cannot compile {item.spec.name} ({what}) for {self.ov_device}: "
                              f"{str(exc).strip().splitlines()[0]}",
                              "try {precision} fp32, or another {device}", params=["precision", "device"]) from None
        del model  # compiled: the FP32 graph is not needed any more
        if blob is not None and self.blobs is not None:
            self.blobs.store(blob, compiled)
        return compiled, "compiled", None

    @staticmethod
    def _rewrite(item: _Component) -> str:
        """What is done to the graph before it is compiled ("" for nothing): under a low-precision
        hint the spec's FP32 scopes (the timestep embedding) are marked to stay FP32
        (`openvino_graphs.keep_scopes_fp32`)."""
        if item.hint == "f32" or not item.spec.fp32_scopes:
            return ""
        from mmgen_deploy.runtime.openvino_graphs import REWRITE_VERSION

        return f"fp32_scopes:{','.join(item.spec.fp32_scopes)}:v{REWRITE_VERSION}"

    @staticmethod
    def _tensor_mismatch(model: Any, spec: ComponentSpec) -> str | None:
        """`ComponentSpec.tensor_mismatch` of an OpenVINO model, whose ports may carry several names."""
        return spec.tensor_mismatch([p.get_names() for p in model.inputs], [p.get_names() for p in model.outputs])

    def _compiled(self, item: _Component, batch: int) -> _Compiled:
        cached = item.batches.get(batch)
        if cached is not None:
            item.batches.move_to_end(batch)
            return cached
        streams = min(self.streams, batch)
        chunk = -(-batch // streams)
        if self.batch_mode == "dynamic":
            if item.dynamic is None:
                item.dynamic = self._load(item, None)
            compiled, origin, mapping = item.dynamic
        else:
            compiled, origin, mapping = self._load(item, chunk, streams)
        requests = [compiled.create_infer_request() for _ in range(streams)]
        inputs = {name: compiled.input(name) for name in item.spec.input_names}
        outputs: dict[str, np.ndarray] = {}
        for tensor in item.spec.outputs:
            port = compiled.output(tensor.name)
            dtype = port.get_element_type().to_dtype()
            buffer = np.empty(tensor.concrete_shape(chunk * streams), dtype=dtype)
            for i, request in enumerate(requests):  # each request writes its own rows
                request.set_tensor(port, self._ov.Tensor(buffer[i * chunk:(i + 1) * chunk], shared_memory=True))
            outputs[tensor.name] = buffer[:batch]
        entry = _Compiled(compiled, requests, chunk, inputs, outputs, origin, mapping)
        if len(item.batches) >= _KEEP_BATCHES:
            item.batches.popitem(last=False)
        item.batches[batch] = entry
        return entry

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        item = self._component(spec)
        batch = int(feeds[spec.inputs[0].name].shape[0])
        entry = self._compiled(item, batch)
        ov, chunk = self._ov, entry.chunk
        # A shared-memory ov.Tensor does not keep its array alive: the parts are held here until
        # every request is done (a padded or made-contiguous copy would otherwise be freed early).
        parts: list[np.ndarray] = []
        for i, request in enumerate(entry.requests):
            for name, port in entry.inputs.items():
                part = np.ascontiguousarray(feeds[name][i * chunk:(i + 1) * chunk])
                if part.shape[0] < chunk:  # the last chunk of a batch that does not divide
                    part = np.concatenate([part, np.repeat(part[-1:], chunk - part.shape[0], axis=0)])
                parts.append(part)
                request.set_tensor(port, ov.Tensor(part, shared_memory=True))
        if len(entry.requests) == 1:
            entry.requests[0].infer()
        else:
            for request in entry.requests:
                request.start_async()
            for request in entry.requests:
                request.wait()
        del parts
        result: dict[str, np.ndarray] = {}
        for tensor in item.spec.outputs:
            out = entry.outputs[tensor.name]
            result[tensor.name] = out if out.dtype == np.dtype(tensor.dtype) else out.astype(tensor.dtype)
        return result

    def compiled_batches(self, component: str) -> list[int]:
        """The batch sizes compiled so far for `component` (for tests and reports)."""
        item = self._components.get(component)
        return list(item.batches) if item is not None else []

    def compiled_origins(self, component: str) -> dict[int, str]:
        """Per compiled batch of `component`: "compiled" in this process, or "cache" (a stored blob)."""
        item = self._components.get(component)
        return {batch: entry.origin for batch, entry in item.batches.items()} if item is not None else {}

    def close(self) -> None:
        self._components.clear()
