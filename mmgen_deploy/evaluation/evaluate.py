"""`mmgen eval`: everything measured about one run directory, as one JSON-able report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmgen_deploy.data import DataSpec, load_split
from mmgen_deploy.errors import NotAvailableError, RunDirError
from mmgen_deploy.evaluation.checker import judge
from mmgen_deploy.evaluation.metrics import vq_metrics
from mmgen_deploy.rundir import RunDir


@dataclass(frozen=True)
class EvalSettings:
    samples_per_class: int = 10
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 4.0
    seed: int = 0
    batch_size: int = 90
    backend: str = "torch"
    precision: str = "fp32"
    generate: bool = True


def conditional_accuracy(images: np.ndarray, class_ids: list[int]) -> dict[str, Any]:
    """How often `shapes` images show the colour AND shape of their class, judged from pixels."""
    from mmgen_deploy.data.shapes import CLASS_NAMES, class_parts

    per_class: dict[str, list[int]] = {name: [0, 0] for name in CLASS_NAMES}
    colour_hits = shape_hits = both = 0
    for image, class_index in zip(images, class_ids, strict=True):
        colour, shape = class_parts(class_index)
        verdict = judge(image)
        colour_hits += verdict.colour == colour
        shape_hits += verdict.shape == shape
        hit = verdict.matches(colour, shape)
        both += hit
        per_class[CLASS_NAMES[class_index]][0] += hit
        per_class[CLASS_NAMES[class_index]][1] += 1
    n = max(len(class_ids), 1)
    return {"accuracy": both / n, "colour_accuracy": colour_hits / n, "shape_accuracy": shape_hits / n,
            "num_samples": len(class_ids),
            "per_class": {name: hits / total for name, (hits, total) in per_class.items() if total}}


def evaluate_run(run: RunDir, settings: EvalSettings, progress: Any = None) -> dict[str, Any]:
    """Reconstruction metrics on the run's validation split and, for `shapes`, conditional accuracy."""
    meta = run.read_meta()
    if not meta.get("data"):
        raise RunDirError(f"{run.run_json} does not describe its training data",
                          "evaluate a run made by `mmgen train` or `mmgen quickstart`")
    spec = DataSpec.from_dict(meta["data"])
    config = run.load_config()
    vq = run.load_vqvae(config)
    val = load_split(spec, "val")
    report: dict[str, Any] = {"run_dir": str(run.root), "data": spec.to_dict(), "vqvae": vq_metrics(vq, val.images)}
    if not settings.generate:
        return report
    if spec.name != "shapes":
        report["generation"] = {"skipped": "conditional accuracy needs the built-in `shapes` data"}
        return report
    if not run.has_part("dit"):
        raise RunDirError(f"{run.root} has no trained DiT", "run `mmgen train dit` first, or pass --no-generate")
    try:
        from mmgen_deploy.runtime import open_runner
        from mmgen_deploy.sampling import sample
    except ImportError:
        raise NotAvailableError("sampling is not available in this version, so generated images cannot be judged",
                                "pass --no-generate to measure the VQ-VAE only") from None
    class_ids = [k for k in range(config.dit.num_classes) for _ in range(settings.samples_per_class)]
    runner = open_runner(run.root, backend=settings.backend, precision=settings.precision)
    started = time.perf_counter()
    result = sample(runner, config, class_ids, steps=settings.steps, sampler=settings.sampler,
                    cfg_scale=settings.cfg_scale, seed=settings.seed, batch_size=settings.batch_size,
                    progress=progress)
    seconds = time.perf_counter() - started
    images = np.asarray(result.images)
    from mmgen_deploy.training.common import save_grid

    grid = save_grid(images, run.samples_dir / "eval_grid.png", columns=settings.samples_per_class)
    report["generation"] = {
        **conditional_accuracy(images, class_ids), "sampler": settings.sampler, "steps": settings.steps,
        "cfg_scale": settings.cfg_scale, "seed": settings.seed, "backend": settings.backend,
        "precision": settings.precision, "sampling_seconds": round(seconds, 1), "grid": str(grid)}
    return report
