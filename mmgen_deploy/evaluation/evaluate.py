"""`mmgen eval`: everything measured about one run directory, as one JSON-able report.

Class models on `shapes`: how often images show their class's colour and shape; on `tones`: how
often clips sound like their class's waveform and pitch contour (`evaluation.tone_judge`). Text-to-image
models on `shapes`: prompts drawn from the held-out attribute combinations (never seen in
training), and how often each attribute (colour, shape, size, position) is right, separately
and all four together. Both are judged from pixels by `evaluation.checker`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.data import DataSpec, load_split
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import RunDirError
from mmgen_deploy.evaluation.checker import judge
from mmgen_deploy.evaluation.metrics import first_stage_metrics
from mmgen_deploy.numerics import save_grid
from mmgen_deploy.rundir import RunDir


@dataclass(frozen=True)
class EvalSettings:
    samples_per_class: int = 10
    # None: the run's own (`sampling.loop.run_sampling_defaults`: a distilled student's, or the defaults).
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    seed: int = 0
    batch_size: int = 90
    backend: str = "torch"
    precision: str = "fp32"
    generate: bool = True
    num_prompts: int = 200  # text-to-image models: prompts from the held-out combinations
    threads: int | None = None  # CPU threads of the sampling backend (None: its default)
    cache: str = SAMPLING.cache  # step-caching policy (sampling.cache)

    def __post_init__(self) -> None:
        # Checked before any work: a misspelt backend would otherwise fail only after the
        # first-stage metrics have run.
        from mmgen_deploy.runtime.select import check_backend_name

        check_backend_name(self.backend, self.precision)
        from mmgen_deploy.sampling.cache import parse_cache_policy

        parse_cache_policy(self.cache)


def class_attribute_accuracy(samples: Iterable[Any], class_ids: list[int], class_names: Sequence[str],
                             class_parts: Callable[[int], tuple[str, str]], judge_one: Callable[[Any], Any],
                             attributes: tuple[str, str]) -> dict[str, Any]:
    """How often samples show both attributes of their class (a class is a pair such as colour x shape), by
    a judge whose verdict names both and `matches` them; per attribute and per class too."""
    per_class: dict[str, list[int]] = {name: [0, 0] for name in class_names}
    hits = [0, 0]
    both = 0
    for sample, class_index in zip(samples, class_ids, strict=True):
        wanted = class_parts(class_index)
        verdict = judge_one(sample)
        for k, attribute in enumerate(attributes):
            hits[k] += getattr(verdict, attribute) == wanted[k]
        hit = verdict.matches(*wanted)
        both += hit
        per_class[class_names[class_index]][0] += hit
        per_class[class_names[class_index]][1] += 1
    n = max(len(class_ids), 1)
    return {"accuracy": both / n, **{f"{a}_accuracy": h / n for a, h in zip(attributes, hits, strict=True)},
            "num_samples": len(class_ids),
            "per_class": {name: hit / total for name, (hit, total) in per_class.items() if total}}


def conditional_accuracy(images: np.ndarray, class_ids: list[int]) -> dict[str, Any]:
    """How often `shapes` images show the colour AND shape of their class, judged from pixels."""
    from mmgen_deploy.data.shapes import CLASS_NAMES, class_parts

    return class_attribute_accuracy(images, class_ids, CLASS_NAMES, class_parts, judge, ("colour", "shape"))


ATTRIBUTES = ("colour", "shape", "size", "position")


def prompt_accuracy(images: np.ndarray, specs: list[Any]) -> dict[str, Any]:
    """Per-attribute accuracy of `shapes` images generated for the prompts of `specs` (ShapeSpecs)."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    all_four = 0
    per_prompt: dict[str, list[int]] = {}
    for image, spec in zip(images, specs, strict=True):
        verdict = judge(image)
        right = [getattr(verdict, name) == getattr(spec, name) for name in ATTRIBUTES]
        for name, ok in zip(ATTRIBUTES, right, strict=True):
            hits[name] += ok
        all_four += all(right)
        counts = per_prompt.setdefault(spec.caption, [0, 0])
        counts[0] += all(right)
        counts[1] += 1
    n = max(len(specs), 1)
    return {**{f"{name}_accuracy": hits[name] / n for name in ATTRIBUTES}, "accuracy": all_four / n,
            "num_samples": len(specs),
            "per_prompt": {caption: right / total for caption, (right, total) in sorted(per_prompt.items())}}


