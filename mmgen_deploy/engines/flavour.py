"""The ONE place that knows how TensorRT 10.x, TensorRT 11.x and TensorRT-RTX differ.

Everything else in `mmgen_deploy.engines` asks a `Flavour` instead of checking versions:

| difference                         | TRT 10.x              | TRT 11.x            | TensorRT-RTX           |
|------------------------------------|-----------------------|---------------------|------------------------|
| python module                      | tensorrt              | tensorrt            | tensorrt_rtx           |
| STRONGLY_TYPED network flag        | required (set it)     | implicit (accepted) | implicit (accepted)    |
| timing cache                       | yes                   | yes                 | no-op (skipped)        |
| compute-capability targets         | no (builds for GPU)   | no                  | yes, AOT without a GPU |
| runtime (JIT kernel) cache         | no                    | no                  | yes                    |
| context device-memory size         | device_memory_size(*) | _v2                 | _v2                    |
| user-managed activation memory     | strategy argument     | strategy argument   | via IRuntimeConfig     |

(*) `device_memory_size_v2` exists from 10.1 on; 10.0 only has the v1 property.
"""

from __future__ import annotations

import importlib
import platform
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mmgen_deploy.errors import NotAvailableError, UsageError

if TYPE_CHECKING:  # the stubs describe `tensorrt`; TensorRT-RTX has the same API under `tensorrt_rtx`
    import tensorrt

RUNTIMES = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def install_hint(runtime: str) -> str:
    """Which package gives this runtime on this platform."""
    if runtime == "tensorrt-rtx":
        return ("install TensorRT-RTX: `pip install tensorrt-rtx-cu13` (RTX PCs, Turing..Blackwell consumer GPUs; "
                "it also builds engines ahead of time on a machine without a GPU)")
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ("on Jetson use the TensorRT that ships with JetPack (`sudo apt install python3-libnvinfer`; "
                "JetPack 6 = TensorRT 10.3); on other aarch64 servers `pip install tensorrt`")
    return ("install TensorRT: `pip install tensorrt` (x86 + NVIDIA datacenter/RTX GPU), "
            "or use `--runtime tensorrt-rtx` with `pip install tensorrt-rtx-cu13` on RTX PCs")


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:4])


