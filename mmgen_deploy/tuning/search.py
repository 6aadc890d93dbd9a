"""The search behind `mmgen tune`: measure configurations on this machine, prune, keep the front.

It measures in three passes, each cheaper than measuring everything:

1. **Engines.** Every (backend, precision, batch size) that runs here samples the run's own settings
   on the first rung's images. Per precision only the fastest engine is kept (engines of one precision
   compute the same numbers), and a less exact precision is kept only when it is faster than every more
   exact one and its quality is not hopeless.
2. **Settings, first rung.** On the kept engines, each sampler setting (sampler x steps x guidance x
   cache) is measured on few images. Step counts are walked from the most to the fewest, and once a
   count is hopeless (its quality plus twice its standard error is below the reference minus the
   allowed drop) fewer steps of the same sampler, guidance and cache are not measured, nor a sparser
   cache at that count: quality falls with fewer steps and sparser caching.
3. **Successive halving.** The survivors of a rung are measured on three times as many images (the
   earlier images are kept, not sampled again). After each rung a configuration is dropped when it is
   hopeless, or when another one is at least as fast and better by more than both standard errors; of
   the rest the fastest third go on. The reference configuration (the run's own settings on the fastest
   FP32 engine) and the default one (what `generate` runs without options) are measured on every rung.

A time budget bounds the whole: a measurement that would not finish in the time left is not started,
and the front is computed from what was measured. Opened runners are reused across measurements, and
each is closed as soon as no configuration left to measure can use it (its engines pruned or cut, or
its last measurement done): a search over many backends and precisions holds only the runners it
still needs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.tuning.front import fastest_within, pareto_front
from mmgen_deploy.tuning.quality import QualityMeasure, choose_measure
from mmgen_deploy.tuning.space import (
    EXACTNESS,
    Candidate,
    Engine,
    Settings,
    can_cache,
    engines_here,
    run_default_settings,
    settings_space,
    student_teacher_check,
)

Progress = Callable[[str], None]
ETA = 3  # successive halving: a third goes on, on three times the images
# Standard errors of the drop a recipe's choice must stay within the budget by (about 97.5 % one-sided).
# One was not enough on the quickstart model: a 4-step student measured 0.7 +- 1.0 points below the
# reference on 1080 images and lost 2.9 on 900 fresh ones.
CONFIDENCE = 2.0


@dataclass
class Measurement:
    """What is known about one candidate: its per-image scores so far and the time they took."""

    candidate: Candidate
    scores: list[float] = field(default_factory=list)
    side: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0  # sampling time (noise to uint8 images), judging excluded
    peak_rss_mib: float | None = None
    rung: int = -1  # the last rung it was measured on
    status: str = "measured"  # or why it stopped: pruned, skipped, failed, budget
    reason: str = ""
    noise: float = float("inf")

    @property
    def images(self) -> int:
        return len(self.scores)

    @property
    def quality(self) -> float:
        return float(np.mean(self.scores)) if self.scores else float("nan")

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / self.images if self.images else float("inf")

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "label": self.candidate.label(), "config": self.candidate.to_dict(), "status": self.status,
            "images": self.images, "quality": round(self.quality, 3) if self.scores else None,
            "quality_stderr": None if not math.isfinite(self.noise) else round(self.noise, 3),
            "ms_per_image": round(self.ms_per_image, 3) if self.scores else None,
            "peak_rss_mib": None if self.peak_rss_mib is None else round(self.peak_rss_mib, 1)}
        for name, values in self.side.items():
            record[name] = round(float(np.mean(values)), 3) if values else None
        if self.reason:
            record["reason"] = self.reason
        return record


@dataclass
class TuneOptions:
    samples: int | None = None  # images of the last rung (None: 360 for a class judge, 200 prompts, 16 fidelity)
    seed: int = 0
    budget_seconds: float = 20 * 60
    max_quality_drop: float | None = None  # points; also what "hopeless" is measured against
    backends: Sequence[str] | None = None
    precisions: Sequence[str] | None = None
    batch_sizes: Sequence[int] = (SAMPLING.batch_size, 4 * SAMPLING.batch_size)
    threads: int | None = None
    student: RunLike | None = None
    samplers: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    caches: Sequence[str] | None = None


@dataclass
class TuneResult:
    measure: QualityMeasure
    measurements: list[Measurement]
    reference: Measurement
    default: Measurement
    rungs: list[int]
    seconds: float
    budget_exhausted: bool
    student: RunDir | None
    options: TuneOptions

    def comparable(self) -> list[Measurement]:
        """The measured points on as many images as the reference: the ones a recipe may choose."""
        return [m for m in self.measurements if m.scores and m.images == self.reference.images]

    def front(self) -> list[Measurement]:
        return pareto_front([m for m in self.measurements if m.scores])

    def drop(self, m: Measurement) -> tuple[float, float]:
        """How many points `m` is below the reference, and the standard error of that difference. Both were
        measured on the same images (same seeds, conditions and noise), so the difference is taken image
        by image, which is far less noisy than the difference of two accuracies."""
        n = min(m.images, self.reference.images)
        if n == 0:
            return float("nan"), float("inf")
        differences = np.asarray(self.reference.scores[:n], dtype=np.float64) - np.asarray(m.scores[:n])
        stderr = float(np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
        return float(differences.mean()), stderr

    def within(self, m: Measurement, max_drop: float) -> bool:
        """Whether `m` is within `max_drop` points of the reference with confidence: its measured drop plus
        `CONFIDENCE` standard errors of it is at most `max_drop`. The fastest configuration that merely
        measures within the budget is, more often than not, one that measured lucky."""
        drop, stderr = self.drop(m)
        # One image has no standard error: it says nothing about the drop.
        return m is self.reference or (math.isfinite(stderr) and drop + CONFIDENCE * stderr <= max_drop)

    def choose(self, max_drop: float) -> Measurement:
        """The fastest configuration `within` `max_drop` points of the reference (measured on the same
        images as the reference); the reference itself when none is faster."""
        eligible = [m for m in self.comparable() if self.within(m, max_drop)]
        chosen = fastest_within(eligible, float("-inf"), 0.0)
        return chosen if chosen is not None else self.reference

    def pruned_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.measurements:
            counts[m.status] = counts.get(m.status, 0) + 1
        return counts


def default_samples(run: RunDir) -> int:
    """Images of the last rung when none are asked for: 20 per class for a class judge (360 for the
    18 `shapes` classes), 200 prompts for a text judge, 16 for fidelity (each image needs its reference)."""
    from mmgen_deploy.tuning.quality import has_judge

    if not has_judge(run):
        return 16
    config = run.load_config()
    return 200 if config.uses_text else 20 * config.dit.num_classes


def rung_sizes(final: int, unit: int) -> list[int]:
    """Image counts of the rungs: the last is `final`, each earlier a third of the next (whole units,
    at least one unit)."""
    sizes = [final]
    while sizes[0] > unit:
        smaller = max(unit, math.ceil(sizes[0] / ETA / unit) * unit)
        if smaller >= sizes[0] or len(sizes) == 3:
            break
        sizes.insert(0, smaller)
    return sizes


RunnerKey = tuple[str, str, str, str]  # (model, backend, precision, device): what one runner serves


def runner_key(candidate: Candidate) -> RunnerKey:
    """The runner a candidate samples with: every batch size of one model, backend, precision and device
    shares it."""
    engine = candidate.engine
    return (candidate.model, engine.backend, engine.precision, engine.device)


class _Runners:
    """Opened runners, one per `RunnerKey`, reused by every measurement until `close_unneeded` closes it."""

    def __init__(self, runs: dict[str, RunDir], threads: int | None) -> None:
        self.runs, self.threads = runs, threads
        self.open: dict[RunnerKey, Any] = {}

    def get(self, candidate: Candidate) -> Any:
        from mmgen_deploy.runtime.select import runner_class

        key, engine = runner_key(candidate), candidate.engine
        if key not in self.open:
            self.open[key] = runner_class(engine.backend).from_run_dir(
                self.runs[candidate.model], engine.precision, engine.device, threads=self.threads)
        return self.open[key]

    def close_unneeded(self, needed: set[RunnerKey]) -> list[RunnerKey]:
        """Close every open runner not in `needed` (its sessions and weights go); return their keys."""
        closed = [key for key in self.open if key not in needed]
        for key in closed:
            self.open.pop(key).close()
        return closed

    def close(self) -> None:
        self.close_unneeded(set())


class _Search:
    def __init__(self, run: RunDir, options: TuneOptions, progress: Progress | None) -> None:
        self.run, self.options = run, options
        self.say: Progress = progress or (lambda _text: None)
        self.started = time.monotonic()
        self.deadline = self.started + options.budget_seconds
        self.student = None if options.student is None else student_teacher_check(options.student, run)
        self.configs = {"run": run.load_config()}
        runs = {"run": run}
        if self.student is not None:
            runs["student"] = self.student
            self.configs["student"] = self.student.load_config()
        self.tokenizers = {name: (r.load_tokenizer() if self.configs[name].uses_text else None)
                           for name, r in runs.items()}
        self.runners = _Runners(runs, options.threads)
        self.measurements: dict[Candidate, Measurement] = {}
        self.out_of_time = False
        self.measure: QualityMeasure | None = None
        self.pinned: set[Candidate] = set()
        self.warm: set[tuple[Any, ...]] = set()  # call shapes each runner has run (`_warm_up`)

    # -- measuring -------------------------------------------------------------------------
    def _record(self, candidate: Candidate) -> Measurement:
        if candidate not in self.measurements:
            self.measurements[candidate] = Measurement(candidate)
        return self.measurements[candidate]

    def _predicted_seconds(self, m: Measurement, images: int) -> float:
        if m.scores:
            return m.seconds / m.images * images
        own = self.measurements.get(Candidate("run", m.candidate.engine, run_default_settings(self.configs["run"])))
        if own is None or not own.scores:
            return 0.0
        scale = _evaluations(m.candidate.settings) / _evaluations(own.candidate.settings)
        return own.seconds / own.images * images * scale

    def measure_to(self, candidate: Candidate, images: int, rung: int, what: str) -> Measurement:
        """Extend `candidate`'s measurement to `images` images (nothing when it already has them)."""
        from mmgen_deploy.parity.bench import peak_rss_mib, reset_peak_rss
        from mmgen_deploy.sampling import make_conditioning, sample

        assert self.measure is not None
        m = self._record(candidate)
        start = m.images
        if start >= images or m.status not in ("measured",):
            return m
        if time.monotonic() + self._predicted_seconds(m, images - start) > self.deadline:
            self.out_of_time = True
            m.reason = f"not measured on {images} images: the time budget ran out"
            if not m.scores:
                m.status = "budget"
            return m
        self.say(f"{what}: {candidate.label()}, images {start + 1}-{images}")
        config = self.configs[candidate.model]
        settings = candidate.settings
        try:
            runner = self.runners.get(candidate)
            class_ids, prompts = self.measure.conditions(start, images)
            condition = make_conditioning(runner, config, class_ids=class_ids, prompts=prompts,
                                          tokenizer=self.tokenizers[candidate.model])
            self._warm_up(runner, config, condition, candidate, images - start)
            reset_peak_rss()
            result = sample(runner, config, condition, steps=settings.steps, sampler=settings.sampler,
                            cfg_scale=settings.cfg_scale, seed=self.options.seed,
                            seeds=[self.options.seed] * (images - start), image_indices=range(start, images),
                            batch_size=candidate.engine.batch_size, cache=settings.cache)
        except MMGenError as exc:
            m.status, m.reason = "failed", exc.message
            return m
        peak = peak_rss_mib()
        scores, side = self.measure.score(np.asarray(result.images), start)
        m.scores += scores
        for name, values in side.items():
            m.side.setdefault(name, []).extend(values)
        m.seconds += result.total_seconds
        m.rung = rung
        m.noise = self.measure.noise(m.scores)
        if peak is not None:
            m.peak_rss_mib = max(peak, m.peak_rss_mib or 0.0)
        return m

    def _warm_up(self, runner: Any, config: Any, condition: Any, candidate: Candidate, count: int) -> None:
        """Run every call shape of a measurement once, untimed, the first time it occurs: a backend that
        compiles per input shape (OpenVINO) would otherwise charge the compilation to whichever
        configuration meets a batch size first. One or two steps run the same shapes as the whole loop."""
        from mmgen_deploy.sampling import sample
        from mmgen_deploy.sampling.cache import parse_cache_policy

        settings, engine = candidate.settings, candidate.engine
        sizes = {min(engine.batch_size, count), count % engine.batch_size or engine.batch_size}
        key = (candidate.model, engine, frozenset(sizes), settings.cfg_scale != 1.0,
               parse_cache_policy(settings.cache).enabled)
        if key in self.warm:
            return
        self.warm.add(key)
        steps = settings.steps if config.student is not None else min(settings.steps, 2)
        sample(runner, config, condition, steps=steps, sampler=settings.sampler, cfg_scale=settings.cfg_scale,
               seed=self.options.seed, batch_size=engine.batch_size, cache=settings.cache)

    def release(self, still_to_measure: Iterable[Candidate]) -> None:
        """Close the runners no candidate in `still_to_measure` samples with, and forget their warm call
        shapes (a runner opened again compiles again). Memory then holds only the runners the search can
        still use, not every backend and precision it tried."""
        closed = set(self.runners.close_unneeded({runner_key(c) for c in still_to_measure}))
        if closed:
            self.warm = {key for key in self.warm if (key[0], *_engine_key(key[1])) not in closed}

    def hopeless(self, m: Measurement, reference: Measurement) -> bool:
        drop = self.options.max_quality_drop
        if drop is None or not m.scores or m is reference:
            return False
        margin = 2 * m.noise if math.isfinite(m.noise) else 0.0
        return m.quality + margin < reference.quality - drop

    # -- the passes ------------------------------------------------------------------------
    def run_search(self) -> TuneResult:
        options = self.options
        self.measure = choose_measure(self.run, options.seed, options.samples or default_samples(self.run),
                                      progress=self.say)
        unit = self.measure.unit
        samples = max(unit, math.ceil((options.samples or default_samples(self.run)) / unit) * unit)
        rungs = rung_sizes(samples, unit)
        own = run_default_settings(self.configs["run"])

        # 1. engines
        engines = engines_here(self.run, options.backends, options.precisions, options.batch_sizes)
        default_engine = self._default_engine()
        if default_engine not in engines:
            engines.append(default_engine)
        default_candidate = Candidate("run", default_engine, own)
        engine_candidates = [Candidate("run", e, own) for e in engines]
        for index, candidate in enumerate(engine_candidates):
            done = [self.measurements[c] for c in engine_candidates[:index]]
            self.release([*engine_candidates[index:], default_candidate,
                          *(m.candidate for m in done if not _engine_pruned(m, done))])
            self.measure_to(candidate, rungs[0], 0, "engines")
        own_points = [self.measurements[c] for c in engine_candidates]
        measured = [m for m in own_points if m.scores]
        if not measured:
            reasons = "; ".join(f"{m.candidate.engine.label()}: {m.reason}" for m in own_points)
            raise MMGenError(f"no configuration could be measured ({reasons})")
        exact = min(EXACTNESS.get(m.candidate.engine.precision, 9) for m in measured)
        reference = min((m for m in measured if EXACTNESS.get(m.candidate.engine.precision, 9) == exact),
                        key=lambda m: m.ms_per_image)
        default = self.measurements[Candidate("run", default_engine, own)]
        self.pinned = {reference.candidate, default.candidate}
        kept = self._keep_engines(measured, reference)

        # 2. settings, first rung
        candidates = self._settings_candidates(kept, own)
        self._first_rung(candidates, rungs[0], reference, more_rungs=len(rungs) > 1)

        # 3. successive halving
        alive = self._alive()
        for rung, size in enumerate(rungs[1:], start=1):
            if self.out_of_time:
                break
            alive = self._select(alive, reference, rung - 1)
            order = sorted(alive, key=lambda m: (m.candidate not in self.pinned, m.ms_per_image))
            last_rung = rung == len(rungs) - 1
            for index, m in enumerate(order):
                # Every one measured to this rung may go on to the next; on the last, none goes on.
                going_on = [] if last_rung else [o.candidate for o in order[:index]
                                                 if o.status == "measured" and o.images == size]
                self.release([*(o.candidate for o in order[index:]), *going_on])
                self.measure_to(m.candidate, size, rung, f"rung {rung + 1}/{len(rungs)} [{index + 1}/{len(order)}]")
            alive = [m for m in alive if m.status == "measured" and m.images == size]
        self.runners.close()
        for m in self.measurements.values():
            if m.status == "measured" and m.images < rungs[-1] and not m.reason:
                m.reason = f"measured on {m.images} of {rungs[-1]} images"
        return TuneResult(self.measure, list(self.measurements.values()), reference, default, rungs,
                          time.monotonic() - self.started, self.out_of_time, self.student, options)

    def _alive(self) -> list[Measurement]:
        """The measured configurations that have not stopped: the ones the next rung selects from."""
        return [m for m in self.measurements.values() if m.status == "measured" and m.scores]

    def _default_engine(self) -> Engine:
        from mmgen_deploy.runtime.select import resolve_backend

        choice = resolve_backend("auto", self.run)
        return Engine(choice.backend, choice.precision, SAMPLING.batch_size, choice.device)

    def _keep_engines(self, measured: list[Measurement], reference: Measurement) -> list[Engine]:
        fastest: dict[str, Measurement] = {}
        for m in measured:
            best = fastest.get(m.candidate.engine.precision)
            if best is None or m.ms_per_image < best.ms_per_image:
                fastest[m.candidate.engine.precision] = m
        for m in measured:
            best = fastest[m.candidate.engine.precision]
            if best is not m:
                self._prune(m, f"{best.candidate.engine.label()} runs the same precision faster")
        kept = []
        for precision, m in sorted(fastest.items(), key=lambda item: EXACTNESS.get(item[0], 9)):
            rank = EXACTNESS.get(precision, 9)
            faster_exact = [o for p, o in fastest.items() if EXACTNESS.get(p, 9) < rank
                            and o.ms_per_image <= m.ms_per_image]
            if faster_exact:
                self._prune(m, f"{faster_exact[0].candidate.engine.label()} is at least as fast and more exact")
            elif self.hopeless(m, reference):
                self._prune(m, "hopeless: quality below the reference minus the allowed drop")
            else:
                kept.append(m.candidate.engine)
        return kept

    def _prune(self, m: Measurement, reason: str, status: str = "pruned") -> None:
        if m.candidate in self.pinned:
            return
        m.status, m.reason = status, reason

    def _settings_candidates(self, engines: list[Engine], own: Settings) -> list[Candidate]:
        options = self.options
        kwargs: dict[str, Any] = {}
        if options.samplers:
            kwargs["samplers"] = options.samplers
        if options.steps:
            kwargs["steps"] = options.steps
        if options.caches:
            kwargs["caches"] = options.caches
        candidates = []
        for engine in engines:
            space = settings_space(self.configs["run"], with_cache=can_cache(self.run, engine), **kwargs)
            candidates += [Candidate("run", engine, s) for s in space]
        if self.student is not None:
            student_own = run_default_settings(self.configs["student"])
            student_engines = [e for e in engines if _runs(self.student, e)] or \
                              [Engine("torch", "fp32", options.batch_sizes[0])]
            candidates += [Candidate("student", e, student_own) for e in student_engines]
        return candidates

    def _first_rung(self, candidates: list[Candidate], size: int, reference: Measurement, *,
                    more_rungs: bool) -> None:
        hopeless: set[tuple[Any, ...]] = set()
        # Chains of fewer steps: most steps first; densest cache first.
        ordered = sorted(candidates, key=lambda c: (c.model, c.engine.label(), c.settings.sampler,
                                                    -c.settings.cfg_scale, _cache_rank(c.settings.cache),
                                                    -c.settings.steps))
        for index, candidate in enumerate(ordered):
            # What may still be measured: the rest of this rung, and (when a rung follows) whoever is alive.
            self.release([*ordered[index:], *(m.candidate for m in self._alive() if more_rungs)])
            if self.out_of_time:
                m = self._record(candidate)
                if not m.scores:
                    m.status, m.reason = "budget", "not measured: the time budget ran out"
                continue
            s, e = candidate.settings, candidate.engine
            chain = (candidate.model, e, s.sampler, s.cfg_scale, s.cache)
            sparser = (candidate.model, e, s.sampler, s.cfg_scale, s.steps)
            if any(key[:5] == chain and key[5] > s.steps for key in hopeless):
                m = self._record(candidate)
                m.status, m.reason = "skipped", "more steps with these settings were already hopeless"
                continue
            if any(key[:2] == sparser[:2] and key[2:4] == sparser[2:4] and key[5] == s.steps
                   and _cache_rank(key[4]) < _cache_rank(s.cache) for key in hopeless):
                m = self._record(candidate)
                m.status, m.reason = "skipped", "a denser cache at these steps was already hopeless"
                continue
            m = self.measure_to(candidate, size, 0, f"rung 1 [{index + 1}/{len(ordered)}]")
            if self.hopeless(m, reference):
                hopeless.add((*chain, s.steps))
                self._prune(m, f"hopeless on {m.images} images: {m.quality:.1f} (+-{m.noise:.1f}) vs the "
                               f"reference's {reference.quality:.1f}")

    def _select(self, alive: list[Measurement], reference: Measurement, rung: int) -> list[Measurement]:
        """Who goes on to the next rung."""
        survivors = []
        for m in alive:
            if m.candidate in self.pinned:
                survivors.append(m)
                continue
            if self.hopeless(m, reference):
                self._prune(m, f"hopeless on {m.images} images: {m.quality:.1f} (+-{m.noise:.1f})")
                continue
            better = [o for o in alive if o is not m and o.ms_per_image <= m.ms_per_image
                      and o.quality - _finite(o.noise) > m.quality + _finite(m.noise)]
            if better:
                self._prune(m, f"dominated on {m.images} images by {better[0].candidate.label()}")
                continue
            survivors.append(m)
        pinned = [m for m in survivors if m.candidate in self.pinned]
        others = sorted((m for m in survivors if m.candidate not in self.pinned), key=lambda m: m.ms_per_image)
        keep = max(1, math.ceil(len(alive) / ETA))
        for m in others[keep:]:
            self._prune(m, f"not among the fastest {keep} after rung {rung + 1}", status="cut")
        return pinned + others[:keep]


