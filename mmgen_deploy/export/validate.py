"""Run an exported graph in ONNX Runtime (CPU) and compare it with PyTorch FP32, strictly.

Every float output must meet the spec's relative-L2 tolerance and every integer output
its agreement fraction, on every input set (random and real data, several batch sizes).
There is no "passed with a warning": the first failing check makes the export fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgen_deploy.errors import MMGenError
from mmgen_deploy.numerics import compare_output, take_batch
from mmgen_deploy.specs import ComponentSpec, random_feeds


class ExportValidationError(MMGenError):
    """An exported graph computes something else than the PyTorch model."""


@dataclass(frozen=True)
class InputSet:
    kind: str  # "random" or "real" (dataset-derived) or "dummy" (spec inputs standing in for real)
    batch: int
    tensors: dict[str, np.ndarray]
    # PyTorch FP32 outputs, computed once (`with_references`) so that the torch module can be freed
    # before ONNX Runtime loads the graph: one live copy of the weights at a time.
    reference: tuple[np.ndarray, ...] | None = None


@dataclass(frozen=True)
class OutputCheck:
    component: str
    precision: str
    output: str
    kind: str
    batch: int
    metric: str  # "rel_l2" (float outputs) or "agreement" (integer outputs)
    value: float
    tolerance: float
    max_abs: float
    passed: bool

    def describe(self) -> str:
        where = f"{self.component} {self.precision}: output {self.output!r} at batch {self.batch} ({self.kind} inputs)"
        if self.metric == "rel_l2":
            return (f"{where}: relative L2 error {self.value:.3e} > tolerance {self.tolerance:.1e} "
                    f"(max abs error {self.max_abs:.3e})")
        return (f"{where}: only {self.value:.4%} of indices agree with PyTorch, need {self.tolerance:.2%} "
                f"(max abs index difference {self.max_abs:.0f})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# GFLOP (FLOPs plus memory traffic, budget.ComponentCost.cost_gflop) one validation pass (one
# forward over every sample of both input kinds) may cost before the batch sizes shrink: a tiny
# model validates at 1, 3 and the profile max; a DiT-XL/2 (237 GFLOP per sample) or a 256 px VQ
# decoder (622) at two sizes, which prove the dynamic axis.
VALIDATION_GFLOP_BUDGET = 100.0


def validation_batches(spec: ComponentSpec, gflop_per_sample: float | None = None) -> dict[str, tuple[int, ...]]:
    """Batch sizes per input kind ("random", "real"), chosen by cost.

    Cheap components: 1, 3 and the engine profile's max (the denoiser's is doubled for guidance)
    for both kinds. Otherwise 1 and 2 for both, and when even that is over the budget, random
    inputs at 1 and real inputs at 2: every graph still runs at two batch sizes.
    """
    full = tuple(sorted({1, 3, spec.engine_profile.max}))
    cost = gflop_per_sample or 0.0
    if 2 * sum(full) * cost <= VALIDATION_GFLOP_BUDGET:
        return {"random": full, "real": full}
    if 2 * 3 * cost <= VALIDATION_GFLOP_BUDGET:
        return {"random": (1, 2), "real": (1, 2)}
    return {"random": (1,), "real": (2,)}


def random_input_sets(spec: ComponentSpec, specs: dict[str, ComponentSpec], modules: dict[str, nn.Module],
                      seed: int = 0, batches: tuple[int, ...] | None = None) -> list[InputSet]:
    """The spec's random inputs at each validation batch (`random_feeds`: inputs another component
    produces come from running its PyTorch module in `modules`)."""
    def run_upstream(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(specs[name].output_names, torch_outputs(modules[name], specs[name], feeds), strict=True))

    rng = np.random.default_rng(seed)
    upstream = run_upstream if spec.upstream in modules else None
    chosen = batches or validation_batches(spec)["random"]
    return [InputSet("random", b, random_feeds(spec, specs, b, rng, upstream)) for b in chosen]


def real_input_sets(spec: ComponentSpec, real: dict[str, np.ndarray], kind: str = "real",
                    batches: tuple[int, ...] | None = None) -> list[InputSet]:
    chosen = batches or validation_batches(spec)["real"]
    return [InputSet(kind, b, take_batch(real, b)) for b in chosen]


def with_references(module: nn.Module, spec: ComponentSpec, input_sets: list[InputSet]) -> list[InputSet]:
    """The input sets with their PyTorch FP32 outputs attached."""
    return [replace(s, reference=tuple(torch_outputs(module, spec, s.tensors))) for s in input_sets]


def torch_outputs(module: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(inputs[name]) for name in spec.input_names])
    results = result if isinstance(result, tuple) else (result,)
    return [r.detach().cpu().numpy() for r in results]


def ort_session(path: Path, threads: int = 1, *, has_group_norms: bool = False) -> Any:
    """An ONNX Runtime CPU session on `path`; a graph with GroupNorms (`spec.has_group_norms`) gets
    them in the precise form of `ort_graphs` (the kernel's own is ~1e-4 off at 256 px)."""
    import onnxruntime as ort

    from mmgen_deploy.ort_graphs import ort_cpu_model

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    # One thread for small graphs: on a shared 2-core machine, spinning thread pools are 10-100x
    # slower than one. Large graphs (the exporter decides by cost) use more.
    options.intra_op_num_threads = threads
    if threads > 1:  # no spin-waiting between ops: on a shared machine it burns the other core's time
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    # Not through the cache: a graph being validated is checked once, often in a temporary folder.
    return ort.InferenceSession(ort_cpu_model(path, has_group_norms=has_group_norms, cache_dir=None), options,
                                providers=["CPUExecutionProvider"])


def compare(spec: ComponentSpec, precision: str, input_set: InputSet, reference: list[np.ndarray],
            tested: list[np.ndarray]) -> list[OutputCheck]:
    checks = []
    for tensor, ref, got in zip(spec.outputs, reference, tested, strict=True):
        tol = spec.tolerance(precision, tensor.name)
        if ref.shape != got.shape:
            raise ExportValidationError(
                f"{spec.name} {precision}: output {tensor.name!r} has shape {got.shape} in ONNX Runtime "
                f"but {ref.shape} in PyTorch at batch {input_set.batch}",
                "a shape was frozen during export; report this as a bug")
        c = compare_output(ref, got, is_float=tensor.is_float, rel_l2=tol.limit(input_set.kind),
                           min_agreement=tol.min_agreement)
        checks.append(OutputCheck(spec.name, precision, tensor.name, input_set.kind, input_set.batch,
                                  c.metric, c.value, c.limit, c.max_abs, c.passed))
    return checks


def validate_graph(path: Path, module: nn.Module | None, spec: ComponentSpec, precision: str,
                   input_sets: list[InputSet], *, threads: int = 1,
                   progress: Callable[[str], None] | None = None) -> list[OutputCheck]:
    """All checks of one graph; raises `ExportValidationError` on the first failing input set.

    The PyTorch outputs come from each input set's `reference` when present, else from `module`.
    """
    session = ort_session(path, threads, has_group_norms=spec.has_group_norms)
    checks: list[OutputCheck] = []
    for index, input_set in enumerate(input_sets):
        if progress is not None:
            progress(f"{input_set.kind} batch {input_set.batch} ({index + 1}/{len(input_sets)})")
        if input_set.reference is not None:
            reference = list(input_set.reference)
        elif module is not None:
            reference = torch_outputs(module, spec, input_set.tensors)
        else:
            raise ValueError("validate_graph needs the module or input sets with references")
        tested = session.run(spec.output_names, input_set.tensors)
        new = compare(spec, precision, input_set, reference, tested)
        checks.extend(new)
        failed = [c for c in new if not c.passed]
        if failed:
            raise ExportValidationError(
                "validation failed, nothing was written: " + "; ".join(c.describe() for c in failed),
                "the exported graph does not compute what PyTorch computes; rerun with {debug} and report it",
                params=["debug"])
    return checks


def summarize(checks: list[OutputCheck]) -> dict[str, Any]:
    """Worst value per output and input kind (what the manifest and the CLI table show)."""
    worst: dict[str, dict[str, Any]] = {}
    for check in checks:
        key = f"{check.output}/{check.kind}"
        current = worst.get(key)
        bad = check.value if check.metric == "rel_l2" else -check.value
        if current is None or bad > current["_bad"]:
            worst[key] = {"output": check.output, "inputs": check.kind, "metric": check.metric,
                          "value": check.value, "tolerance": check.tolerance, "max_abs": check.max_abs,
                          "batch": check.batch, "_bad": bad}
    batches = sorted({c.batch for c in checks})
    rows = [{k: v for k, v in row.items() if k != "_bad"} for row in worst.values()]
    return {"passed": all(c.passed for c in checks), "batches": batches, "worst": rows}
