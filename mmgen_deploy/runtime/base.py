"""The runner interface every backend implements (PyTorch, ONNX Runtime, OpenVINO, TensorRT), and its base.

A runner executes one named component on NumPy feeds and returns NumPy outputs; the
tensor names, dtypes and shapes are those of `mmgen_deploy.specs.component_specs`.
The sampling loop only ever talks to the `Runner` interface, so backends are interchangeable.

`BaseRunner` is what a backend subclasses (Polygraphy's `BaseRunner` is the model): the
shared checks (precision, unknown component, feed names/dtypes/shapes) and the context
manager live here once; a backend implements `_open` (load from a run directory), `_run`
(one component on checked feeds) and `close`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.specs import DENOISER_PARTS, PARTS_WORD, ComponentSpec, component_specs

if TYPE_CHECKING:
    from typing_extensions import Self

    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.rundir import RunDir

@runtime_checkable
class Runner(Protocol):
    """Runs deployable components. `backend` is a `runtime.backends.REGISTRY` name, `precision` one of
    that backend's precisions, `device` e.g. "cpu", "cuda:0", "gpu.1"."""

    @property
    def backend(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def device(self) -> str: ...

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `component` (a name in `specs.COMPONENTS`) on `feeds`.

        The returned arrays may be buffers the runner reuses on the next call of the same
        component (preallocated outputs): copy them if they must outlive that call.
        """
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


def check_feeds(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> int:
    """Validate feeds against the component spec; return the batch size.

    Catches wrong names, dtypes and shapes with a message naming the tensor, before a
    backend fails with its own, less helpful error.
    """
    missing = [n for n in spec.input_names if n not in feeds]
    extra = [n for n in feeds if n not in spec.input_names]
    if missing or extra:
        raise MMGenError(f"{spec.name}: feeds must be exactly {spec.input_names}; "
                         f"missing {missing}, unexpected {extra}")
    batch = int(feeds[spec.inputs[0].name].shape[0])
    for tensor in spec.inputs:
        array = feeds[tensor.name]
        if array.dtype != np.dtype(tensor.dtype):
            raise MMGenError(f"{spec.name}.{tensor.name}: dtype {array.dtype}, expected {tensor.dtype}")
        expected = tensor.concrete_shape(batch)
        if tuple(array.shape) != expected:
            raise MMGenError(f"{spec.name}.{tensor.name}: shape {tuple(array.shape)}, expected {expected}")
    return batch


def missing_graph_hint(run_root: object, component: str) -> str:
    """How to get a component's missing graph: the denoiser's parts are exported only when asked."""
    if component in DENOISER_PARTS:
        return f"step caching needs them: `mmgen export {run_root} --components {PARTS_WORD}`"
    return f"re-export: `mmgen export {run_root}`"


class BaseRunner(ABC):
    """A backend: subclass it, implement `_open`, `_run` and `close`, and name the class in its
    `runtime.backends.REGISTRY` entry, from which it takes `backend`, `precisions`, `precision_hint`
    and `default_device` (one owner: the registry).

    Every backend is opened the same way, `Backend.from_run_dir(run, precision, device, **options)`;
    options a backend does not take are ignored, so one call can carry `threads=` and
    `cuda_graph=` whichever backend `auto` picks.
    """

    backend: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]  # what this backend runs; the first is its default
    precision_hint: ClassVar[str] = ""  # how to fix a precision it does not run
    default_device: ClassVar[str] = "cpu"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from mmgen_deploy.runtime.backends import spec_of_runner

        spec = spec_of_runner(f"{cls.__module__}:{cls.__qualname__}")
        if spec is not None:
            cls.backend, cls.precisions, cls.default_device = spec.name, spec.precisions, spec.default_device
            cls.precision_hint = spec.precision_hint

    def __init__(self, config: ModelConfig, precision: str, device: str) -> None:
        self.check_precision(precision)
        self.config = config
        self.specs: dict[str, ComponentSpec] = component_specs(config, parts=True)
        self.precision = precision
        self.device = device

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def check_precision(cls, precision: str) -> None:
        if precision not in cls.precisions:
            raise UsageError(f"the {cls.backend} backend runs {' or '.join(cls.precisions)}, not {precision!r}",
                             cls.precision_hint or f"use {{precision}} {cls.precisions[0]}",
                             params=["backend", "precision"])

    @classmethod
    def from_run_dir(cls, run: RunDir | str | os.PathLike[str], precision: str | None = None,
                     device: str | None = None, **options: Any) -> Self:
        """Open this backend on a run directory (`precision`/`device` None: the backend's default)."""
        from mmgen_deploy.rundir import RunDir

        precision = precision or cls.precisions[0]
        cls.check_precision(precision)
        run = run if isinstance(run, RunDir) else RunDir(run)
        return cls._open(run, precision, device or cls.default_device, **options)

    @classmethod
    @abstractmethod
    def _open(cls, run: RunDir, precision: str, device: str, **options: Any) -> Self:
        """Load the backend's artifacts of `run`; take the options it knows, ignore the others."""

    # -- running ----------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        """The components this runner can run (a TensorRT set may hold only some)."""
        return list(self.specs)

    def spec_of(self, component: str) -> ComponentSpec:
        """The spec of `component`, refused in one line when this runner cannot run it."""
        spec = self.specs.get(component)
        if spec is None or component not in self.components:
            raise self._unknown_component(component)
        return spec

    def _unknown_component(self, component: str) -> MMGenError:
        return UsageError(f"unknown component {component!r}", f"one of {', '.join(self.components)}")

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec_of(component)
        check_feeds(spec, feeds)  # names, dtypes and shapes, with a message naming the tensor
        return self._run(spec, feeds)

    @abstractmethod
    def _run(self, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one component on feeds already checked against its spec."""

    @abstractmethod
    def close(self) -> None:
        """Release sessions, engines and device memory (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