def _engine_pruned(m: Measurement, measured: Sequence[Measurement]) -> bool:
    """Whether `_keep_engines` will surely prune the engine of `m` (the run's own settings on it), judged
    from the engines `measured` so far: it was not measured, or another engine of its precision is
    faster, or one of a more exact precision is at least as fast. Such an engine is not the reference
    either (the fastest engine of the most exact precision)."""
    if not m.scores:
        return True
    rank = EXACTNESS.get(m.candidate.engine.precision, 9)
    for other in measured:
        if other is m or not other.scores:
            continue
        other_rank = EXACTNESS.get(other.candidate.engine.precision, 9)
        if other.candidate.engine.precision == m.candidate.engine.precision and other.ms_per_image < m.ms_per_image:
            return True
        if other_rank < rank and other.ms_per_image <= m.ms_per_image:
            return True
    return False


def _engine_key(engine: Engine) -> tuple[str, str, str]:
    return (engine.backend, engine.precision, engine.device)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _cache_rank(cache: str) -> int:
    from mmgen_deploy.sampling.cache import parse_cache_policy

    policy = parse_cache_policy(cache)
    return 0 if not policy.enabled else getattr(policy, "period", 1)


def _evaluations(settings: Settings) -> float:
    """Denoiser evaluations per image, roughly: what the predicted time of a measurement scales with."""
    guided = 2 if settings.cfg_scale != 1.0 else 1
    return max(1, settings.steps) * guided / max(1, _cache_rank(settings.cache) / 2)


def _runs(run: RunDir, engine: Engine) -> bool:
    from mmgen_deploy.runtime.backends import backend_spec

    onnx_set = backend_spec(engine.backend).onnx_set(engine.precision)
    return onnx_set is None or not run.missing_onnx(onnx_set, ("denoiser",))


def tune(run: RunLike, options: TuneOptions, progress: Progress | None = None) -> TuneResult:
    """Measure configurations of `run` on this machine (see the module's docstring) and return every
    measurement, the reference, the default configuration and the rungs."""
    search = _Search(RunDir.of(run), options, progress)
    try:
        return search.run_search()
    finally:
        search.runners.close()
