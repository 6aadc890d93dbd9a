"""Step caching: which denoising steps recompute the denoiser's body, and the cached step itself.

With a policy other than `none`, the sampling loop runs the denoiser in its parts
(`specs.DENOISER_PARTS`): the head (the embeddings) and the tail (the final layer) every step, the body
(every block) only on the steps the policy recomputes; on the others the tail gets the body's residual
(body output - body input) from the last step that computed it. With classifier-free
guidance the cached residual is the whole doubled batch, both halves.

The decision is made here, on the host, from the step index and the head's outputs the backend
returned: the same arithmetic on every backend, so a backend's recompute steps can be compared with
PyTorch's (`CacheStats.recompute_steps`).

Policies (`parse_cache_policy`, the registry `CACHE_POLICIES`):

- `none`: the whole denoiser, every step (the default: no parts needed, nothing changes);
- `every:N`: recompute on every N-th step and on the first and the last step (FORA / DeepCache style);
- `adaptive:T`: recompute on the first and last step, and whenever the relative L1 change of the first
  block's timestep-modulated input (the head's `modulated_input`) from one step to the next, summed
  since the last recompute, reaches T (TeaCache's signal and accumulation, without its rescaling).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmgen_deploy.errors import NotAvailableError, UsageError
from mmgen_deploy.specs import PARTS_WORD, ComponentSpec, Tensors, denoiser_split, has_denoiser_parts

if TYPE_CHECKING:
    from mmgen_deploy.config import DiTConfig
    from mmgen_deploy.runtime.base import Runner


class StepDecider(ABC):
    """One batch's decisions: `recompute(step, signal)` is asked once per step, in order, with the
    head's `modulated_input` of that step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    @abstractmethod
    def recompute(self, step: int, signal: np.ndarray) -> bool:
        """Whether step `step` computes the body (True) or reuses the cached residual."""


@dataclass(frozen=True)
class CachePolicy(ABC):
    """A parsed policy: its `spec` is what the user wrote, normalised (`every:2`, `adaptive:0.1`)."""

    @property
    @abstractmethod
    def spec(self) -> str: ...

    @property
    def enabled(self) -> bool:
        """Whether sampling runs the denoiser's parts (every policy but `none`)."""
        return True

    @property
    def couples_batch(self) -> bool:
        """Whether an image's recompute steps depend on the other images of its batch (a decision taken
        over the whole batch); a server must then not batch one request's images with another's."""
        return False

    @abstractmethod
    def decider(self, steps: int) -> StepDecider: ...


@dataclass(frozen=True)
class NoCache(CachePolicy):
    @property
    def spec(self) -> str:
        return "none"

    @property
    def enabled(self) -> bool:
        return False

    def decider(self, steps: int) -> StepDecider:
        return _Every(steps, 1)


class _Every(StepDecider):
    def __init__(self, steps: int, period: int) -> None:
        super().__init__(steps)
        self.period = period

    def recompute(self, step: int, signal: np.ndarray) -> bool:
        return step % self.period == 0 or step == self.steps - 1


@dataclass(frozen=True)
class EveryN(CachePolicy):
    period: int

    @property
    def spec(self) -> str:
        return f"every:{self.period}"

    def decider(self, steps: int) -> StepDecider:
        return _Every(steps, self.period)