def _sample(run: RunDir, config: Any, settings: EvalSettings, progress: Any, *, class_ids: list[int] | None = None,
            prompts: list[str] | None = None) -> tuple[Any, float, dict[str, Any]]:
    """The sampling result to judge (one image, and for an audio model one clip, per class id or
    prompt) on the settings' backend, the seconds taken, and what ran them (`auto` resolved: backend,
    precision, device; the cache policy, the block evaluations it kept and the denoising loops' seconds)."""
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import make_conditioning, sample

    tokenizer = run.load_tokenizer() if config.uses_text else None
    runner, choice = open_runner(run, backend=settings.backend, precision=settings.precision,
                                 threads=settings.threads)
    ran_on: dict[str, Any] = {"backend": choice.backend, "precision": choice.precision, "device": choice.device,
                              "backend_reason": choice.reason}
    try:
        started = time.perf_counter()
        condition = make_conditioning(runner, config, class_ids=class_ids or [], prompts=prompts or [],
                                      tokenizer=tokenizer)
        assert settings.steps is not None and settings.sampler is not None and settings.cfg_scale is not None
        result = sample(runner, config, condition, steps=settings.steps, sampler=settings.sampler,
                        cfg_scale=settings.cfg_scale, seed=settings.seed, batch_size=settings.batch_size,
                        progress=progress, cache=settings.cache)
        seconds = time.perf_counter() - started
        ran_on.update(cache=result.cache.to_dict(), denoise_seconds=round(result.denoise_seconds, 2))
    finally:
        runner.close()
    return result, seconds, ran_on


def _evaluate_prompts(run: RunDir, spec: DataSpec, config: Any, settings: EvalSettings,
                      progress: Any) -> dict[str, Any]:
    from mmgen_deploy.data.shapes import heldout_prompt_specs, holdout_combinations
    heldout = holdout_combinations(spec.holdout_fraction, spec.seed)
    specs = heldout_prompt_specs(settings.num_prompts, fraction=spec.holdout_fraction, seed=spec.seed)
    result, seconds, ran_on = _sample(run, config, settings, progress, prompts=[s.caption for s in specs])
    images = np.asarray(result.images)
    grid = save_grid(images, run.samples_dir / "eval_grid.png", columns=10)
    return {
        **prompt_accuracy(images, specs),
        "prompts_from": "held-out combinations" if heldout else "all combinations (this run holds none out)",
        "num_heldout_combinations": len(heldout), "num_distinct_prompts": len({s.caption for s in specs}),
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
        "seed": settings.seed, **ran_on, "sampling_seconds": round(seconds, 1), "grid": str(grid)}


def _evaluate_tones(run: RunDir, spec: DataSpec, config: Any, settings: EvalSettings,
                    progress: Any) -> dict[str, Any]:
    """A `tones` class model: `samples_per_class` clips of each class through the whole pipeline
    (vocoder included), judged from the waveform; beside them, the judge on the real validation clips
    (how far its verdicts can be trusted)."""
    from mmgen_deploy.data import load_audio_split
    from mmgen_deploy.evaluation.tone_judge import tone_accuracy

    assert config.audio is not None
    real = load_audio_split(spec, "val")
    judge_on_real = tone_accuracy(real.clips, [int(k) for k in real.labels], real.sample_rate)
    class_ids = [k for k in range(config.dit.num_classes) for _ in range(settings.samples_per_class)]
    result, seconds, ran_on = _sample(run, config, settings, progress, class_ids=class_ids)
    if result.audio is None:
        raise RunDirError(f"{run.root} made no sound: its ONNX set has no vocoder", "export it again: `mmgen export`")
    grid = save_grid(np.asarray(result.images), run.samples_dir / "eval_grid.png", columns=settings.samples_per_class)
    return {**tone_accuracy(result.audio, class_ids, config.audio.sample_rate),
            "judge_on_real_clips": {k: v for k, v in judge_on_real.items() if k != "per_class"},
            "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
            "seed": settings.seed, **ran_on, "sampling_seconds": round(seconds, 1), "grid": str(grid)}