@dataclass
class Flavour:
    """An importable TensorRT flavour and its quirks."""

    runtime: str  # "tensorrt" | "tensorrt-rtx"
    module: ModuleType = field(repr=False)
    version: str

    # -- identity -------------------------------------------------------------------
    @property
    def trt(self) -> Any:
        """The TensorRT module itself (typed as Any: its enums differ slightly between flavours)."""
        return self.module

    @property
    def is_rtx(self) -> bool:
        return self.runtime == "tensorrt-rtx"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return _parse_version(self.version)

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.version}"

    # -- capabilities ---------------------------------------------------------------
    @property
    def has_timing_cache(self) -> bool:
        # TensorRT-RTX accepts the timing-cache calls but ignores them.
        return not self.is_rtx

    @property
    def has_compute_capability_targets(self) -> bool:
        return self.is_rtx

    @property
    def has_runtime_cache(self) -> bool:
        return self.is_rtx

    @property
    def needs_gpu_to_build(self) -> bool:
        # Classic TensorRT times kernels on the GPU it builds for; RTX builds ahead of time.
        return not self.is_rtx

    @property
    def strongly_typed_flag_required(self) -> bool:
        # 10.x needs the flag for FP16 ONNX to stay FP16-as-written; 11.x and RTX are always strongly typed.
        return not self.is_rtx and self.version_tuple[:1] < (11,)

    def logger(self, verbose: bool = False) -> tensorrt.ILogger:
        trt_mod = self.trt
        return trt_mod.Logger(trt_mod.Logger.VERBOSE if verbose else trt_mod.Logger.WARNING)  # type: ignore[no-any-return]

    # -- build ----------------------------------------------------------------------
    def network_flags(self) -> int:
        # Always set STRONGLY_TYPED (required on 10.x, accepted on 11.x / RTX); never EXPLICIT_BATCH (gone in 11).
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def compute_capability(self, name: str) -> Any:
        """`"86"`, `"sm86"` or `"SM86"` -> trt.ComputeCapability.SM86 (RTX only)."""
        if not self.has_compute_capability_targets:
            raise UsageError("{compute_capabilities} is a TensorRT-RTX option",
                             "classic TensorRT builds for the GPU it runs on; drop the option or use "
                             "{runtime} tensorrt-rtx", params=["compute_capabilities", "runtime"])
        key = "SM" + name.upper().removeprefix("SM").replace(".", "")
        known = [n for n in dir(self.trt.ComputeCapability) if n.startswith("SM")]
        if key not in known:
            raise UsageError(f"unknown compute capability {name!r} for {self.label}",
                             f"choose from {', '.join(k.lower() for k in known)} (Hopper / SM90 is not supported)")
        return getattr(self.trt.ComputeCapability, key)

    def disable_tf32(self, config: tensorrt.IBuilderConfig) -> bool:
        """Keep FP32 layers in true FP32. TF32 (on by default in every flavour) rounds matmul/conv inputs to a
        10-bit mantissa, like FP16, which flips the quantizer's argmin between near-equal codes."""
        flag = getattr(self.trt.BuilderFlag, "TF32", None)
        if flag is None:
            return False
        config.clear_flag(flag)
        return True

    def configure_timing_cache(self, config: tensorrt.IBuilderConfig, cache_bytes: bytes) -> bool:
        """Attach a timing cache (possibly empty); False when this flavour has none."""
        if not self.has_timing_cache:
            return False
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return True

    def serialized_timing_cache(self, config: tensorrt.IBuilderConfig) -> bytes | None:
        if not self.has_timing_cache:
            return None
        cache = config.get_timing_cache()
        return bytes(cache.serialize()) if cache is not None else None

    def set_compute_capabilities(self, config: tensorrt.IBuilderConfig, names: list[str]) -> list[str]:
        """Target these GPUs (RTX); returns the canonical names recorded in the manifest."""
        if not names:
            return []
        values = [self.compute_capability(n) for n in names]
        rtx_config: Any = config  # RTX-only attributes, not in the `tensorrt` stubs
        rtx_config.num_compute_capabilities = len(values)
        for i, value in enumerate(values):
            rtx_config.set_compute_capability(value, i)
        return [v.name.lower() for v in values]

    # -- run ------------------------------------------------------------------------
    def device_memory_size(self, engine: tensorrt.ICudaEngine) -> int:
        if hasattr(engine, "device_memory_size_v2"):
            return int(engine.device_memory_size_v2)
        return int(engine.device_memory_size)

    def create_context(self, engine: tensorrt.ICudaEngine, *, user_managed_memory: bool,
                       runtime_cache: Any = None) -> tuple[tensorrt.IExecutionContext, Any]:
        """A context, optionally without its own activation memory (we hand it a shared block).

        Returns (context, keepalive): the RTX runtime config must outlive the context, so the
        caller holds it (None on classic TensorRT).
        """
        trt_mod = self.trt
        runtime_config: Any = None
        strategy = (trt_mod.ExecutionContextAllocationStrategy.USER_MANAGED if user_managed_memory
                    else trt_mod.ExecutionContextAllocationStrategy.STATIC)
        if self.is_rtx:
            # RTX compiles kernels here (JIT); the runtime cache keeps them for the next start.
            runtime_config = engine.create_runtime_config()
            runtime_config.set_execution_context_allocation_strategy(strategy)
            if runtime_cache is not None:
                runtime_config.set_runtime_cache(runtime_cache)
            context = engine.create_execution_context(runtime_config)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise NotAvailableError(f"{self.label} could not create an execution context",
                                    "the GPU may be out of memory; close other GPU programs")
        return context, runtime_config

    def set_device_memory(self, context: tensorrt.IExecutionContext, address: int, size: int) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(address, size)
        else:  # TRT 10.0: only the v1 property (absent from the 10.13 stubs)
            legacy: Any = context
            legacy.device_memory = address

    def new_runtime_cache(self, engine: tensorrt.ICudaEngine, cache_bytes: bytes | None) -> tuple[Any, Any]:
        """One JIT-kernel cache shared by every context of the set (RTX); returns (cache, its config to keep).

        A cache from another GPU, driver or RTX version is rejected by `deserialize` (returns False),
        leaving the cache empty: it then fills anew and overwrites the old file on close.
        """
        if not self.has_runtime_cache:
            return None, None
        runtime_config: Any = engine.create_runtime_config()
        cache = runtime_config.create_runtime_cache()
        if cache_bytes:
            cache.deserialize(cache_bytes)
        return cache, runtime_config

    def plan_validity(self, runtime: tensorrt.Runtime, plan: bytes) -> str | None:
        """RTX can check a plan before deserializing (needs a GPU): None = valid or unknown, else why not."""
        check = getattr(runtime, "get_engine_validity", None)
        if check is None:
            return None
        validity, diagnostics = check(plan)
        if validity.name == "VALID":
            return None
        return f"{validity.name.lower()} (diagnostics code {int(diagnostics)})"


def load_flavour(runtime: str) -> Flavour:
    """Import the named runtime or explain which package to install for this platform."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}", f"choose one of {', '.join(RUNTIMES)}")
    module_name = _MODULES[runtime]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the wheel's shared libraries failing to load
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotAvailableError(f"{runtime} is not usable here ({reason})", install_hint(runtime)) from None
    if not hasattr(module, "Builder"):  # e.g. only `tensorrt-stubs` installed: a namespace package
        raise NotAvailableError(f"{runtime} is not installed (module {module_name} has no library)",
                                install_hint(runtime))
    return Flavour(runtime=runtime, module=module, version=str(getattr(module, "__version__", "0")))


def installed_flavours() -> list[Flavour]:
    """The flavours importable here, classic TensorRT first."""
    found = []
    for runtime in RUNTIMES:
        try:
            found.append(load_flavour(runtime))
        except NotAvailableError:
            continue
    return found
