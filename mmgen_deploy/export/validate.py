"""Run an exported graph in ONNX Runtime (CPU) and compare it with PyTorch FP32, strictly.

Every float output must meet the spec's relative-L2 tolerance and every integer output
its agreement fraction, on every input set (random and real data, several batch sizes).
There is no "passed with a warning": the first failing check makes the export fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


def validation_batches(spec: ComponentSpec) -> tuple[int, ...]:
    """1, 3 and the engine profile's max (the denoiser's is doubled for guidance)."""
    return tuple(sorted({1, 3, spec.engine_profile.max}))


def random_input_sets(spec: ComponentSpec, specs: dict[str, ComponentSpec], modules: dict[str, nn.Module],
                      seed: int = 0) -> list[InputSet]:
    """The spec's random inputs at each validation batch (`random_feeds`: inputs another component
    produces come from running its PyTorch module in `modules`)."""
    def run_upstream(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(specs[name].output_names, torch_outputs(modules[name], specs[name], feeds), strict=True))

    rng = np.random.default_rng(seed)
    upstream = run_upstream if spec.upstream in modules else None
    return [InputSet("random", b, random_feeds(spec, specs, b, rng, upstream)) for b in validation_batches(spec)]


def real_input_sets(spec: ComponentSpec, real: dict[str, np.ndarray], kind: str = "real") -> list[InputSet]:
    return [InputSet(kind, b, take_batch(real, b)) for b in validation_batches(spec)]


def torch_outputs(module: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(inputs[name]) for name in spec.input_names])
    results = result if isinstance(result, tuple) else (result,)
    return [r.detach().cpu().numpy() for r in results]


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    # One thread: on a shared 2-core machine, spinning thread pools are 10-100x slower than one.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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


def validate_graph(path: Path, module: nn.Module, spec: ComponentSpec, precision: str,
                   input_sets: list[InputSet]) -> list[OutputCheck]:
    """All checks of one graph; raises `ExportValidationError` on the first failing input set."""
    session = ort_session(path)
    checks: list[OutputCheck] = []
    for input_set in input_sets:
        reference = torch_outputs(module, spec, input_set.tensors)
        tested = session.run(spec.output_names, input_set.tensors)
        new = compare(spec, precision, input_set, reference, tested)
        checks.extend(new)
        failed = [c for c in new if not c.passed]
        if failed:
            raise ExportValidationError(
                "validation failed, nothing was written: " + "; ".join(c.describe() for c in failed),
                "the exported graph does not compute what PyTorch computes; rerun with --debug and report it")
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
