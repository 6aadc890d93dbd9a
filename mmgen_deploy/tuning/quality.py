"""How `tune` scores a configuration's images, in points (higher is better).

- **judge**: runs trained on the built-in `shapes` data have a judge that reads pixels
  (`evaluation.checker`): a class run scores 100 for an image that shows its class's colour and shape,
  a text run 100 for an image that shows all four attributes of its prompt, else 0. The quality of a
  configuration is its accuracy in percent.
- **fidelity**: every other run (imported models, other data) is compared with its reference
  configuration, PyTorch FP32 at the run's own steps, sampler and guidance, no cache, on the same seeds
  and therefore the same initial noise. An image scores its SSIM x 100 against the reference image (PSNR
  is reported beside it). The reference images are computed once and kept in the run
  (`RunDir.tune_reference_path`), keyed by everything they depend on.

Image i of a measurement is conditioned on `conditions(n)[i]` and draws its noise from (seed, i), so a
longer measurement extends a shorter one and every configuration sees the same images' noise.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmgen_deploy.errors import UsageError
from mmgen_deploy.rundir import RunDir

JUDGE = "judge"
FIDELITY = "fidelity"


class QualityMeasure(ABC):
    kind: str
    description: str
    # Measurements grow in multiples of this many images (a class judge: one image per class).
    unit: int = 1

    def __init__(self, run: RunDir, seed: int) -> None:
        self.run = run
        self.config = run.load_config()
        self.seed = seed

    @abstractmethod
    def conditions(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        """The class ids (class runs) or prompts (text runs) of images start..stop-1."""

    @abstractmethod
    def score(self, images: np.ndarray, start: int) -> tuple[list[float], dict[str, list[float]]]:
        """Per-image scores in points for images start..start+len-1, and any per-image side figures."""

    def noise(self, scores: Sequence[float]) -> float:
        """The standard error of the mean score, in points."""
        n = len(scores)
        if n < 2:
            return float("inf")
        return float(np.std(np.asarray(scores, dtype=np.float64), ddof=1) / math.sqrt(n))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "unit": "points", "seed": self.seed}


def _classes(config: Any, start: int, stop: int) -> list[int]:
    return [i % config.dit.num_classes for i in range(start, stop)]


class _Judge(QualityMeasure):
    kind = JUDGE

    def noise(self, scores: Sequence[float]) -> float:
        """The binomial standard error, with the accuracy estimated as (hits + 1) / (n + 2) so that a run of
        all hits (or all misses) on few images is not taken as certain."""
        n = len(scores)
        if n == 0:
            return float("inf")
        p = (sum(score > 0 for score in scores) + 1) / (n + 2)
        return 100.0 * math.sqrt(p * (1 - p) / n)


class ClassJudge(_Judge):
    description = "colour AND shape accuracy of the shapes judge, in percent"

    def __init__(self, run: RunDir, seed: int) -> None:
        super().__init__(run, seed)
        self.unit = self.config.dit.num_classes

    def conditions(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        return _classes(self.config, start, stop), []

    def score(self, images: np.ndarray, start: int) -> tuple[list[float], dict[str, list[float]]]:
        from mmgen_deploy.data.shapes import class_parts
        from mmgen_deploy.evaluation.checker import judge

        classes = _classes(self.config, start, start + len(images))
        return [100.0 * judge(image).matches(*class_parts(k)) for image, k in zip(images, classes, strict=True)], {}


class PromptJudge(_Judge):
    description = "all-four-attributes accuracy of the shapes judge on held-out prompts, in percent"

    def __init__(self, run: RunDir, seed: int, count: int) -> None:
        from mmgen_deploy.data import DataSpec
        from mmgen_deploy.data.shapes import heldout_prompt_specs

        super().__init__(run, seed)
        spec = DataSpec.from_dict(run.read_meta()["data"])
        self.specs = heldout_prompt_specs(count, fraction=spec.holdout_fraction, seed=spec.seed)

    def conditions(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        return [], [s.caption for s in self.specs[start:stop]]

    def score(self, images: np.ndarray, start: int) -> tuple[list[float], dict[str, list[float]]]:
        from mmgen_deploy.evaluation.checker import judge

        specs = self.specs[start:start + len(images)]
        return [100.0 * judge(image).matches_all(s.colour, s.shape, s.size, s.position)
                for image, s in zip(images, specs, strict=True)], {}


# Identical images have an infinite PSNR; JSON has no infinity, so per-image PSNRs are capped here.
PSNR_CAP_DB = 100.0


class Fidelity(QualityMeasure):
    kind = FIDELITY
    description = "SSIM x 100 against the reference configuration's images (PyTorch FP32, the run's own steps, " \
                  "no cache, same seeds and noise)"

    def __init__(self, run: RunDir, seed: int, count: int,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__(run, seed)
        if self.config.uses_text:
            raise UsageError(f"{run.root} is a text-to-image run without a judge",
                             "tune measures fidelity for class-conditioned runs only")
        self.count = count
        self.reference = self._reference_images(progress)

    def conditions(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        return _classes(self.config, start, stop), []

    def reference_key(self) -> str:
        from mmgen_deploy.tuning.space import run_default_settings

        settings = run_default_settings(self.config)
        what = {"weights": self.run.weights_sha256(), "seed": self.seed, "count": self.count,
                "settings": [settings.sampler, settings.steps, settings.cfg_scale], "classes": "i mod num_classes"}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _reference_images(self, progress: Callable[[str], None] | None) -> np.ndarray:
        from mmgen_deploy.io_utils import atomic_path

        path = self.run.tune_reference_path(self.reference_key())
        if path.is_file():
            with np.load(path) as stored:
                images = stored["images"]
            if len(images) == self.count:
                return np.asarray(images)
        if progress is not None:
            progress(f"reference images: PyTorch FP32, {self.count} images (computed once, kept in {path})")
        images = reference_images(self.run, self.seed, self.count)
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            np.savez(file, images=images)
        return images

    def score(self, images: np.ndarray, start: int) -> tuple[list[float], dict[str, list[float]]]:
        from mmgen_deploy.numerics import psnr, ssim

        reference = self.reference[start:start + len(images)]
        scores = [100.0 * ssim(ref[None], img[None]) for ref, img in zip(reference, images, strict=True)]
        psnrs = [min(PSNR_CAP_DB, psnr(ref, img)) for ref, img in zip(reference, images, strict=True)]
        return scores, {"psnr_db": psnrs}


def reference_images(run: RunDir, seed: int, count: int) -> np.ndarray:
    """The reference configuration's images: PyTorch FP32 on the CPU, the run's own settings, no cache."""
    from mmgen_deploy.defaults import SAMPLING
    from mmgen_deploy.runtime.select import runner_class
    from mmgen_deploy.sampling import make_conditioning, sample
    from mmgen_deploy.tuning.space import run_default_settings

    config = run.load_config()
    settings = run_default_settings(config)
    runner = runner_class("torch").from_run_dir(run, "fp32", "cpu")
    try:
        condition = make_conditioning(runner, config, class_ids=_classes(config, 0, count))
        result = sample(runner, config, condition, steps=settings.steps, sampler=settings.sampler,
                        cfg_scale=settings.cfg_scale, seed=seed, batch_size=SAMPLING.batch_size)
    finally:
        runner.close()
    return np.asarray(result.images)


def has_judge(run: RunDir) -> bool:
    """Whether the run was trained on the built-in `shapes` data (whose images the judge reads)."""
    data = run.read_meta().get("data")
    return isinstance(data, dict) and data.get("name") == "shapes" and run.has_part("dit")


def choose_measure(run: RunDir, seed: int, count: int, *,
                   progress: Callable[[str], None] | None = None) -> QualityMeasure:
    """The judge for `shapes` runs (classes or prompts), fidelity to the reference for every other run."""
    if has_judge(run):
        config = run.load_config()
        return PromptJudge(run, seed, count) if config.uses_text else ClassJudge(run, seed)
    return Fidelity(run, seed, count, progress)