def settings_for_run(settings: EvalSettings, config: Any) -> EvalSettings:
    """`settings` with the sampling settings left out filled in from the run (a distilled student's own
    steps, sampler and guidance scale; otherwise `defaults.SAMPLING`)."""
    from mmgen_deploy.sampling.loop import run_sampling_defaults

    own = run_sampling_defaults(config)
    return dataclasses.replace(
        settings, steps=int(own["steps"]) if settings.steps is None else settings.steps,
        sampler=str(own["sampler"]) if settings.sampler is None else settings.sampler,
        cfg_scale=float(own["cfg_scale"]) if settings.cfg_scale is None else settings.cfg_scale)


def eval_report_path(run: RunDir, settings: EvalSettings) -> Path:
    """RUN_DIR/reports/eval-<backend>-<precision>[-<settings that differ from the defaults>].json, or
    eval-no-generate.json for the first-stage metrics alone: a small evaluation never replaces the
    result of a larger one. Only the settings that apply to the run count (samples per class for a
    class model, the number of prompts for a text-to-image one)."""
    from mmgen_deploy.sampling.cache import parse_cache_policy

    if not settings.generate:
        return run.report_path("eval", "no-generate")
    config = run.load_config()
    settings, defaults = settings_for_run(settings, config), settings_for_run(EvalSettings(), config)
    per_model = "num_prompts" if config.uses_text else "samples_per_class"
    words = {per_model: "prompts" if per_model == "num_prompts" else "samples", "steps": "steps",
             "sampler": "sampler", "cfg_scale": "cfg", "seed": "seed"}
    changed = {word: getattr(settings, key) for key, word in words.items()
               if getattr(settings, key) != getattr(defaults, key)}
    policy = parse_cache_policy(settings.cache).spec
    if policy != parse_cache_policy(defaults.cache).spec:  # a policy such as fora:3 reads -cache-fora3
        changed["cache"] = "cache-" + policy.replace(":", "")
    return run.report_path("eval", settings.backend, settings.precision, **changed)


def evaluate_run(run: RunDir, settings: EvalSettings, progress: Any = None) -> dict[str, Any]:
    """Reconstruction metrics on the run's validation split and, for `shapes`, conditional accuracy;
    the report is also written to `eval_report_path(run, settings)`."""
    from mmgen_deploy.io_utils import write_json

    report = _evaluate(run, settings, progress)
    write_json(eval_report_path(run, settings), report)
    return report


def _evaluate(run: RunDir, settings: EvalSettings, progress: Any) -> dict[str, Any]:
    meta = run.read_meta()
    if not meta.get("data"):
        raise RunDirError(f"{run.run_json} does not describe its training data",
                          "evaluate a run made by `mmgen train` or `mmgen quickstart`")
    spec = DataSpec.from_dict(meta["data"])
    config = run.load_config()
    from mmgen_deploy.models.load import load_first_stage
    settings = settings_for_run(settings, config)
    from mmgen_deploy.rundir import first_stage_part

    first_stage = load_first_stage(run, config)
    val = load_split(spec, "val", audio=config.audio)
    report: dict[str, Any] = {"run_dir": str(run.root), "data": spec.to_dict(),
                              first_stage_part(config): first_stage_metrics(first_stage, val.images)}
    if not settings.generate:
        return report
    if spec.name not in ("shapes", "tones"):
        report["generation"] = {"skipped": "conditional accuracy needs the built-in `shapes` or `tones` data"}
        return report
    if not run.has_part("dit"):
        raise RunDirError(f"{run.root} has no trained DiT",
                          f"run `mmgen train dit` first, or evaluate the first stage alone: `mmgen eval {run.root} "
                          "--no-generate`")
    if spec.name == "tones":
        report["generation"] = _evaluate_tones(run, spec, config, settings, progress)
        return report
    if config.uses_text:
        report["generation"] = _evaluate_prompts(run, spec, config, settings, progress)
        return report
    class_ids = [k for k in range(config.dit.num_classes) for _ in range(settings.samples_per_class)]
    result, seconds, ran_on = _sample(run, config, settings, progress, class_ids=class_ids)
    images = np.asarray(result.images)
    grid = save_grid(images, run.samples_dir / "eval_grid.png", columns=settings.samples_per_class)
    report["generation"] = {
        **conditional_accuracy(images, class_ids), "sampler": settings.sampler, "steps": settings.steps,
        "cfg_scale": settings.cfg_scale, "seed": settings.seed, **ran_on, "sampling_seconds": round(seconds, 1),
        "grid": str(grid)}
    return report
