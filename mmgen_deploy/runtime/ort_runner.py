"""ONNX Runtime backend: the exported ONNX set of a run directory, CPU or CUDA.

Outputs are bound to buffers preallocated per (component, batch) through IO binding,
so a sampling step allocates nothing new: on the CPU the buffers are NumPy arrays ORT
writes into; on CUDA they live on the device and are copied back once per call.
No torch import here: a deployment machine may only have onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.errors import NotAvailableError, RunDirError, UsageError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.runtime.base import BaseRunner, missing_graph_hint
from mmgen_deploy.specs import ComponentSpec

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
                    "tensor(int64)": np.int64}


def cuda_provider_usable() -> bool:
    """onnxruntime-gpu installed and a CUDA device present (the provider is listed even without a GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()


def check_not_stale(run: RunDir) -> dict[str, Any]:
    """Refuse ONNX files exported from other weights than the run's current ones (every backend
    that reads the ONNX set calls this), and return the export manifest it read (empty for
    hand-made ONNX files). The manifest is read directly (not through mmgen_deploy.export, which
    imports torch)."""
    from mmgen_deploy.io_utils import read_json

    path = run.onnx_manifest_path
    if not path.is_file():
        return {}  # hand-made ONNX files: nothing recorded to check against
    try:
        manifest = read_json(path)
        exported_from = manifest.get("source_weights_sha256")
    except (OSError, ValueError, AttributeError):
        raise RunDirError(f"{path} is unreadable",
                          f"re-export: `mmgen export {run.root} --overwrite`") from None
    if exported_from and exported_from != run.weights_sha256():
        run.check_weight_files()  # a damaged weight file is what to fix then, not the export
        raise RunDirError(f"the ONNX files in {run.onnx_dir} were exported from other weights "
                          f"({str(exported_from)[:12]}) than the run's current ones",
                          f"re-export: `mmgen export {run.root} --overwrite`")
    return manifest


class _Session:
    def __init__(self, session: Any, spec: ComponentSpec, on_cuda: bool) -> None:
        self.session = session
        self.spec = spec
        self.on_cuda = on_cuda
        self.input_types = {i.name: _ORT_FLOAT_TYPES.get(i.type) for i in session.get_inputs()}
        self.output_types = {o.name: _ORT_FLOAT_TYPES.get(o.type) for o in session.get_outputs()}
        # batch -> (binding, {output name: (ortvalue, numpy view or None)})
        self.bindings: dict[int, tuple[Any, dict[str, tuple[Any, np.ndarray | None]]]] = {}


class OrtRunner(BaseRunner):
    """Runs the ONNX set RUN_DIR/onnx/<precision>/ with ONNX Runtime.

    `device` "cpu" uses the CPU execution provider (`threads` sets intra-op threads);
    "cuda" uses the CUDA provider when onnxruntime-gpu and a GPU are present.
    Sessions are created on first use of each component.
    """

    def __init__(self, run_dir: RunLike, precision: str = "fp32", *, device: str = "cpu",
                 threads: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.check_precision(precision)
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        self._ort = ort
        self.run_dir = RunDir.of(run_dir)
        self.directory = self.run_dir.onnx_set_dir(precision)
        config = self.run_dir.load_config()
        if not self.directory.is_dir():
            raise NotAvailableError(f"no {precision} ONNX set in {self.directory}",
                                    f"export it first: `mmgen export {self.run_dir.root}`")
        self._manifest = check_not_stale(self.run_dir)
        if providers is None:
            if device.startswith("cuda"):
                if not cuda_provider_usable():
                    raise NotAvailableError("ONNX Runtime's CUDA provider is not usable here",
                                            "install onnxruntime-gpu on a machine with a GPU, or use {device} cpu",
                                            params=["device"])
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        super().__init__(config, precision, "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu")
        self.providers = providers
        self.threads = threads
        self._sessions: dict[str, _Session] = {}

    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, threads: int | None = None,
              providers: list[str] | None = None, **_other: Any) -> OrtRunner:
        return cls(run, precision, device=device, threads=threads, providers=providers)

    def _session(self, spec: ComponentSpec) -> _Session:
        component = spec.name
        item = self._sessions.get(component)
        if item is not None:
            return item
        path = self.run_dir.onnx_path(self.precision, component)
        if not path.is_file():
            raise NotAvailableError(f"missing {path}", missing_graph_hint(self.run_dir.root, spec.name))
        self.run_dir.check_onnx_current(self._manifest, self.precision, spec)
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the FP16 sets trigger harmless optimizer warnings
        if not spec.idle_spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        from mmgen_deploy.memory import check_extra
        from mmgen_deploy.onnx_files import onnx_bytes

        # CPU: the weights, plus FP32 copies of FP16 weights that ORT's CPU kernels need (~3x an FP16 file).
        factor = 3 if self.precision == "fp16" and self.device == "cpu" else 1.5
        check_extra(f"loading {path.name} ({self.precision}) into ONNX Runtime", int(factor * onnx_bytes(path)),
                    "close other programs, use the other precision, or a machine with more memory")
        from mmgen_deploy.ort_graphs import ort_cpu_model

        # On the CPU, GroupNorms run in a precise form (the provider's kernel is ~1e-4 off at 256 px).
        model = str(path) if self.device == "cuda" else ort_cpu_model(path, has_group_norms=spec.has_group_norms)
        try:
            session = self._ort.InferenceSession(model, sess_options=options, providers=self.providers)
        except Exception as exc:
            raise RunDirError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}",
                              f"re-export: `mmgen export {self.run_dir.root}`") from None
        mismatch = spec.tensor_mismatch([{i.name} for i in session.get_inputs()],
                                        [{o.name} for o in session.get_outputs()])
        if mismatch is not None:
            raise RunDirError(f"{path} {mismatch}", self.run_dir.stale_graph_hint(component))
        item = _Session(session, spec, on_cuda=self.device == "cuda")
        self._sessions[component] = item
        return item

    def _binding(self, item: _Session, batch: int) -> tuple[Any, dict[str, tuple[Any, np.ndarray | None]]]:
        cached = item.bindings.get(batch)
        if cached is not None:
            return cached
        ort = self._ort
        binding = item.session.io_binding()
        outputs: dict[str, tuple[Any, np.ndarray | None]] = {}
        for tensor in item.spec.outputs:
            dtype = item.output_types.get(tensor.name) or np.dtype(tensor.dtype).type
            shape = tensor.concrete_shape(batch)
            if item.on_cuda:
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
                outputs[tensor.name] = (value, None)
            else:
                array = np.empty(shape, dtype=dtype)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                outputs[tensor.name] = (value, array)
            binding.bind_ortvalue_output(tensor.name, value)
        # Keep few shapes alive: the sampling loop uses one or two batch sizes.
        if len(item.bindings) >= 4:
            item.bindings.pop(next(iter(item.bindings)))
        item.bindings[batch] = (binding, outputs)
        return binding, outputs

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        item = self._session(spec)
        batch = int(feeds[spec.inputs[0].name].shape[0])
        binding, outputs = self._binding(item, batch)
        for name, array in feeds.items():
            want = item.input_types.get(name)
            if want is not None and array.dtype != want:
                array = array.astype(want)  # an FP16 set exported without keep_io_types
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        item.session.run_with_iobinding(binding)
        result: dict[str, np.ndarray] = {}
        for tensor in item.spec.outputs:
            value, buffer = outputs[tensor.name]
            out: np.ndarray = value.numpy() if buffer is None else buffer
            if out.dtype != np.dtype(tensor.dtype):
                out = out.astype(tensor.dtype)
            result[tensor.name] = out
        return result

    def close(self) -> None:
        self._sessions.clear()
