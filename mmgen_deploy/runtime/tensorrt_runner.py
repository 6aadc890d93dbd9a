"""TensorRT / TensorRT-RTX backend: runs the engine set that `mmgen_deploy.engines` built and checked.

Buffers are torch CUDA tensors (no pycuda): `set_input_shape` + `set_tensor_address`
+ `execute_async_v3` on one explicit stream. All engines run one after another on
that stream, so by default their contexts share ONE activation block (USER_MANAGED
allocation, sized for the largest engine), which is what lets the whole set fit on a
small device. The denoiser step can be captured in a CUDA graph for a static batch
(`cuda_graph=True`) and replayed every sampling step.

Artifact checks (manifest, runtime version, ONNX hashes, plan integrity) all run in
`from_run_dir` before CUDA is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy.engines.flavour import Flavour
from mmgen_deploy.engines.manifest import (
    CorruptEngineError,
    EngineSet,
    current_gpu,
    rebuild_command,
    select_engine_set,
)
from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.io_utils import atomic_path
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.runtime.base import BaseRunner
from mmgen_deploy.specs import ComponentSpec

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

# TensorRT DataType names -> torch dtype names (same names in TRT 10.x, 11.x and RTX).
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class _Engine:
    spec: ComponentSpec
    engine: trt.ICudaEngine
    context: trt.IExecutionContext
    graphs: dict[int, _Graph] = field(default_factory=dict)


class TensorRTRunner(BaseRunner):
    """Runs components on their TensorRT / TensorRT-RTX engines; numpy in, numpy out (plus a torch fast path)."""

    def __init__(self, run: RunDir, flavour: Flavour, engine_set: EngineSet, *, precision: str = "fp16",
                 cuda_graph: bool = False, share_memory: bool = True, device_index: int = 0,
                 verbose: bool = False) -> None:
        import torch

        super().__init__(run.load_config(), precision, f"cuda:{device_index}")
        self.run_dir = run
        self.flavour = flavour
        self.engine_set = engine_set
        self.cuda_graph = cuda_graph
        self.share_memory = share_memory
        self._torch_device = torch.device(self.device)
        torch.cuda.set_device(self._torch_device)  # TensorRT creates its objects on the current device
        self._stream = torch.cuda.Stream(device=self._torch_device)
        self._logger = flavour.logger(verbose)
        self._runtime: trt.Runtime = flavour.trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        self._activation_block: torch.Tensor | None = None

        loaded: dict[str, trt.ICudaEngine] = {}
        for name in engine_set.components:
            loaded[name] = self._deserialize(name, engine_set.plan_path(name))
        self._runtime_cache: Any = None
        self._keepalive: list[Any] = []  # RTX runtime configs: must outlive the cache and the contexts
        if flavour.has_runtime_cache:
            cache_path = engine_set.runtime_cache_path
            cache_bytes = cache_path.read_bytes() if cache_path.is_file() else None
            first = next(iter(loaded.values()))
            try:
                self._runtime_cache, owner = flavour.new_runtime_cache(first, cache_bytes)
            except Exception:  # a damaged cache only costs JIT time: start from an empty one
                self._runtime_cache, owner = flavour.new_runtime_cache(first, None)
            self._keepalive.append(owner)
        if share_memory:
            block_size = max(flavour.device_memory_size(e) for e in loaded.values())
            try:
                self._activation_block = torch.empty(max(block_size, 1), dtype=torch.uint8,
                                                     device=self._torch_device)
            except torch.cuda.OutOfMemoryError:
                raise NotAvailableError(f"not enough GPU memory for the engines' {block_size / 2**20:.0f} MiB "
                                        "activation block",
                                        "rebuild with a smaller {batch_profile}, or close other GPU programs",
                                        params=["batch_profile"]) from None
        for name, engine in loaded.items():
            context, keepalive = flavour.create_context(engine, user_managed_memory=share_memory,
                                                        runtime_cache=self._runtime_cache)
            self._keepalive.append(keepalive)
            if self._activation_block is not None:
                flavour.set_device_memory(context, self._activation_block.data_ptr(),
                                          self._activation_block.numel())
            self._engines[name] = _Engine(spec=self.specs[name], engine=engine, context=context)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def _open(cls, run: RunDir, precision: str, device: str, *, runtime: str | None = None,
              cuda_graph: bool = False, share_memory: bool = True, verbose: bool = False,
              **_other: Any) -> TensorRTRunner:
        """Check the engine set against this machine (no CUDA), then load it on the GPU."""
        run.load_config()
        gpu = current_gpu()  # torch.cuda.is_available(): no context is created
        flavour, engine_set = select_engine_set(run, runtime, precision, gpu)
        if gpu is None:
            raise NotAvailableError(f"the engines in {engine_set.directory} are up to date, but running them "
                                    "needs a CUDA device and none is visible",
                                    "run on the target GPU, or use {backend} onnxruntime / torch here",
                                    params=["backend"])
        device_index = int(device.split(":", 1)[1]) if ":" in device else 0
        return cls(run, flavour, engine_set, precision=precision, cuda_graph=cuda_graph,
                   share_memory=share_memory, device_index=device_index, verbose=verbose)

    def _deserialize(self, name: str, path: Path) -> trt.ICudaEngine:
        plan = path.read_bytes()
        built_from = str(self.engine_set.manifest.get("precision", "fp16"))
        command = rebuild_command(self.run_dir, self.engine_set.manifest, self.flavour.runtime, built_from)
        rebuild = f"rebuild with `{command}`"
        problem = self.flavour.plan_validity(self._runtime, plan)
        if problem is not None:
            raise CorruptEngineError(f"{self.flavour.label} rejects engine plan {path}: {problem}", rebuild)
        try:
            engine = self._runtime.deserialize_cuda_engine(plan)
        except Exception as exc:
            raise CorruptEngineError(f"cannot load engine plan {path}: {exc}", rebuild) from None
        if engine is None:
            raise CorruptEngineError(f"cannot load engine plan {path} (corrupt, or from another TensorRT build)",
                                     rebuild)
        return engine

    # -- running ----------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        return list(self._engines)

    def _unknown_component(self, component: str) -> MMGenError:
        return UsageError(f"no {component} engine in {self.engine_set.directory}",
                          f"available: {', '.join(self._engines)}")

    def _engine(self, component: str) -> _Engine:
        return self._engines[self.spec_of(component).name]

    def _check_batch(self, item: _Engine, batch: int) -> None:
        profile = item.spec.engine_profile
        recorded = self.engine_set.manifest["components"][item.spec.name]["profile"]
        first = item.spec.inputs[0].name
        low, high = recorded[first]["min"][0], recorded[first]["max"][0]
        if not low <= batch <= high:
            raise UsageError(f"batch {batch} is outside the {item.spec.name} engine's profile {low}..{high}",
                             f"rebuild with a wider {{batch_profile}} (spec default "
                             f"{profile.min}:{profile.opt}:{profile.max})", params=["batch_profile"])

    def _torch_dtype(self, engine: trt.ICudaEngine, name: str) -> torch.dtype:
        import torch

        return getattr(torch, _TORCH_DTYPES[engine.get_tensor_dtype(name).name])  # type: ignore[no-any-return]

    def run_torch(self, component: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device-tensor fast path: CUDA tensors in, CUDA tensors out (outputs are fresh tensors)."""
        import torch

        item = self._engine(component)
        spec = item.spec
        missing = [n for n in spec.input_names if n not in feeds]
        if missing:
            raise UsageError(f"{component} needs inputs {spec.input_names}; missing {missing}")
        batch = int(feeds[spec.input_names[0]].shape[0])
        self._check_batch(item, batch)
        with torch.cuda.device(self._torch_device), torch.cuda.stream(self._stream):
            inputs = {}
            for tensor_spec in spec.inputs:
                value = feeds[tensor_spec.name]
                expected = tensor_spec.concrete_shape(batch)
                if tuple(value.shape) != expected:
                    raise UsageError(f"{component} input {tensor_spec.name} has shape {tuple(value.shape)}, "
                                     f"expected {expected}")
                inputs[tensor_spec.name] = value.to(self._torch_device, self._torch_dtype(item.engine,
                                                                                          tensor_spec.name),
                                                    non_blocking=True).contiguous()
            if self.cuda_graph and component == "denoiser":
                outputs = self._run_graph(item, batch, inputs)
            else:
                outputs = self._run_eager(item, inputs)
        self._stream.synchronize()
        return outputs

    def _run_eager(self, item: _Engine, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        context = item.context
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise UsageError(f"the {item.spec.name} engine rejects input {name} of shape {tuple(tensor.shape)}",
                                 "rebuild with a {batch_profile} that covers it", params=["batch_profile"])
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for tensor_spec in item.spec.outputs:
            dims = context.get_tensor_shape(tensor_spec.name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            out = torch.empty(shape, dtype=self._torch_dtype(item.engine, tensor_spec.name), device=self._torch_device)
            context.set_tensor_address(tensor_spec.name, out.data_ptr())
            outputs[tensor_spec.name] = out
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise MMGenError(f"TensorRT failed to run the {item.spec.name} engine",
                             "run with {debug} and check the TensorRT log above", params=["debug"])
        return outputs

    def _run_graph(self, item: _Engine, batch: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replay a captured step; the first call per batch size runs eagerly once, then captures."""
        import torch

        captured = item.graphs.get(batch)
        if captured is None:
            static_inputs = {n: t.clone() for n, t in inputs.items()}
            # The eager run binds shapes and addresses to the static buffers and lets TensorRT (and the
            # RTX JIT) do its one-time work outside the capture.
            static_outputs = self._run_eager(item, static_inputs)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                item.context.execute_async_v3(self._stream.cuda_stream)
            captured = item.graphs[batch] = _Graph(graph, static_inputs, static_outputs)
        for name, tensor in inputs.items():
            captured.inputs[name].copy_(tensor, non_blocking=True)
        captured.graph.replay()
        return {n: t.clone() for n, t in captured.outputs.items()}

    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The common runner interface: numpy in, numpy out (dtypes as in the component spec)."""
        import torch

        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
        outputs = self.run_torch(spec.name, tensors)
        return {name: outputs[name].cpu().numpy().astype(spec.io(name).dtype, copy=False)
                for name in spec.output_names}

    def device_memory_bytes(self) -> dict[str, int]:
        """Activation memory each engine needs, and what the shared block holds."""
        sizes = {name: self.flavour.device_memory_size(item.engine) for name, item in self._engines.items()}
        if self._activation_block is not None:
            sizes["shared_block"] = int(self._activation_block.numel())
        return sizes

    def close(self) -> None:
        """Persist the RTX runtime cache (JIT kernels) for the next start, then release the GPU objects."""
        if self._runtime_cache is not None:
            try:
                data = bytes(memoryview(self._runtime_cache.serialize()))
                with atomic_path(self.engine_set.runtime_cache_path) as tmp:
                    tmp.write_bytes(data)
            except Exception:  # the cache is an optimisation; never fail a finished run over it
                pass
            self._runtime_cache = None
        # Release in dependency order: graphs and contexts before the memory and configs they use.
        for item in self._engines.values():
            item.graphs.clear()
        self._engines.clear()
        self._keepalive.clear()
        self._activation_block = None