def relative_l1(current: np.ndarray, previous: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """sum |current - previous| / sum |previous|, summed in float64 (the adaptive policy's signal).
    `scratch` (float32, the shape of `current`) takes the difference, so a step allocates nothing: the
    signal is as large as the tokens, (2 x batch, tokens, width), hundreds of MB for a large batch."""
    if scratch is None:
        scratch = np.empty(current.shape, dtype=np.float32)
    np.abs(previous, out=scratch)
    denominator = float(scratch.sum(dtype=np.float64))
    np.subtract(current, previous, out=scratch)
    np.abs(scratch, out=scratch)
    difference = float(scratch.sum(dtype=np.float64))
    return difference / denominator if denominator > 0 else float("inf")


class _Adaptive(StepDecider):
    def __init__(self, steps: int, threshold: float) -> None:
        super().__init__(steps)
        self.threshold = threshold
        self.previous: np.ndarray | None = None
        self.scratch: np.ndarray | None = None
        self.accumulated = 0.0
        self.signals: list[float] = []  # the relative L1 change at each step (NaN at the first)

    def recompute(self, step: int, signal: np.ndarray) -> bool:
        if self.previous is None:
            change = float("nan")
            self.previous = np.array(signal, dtype=np.float32, copy=True)
            self.scratch = np.empty_like(self.previous)
        else:
            change = relative_l1(signal, self.previous, self.scratch)
            np.copyto(self.previous, signal)
        self.signals.append(change)
        if step == 0 or step == self.steps - 1:
            self.accumulated = 0.0
            return True
        self.accumulated += change
        if self.accumulated >= self.threshold:
            self.accumulated = 0.0
            return True
        return False


@dataclass(frozen=True)
class Adaptive(CachePolicy):
    threshold: float

    @property
    def spec(self) -> str:
        return f"adaptive:{self.threshold:g}"

    @property
    def couples_batch(self) -> bool:
        return True  # the signal is the change of the whole batch's modulated input

    def decider(self, steps: int) -> StepDecider:
        return _Adaptive(steps, self.threshold)


def _parse_every(value: str) -> CachePolicy:
    try:
        period = int(value)
    except ValueError:
        period = 0
    if period < 1:
        raise UsageError(f"cache policy every:{value}: N must be a whole number >= 1", "e.g. every:2")
    return EveryN(period)


def _parse_adaptive(value: str) -> CachePolicy:
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not np.isfinite(threshold) or threshold <= 0:
        raise UsageError(f"cache policy adaptive:{value}: T must be a number > 0",
                         "e.g. adaptive:0.2 (larger T: fewer recomputes)")
    return Adaptive(threshold)


# The registry: policy name -> its parser of the text after the colon (None: takes no value).
CACHE_POLICIES: dict[str, Callable[[str], CachePolicy] | None] = {
    "none": None,
    "every": _parse_every,
    "adaptive": _parse_adaptive,
}
CACHE_POLICY_FORMS = "none, every:N (N >= 1) or adaptive:T (T > 0)"


def parse_cache_policy(text: str | CachePolicy | None) -> CachePolicy:
    """`none`, `every:N` or `adaptive:T` (a policy object is returned as it is; None is `none`)."""
    if isinstance(text, CachePolicy):
        return text
    if text is None:
        return NoCache()
    name, sep, value = text.strip().lower().partition(":")
    if name not in CACHE_POLICIES:
        raise UsageError(f"unknown cache policy {text!r}", f"use {CACHE_POLICY_FORMS}")
    parser = CACHE_POLICIES[name]
    if parser is None:
        if sep:
            raise UsageError(f"cache policy {name} takes no value, got {text!r}", f"use {CACHE_POLICY_FORMS}")
        return NoCache()
    if not sep or not value:
        raise UsageError(f"cache policy {name} needs a value, got {text!r}", f"use {CACHE_POLICY_FORMS}")
    return parser(value)


@dataclass
class CacheStats:
    """What a policy did over a sampling run: per batch, the steps that computed the body (and the
    adaptive signal per step), and the DiT block evaluations, counted per image."""

    policy: str = "none"
    blocks_evaluated: int = 0
    blocks_total: int = 0
    recompute_steps: list[list[int]] = field(default_factory=list)
    signals: list[list[float]] = field(default_factory=list)
    # False where the sampling ran elsewhere (a Triton client): the server made the policy's decisions
    # and kept their counts, so the record names the policy and no counts rather than zeros.
    counted: bool = True

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.blocks_evaluated / self.blocks_total if self.blocks_total else 0.0

    def describe(self) -> str:
        """One line for reports: `every:2: 3624 / 7200 block evaluations (49.7 % saved)`."""
        if not self.counted:
            return f"{self.policy} (block evaluations counted by the server)"
        return (f"{self.policy}: {self.blocks_evaluated} / {self.blocks_total} block evaluations "
                f"({100 * self.saved_fraction:.1f} % saved)")

    def to_dict(self) -> dict[str, object]:
        if not self.counted:
            return {"policy": self.policy, "block_evaluations": None, "block_evaluations_total": None,
                    "saved_fraction": None, "recompute_steps": None}
        return {"policy": self.policy, "block_evaluations": self.blocks_evaluated,
                "block_evaluations_total": self.blocks_total, "saved_fraction": round(self.saved_fraction, 4),
                "recompute_steps": self.recompute_steps}

    @classmethod
    def from_dict(cls, record: dict[str, object]) -> CacheStats:
        """The record `to_dict` wrote (as reports keep it)."""
        steps = record.get("recompute_steps")
        if record.get("block_evaluations") is None:
            return cls(policy=str(record["policy"]), counted=False)
        return cls(policy=str(record["policy"]), blocks_evaluated=int(str(record["block_evaluations"])),
                   blocks_total=int(str(record["block_evaluations_total"])),
                   recompute_steps=steps if isinstance(steps, list) else [])

    def count_whole(self, dit: DiTConfig, images: int, steps: int) -> None:
        """A batch run with the whole denoiser: every block, every step."""
        self.blocks_evaluated += dit.depth * images * steps
        self.blocks_total += dit.depth * images * steps


class CachedDenoiser:
    """The denoiser of one batch as head -> (body or its cached residual) -> tail, per step."""

    def __init__(self, runner: Runner, specs: dict[str, ComponentSpec], dit: DiTConfig, policy: CachePolicy,
                 steps: int, images: int, stats: CacheStats) -> None:
        self.runner, self.specs, self.images = runner, specs, images
        if not has_denoiser_parts(dit):
            raise UsageError(f"cache policy {policy.spec}: this model's DiT has {dit.depth} block(s), too few to split "
                             "into the parts step caching reuses", "sample without a cache policy")
        self.decider = policy.decider(steps)
        split = denoiser_split(dit)
        self.always_blocks = len(split["denoiser_head"]) + len(split["denoiser_tail"])
        self.body_blocks = len(split["denoiser_body"])
        self.residual: np.ndarray | None = None
        self.stats = stats
        self.recomputed: list[int] = []
        stats.recompute_steps.append(self.recomputed)

    def _run(self, component: str, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self.runner.run(component, {n: given[n] for n in self.specs[component].input_names})
        except NotAvailableError as exc:
            raise NotAvailableError(
                f"step caching needs the denoiser's parts, and the {getattr(self.runner, 'backend', '')} "
                f"{getattr(self.runner, 'precision', '')} set cannot run {component} ({exc.args[0]})",
                exc.hint or f"export them: `mmgen export RUN_DIR --components {PARTS_WORD}`",
            ) from None

    def __call__(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        given = dict(feeds)
        given.update(self._run("denoiser_head", given))  # buffers valid until the next head call
        recompute = self.decider.recompute(step, given[Tensors.MODULATED_INPUT]) or self.residual is None
        blocks = self.always_blocks
        if recompute:
            residual = self._run("denoiser_body", given)[Tensors.BODY_RESIDUAL]
            if self.residual is None or self.residual.shape != residual.shape:
                self.residual = np.empty_like(residual)
            np.copyto(self.residual, residual)
            self.recomputed.append(step)
            blocks += self.body_blocks
        self.stats.blocks_evaluated += blocks * self.images
        self.stats.blocks_total += (self.always_blocks + self.body_blocks) * self.images
        assert self.residual is not None
        given[Tensors.BODY_RESIDUAL] = self.residual
        return self._run("denoiser_tail", given)[Tensors.MODEL_OUTPUT]

    def finish(self) -> None:
        """Record the adaptive signal of this batch (empty for other policies)."""
        self.stats.signals.append(list(getattr(self.decider, "signals", [])))
