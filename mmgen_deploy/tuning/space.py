"""The configurations `tune` may choose from: which model (the run, or a distilled student of it),
which engine (backend x precision x batch size, from the backend registry) and which sampler settings
(sampler x steps x guidance x step-caching policy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.rundir import RunDir, RunLike

# What the search varies when it is not told otherwise. Steps below the run's own default only
# (more steps cost more and a run's default is its quality reference); guidance 1 halves the work.
SEARCH_SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp-2m")
SEARCH_STEPS: tuple[int, ...] = (50, 30, 25, 20, 15, 12, 10, 8, 6, 5, 4)
SEARCH_CACHES: tuple[str, ...] = (SAMPLING.cache, "every:2", "every:3")
GUIDANCE_OFF = 1.0
# Precisions ordered by how closely they follow FP32: an engine is dropped when one of a more exact
# precision is at least as fast (it cannot be better, only worse).
EXACTNESS: dict[str, int] = {"fp32": 0, "fp16": 1, "bf16": 1, "int8": 2, "fp8": 2}
MODELS = ("run", "student")


@dataclass(frozen=True)
class Engine:
    """Where a configuration runs: a registry backend, one of its precisions, and the images per call."""

    backend: str
    precision: str
    batch_size: int
    device: str = "cpu"

    def label(self) -> str:
        return f"{self.backend} {self.precision} b{self.batch_size}"


@dataclass(frozen=True)
class Settings:
    """How a configuration samples."""

    sampler: str
    steps: int
    cfg_scale: float
    cache: str = SAMPLING.cache

    def label(self) -> str:
        cache = "" if self.cache == SAMPLING.cache else f" {self.cache}"
        return f"{self.sampler} {self.steps} steps cfg {self.cfg_scale:g}{cache}"


@dataclass(frozen=True)
class Candidate:
    """One complete configuration: model, engine, sampler settings."""

    model: str  # "run" or "student"
    engine: Engine
    settings: Settings

    def label(self) -> str:
        who = "student " if self.model == "student" else ""
        return f"{who}{self.engine.label()} {self.settings.label()}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, **dataclasses.asdict(self.engine), **dataclasses.asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        try:
            engine = Engine(str(data["backend"]), str(data["precision"]), int(data["batch_size"]),
                            str(data.get("device", "cpu")))
            settings = Settings(str(data["sampler"]), int(data["steps"]), float(data["cfg_scale"]),
                                str(data.get("cache", SAMPLING.cache)))
            model = str(data.get("model", "run"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a configuration: {exc}") from None
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        return cls(model, engine, settings)


def run_default_settings(config: Any) -> Settings:
    """The run's own sampling settings (a distilled student's, otherwise `defaults.SAMPLING`), no cache."""
    from mmgen_deploy.sampling.loop import run_sampling_defaults

    own = run_sampling_defaults(config)
    return Settings(str(own["sampler"]), int(own["steps"]), float(own["cfg_scale"]))


def can_cache(run: RunDir, engine: Engine) -> bool:
    """Whether step caching can run on `engine`: the denoiser is deep enough to split, and a backend that
    reads exported graphs has the parts (`mmgen export --components denoiser_parts`)."""
    from mmgen_deploy.runtime.backends import backend_spec
    from mmgen_deploy.specs import DENOISER_PARTS, has_denoiser_parts

    if not has_denoiser_parts(run.load_config().dit):
        return False
    onnx_set = backend_spec(engine.backend).onnx_set(engine.precision)
    return onnx_set is None or not run.missing_onnx(onnx_set, DENOISER_PARTS)


def engines_here(run: RunLike, backends: Sequence[str] | None, precisions: Sequence[str] | None,
                 batch_sizes: Sequence[int]) -> list[Engine]:
    """Every (backend, precision, batch size) that can run `run` on this machine's default devices:
    the registry's backends that are installed, each with the precisions it has artifacts for here
    (`runnable_precisions`), limited to `backends` / `precisions` when given."""
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime.backends import (
        REGISTRY,
        backend_spec,
        check_precision_name,
        runnable_precisions,
        tensorrt_problem,
    )
    from mmgen_deploy.runtime.select import runner_class

    run = RunDir.of(run)
    for name in backends or ():
        backend_spec(name)
    for precision in precisions or ():
        check_precision_name(precision)
    for size in batch_sizes:
        if not 1 <= size <= SAMPLING.max_batch_size:
            raise UsageError(f"{{batch_sizes}} must be in 1..{SAMPLING.max_batch_size}, got {size}",
                             params=["batch_sizes"])
    features = cpu_features()
    engines = []
    for name, spec in REGISTRY.items():
        if backends and name not in backends:
            continue
        if spec.missing() is not None:
            continue
        for precision in runnable_precisions(run, name, features):
            if precisions and precision not in precisions:
                continue
            if spec.engine_sets and tensorrt_problem(run, ("denoiser",), precision):
                continue
            onnx_set = spec.onnx_set(precision)
            if onnx_set is not None and run.missing_onnx(onnx_set, ("denoiser",)):
                continue
            try:
                runner_class(name)
            except MMGenError:  # its library is installed but does not import
                continue
            engines += [Engine(name, precision, size, spec.default_device) for size in batch_sizes]
    if not engines:
        raise UsageError("no backend can run this run here with the backends and precisions asked for",
                         "run `mmgen doctor`, or export the run (`mmgen export RUN`)")
    return engines


def settings_space(config: Any, *, samplers: Sequence[str] = SEARCH_SAMPLERS, steps: Sequence[int] = SEARCH_STEPS,
                   caches: Sequence[str] = SEARCH_CACHES, with_cache: bool = True) -> list[Settings]:
    """The sampler settings a run is searched over: its own, and each sampler at step counts up to its
    own, at its guidance scale and with guidance off, with and without step caching. A distilled
    student samples only as it was trained: its own settings."""
    own = run_default_settings(config)
    if config.student is not None:
        return [own]
    guidance = [own.cfg_scale] + ([GUIDANCE_OFF] if own.cfg_scale != GUIDANCE_OFF else [])
    counts = sorted({s for s in steps if s <= own.steps} | {own.steps}, reverse=True)
    space = [own]
    for sampler in samplers:
        for scale in guidance:
            for cache in (caches if with_cache else (SAMPLING.cache,)):
                for count in counts:
                    settings = Settings(sampler, count, scale, cache)
                    if settings not in space:
                        space.append(settings)
    return space


def student_teacher_check(student: RunLike, teacher: RunLike) -> RunDir:
    """The student run, refused in one line unless its run.json names `teacher` as its teacher by the
    hash of the teacher's weights (`distilled_from.teacher_sha256`, written by `mmgen distill`)."""
    student_run, teacher_run = RunDir.of(student), RunDir.of(teacher)
    meta = student_run.read_meta()
    origin = meta.get("distilled_from")
    if not isinstance(origin, dict) or student_run.load_config().student is None:
        raise UsageError(f"{{student}} {student_run.root} is not a distilled student (its run.json has no "
                         "distilled_from)", "give a run made by `mmgen distill`", params=["student"])
    if origin.get("teacher_sha256") != teacher_run.weights_sha256():
        raise UsageError(f"{{student}} {student_run.root} was distilled from other weights than "
                         f"{teacher_run.root}'s", "give a student distilled from this run", params=["student"])
    return student_run
