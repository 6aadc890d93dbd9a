"""Check a `mmgen tune` recipe on fresh seeds: the default `mmgen generate` configuration and the recipe,
side by side in one process, on images the search never saw.

    python benchmarks/tune_check.py RUN [--seed 1000] [--per-class 10] [--threads 1] [--passes 2]
    python benchmarks/tune_check.py RUN --images 4     # a run without a judge: fidelity

Both configurations sample the same classes (every class, --per-class images each, as `mmgen eval` does)
from the same noise (seed --seed, which the search did not use: it used images 0..N-1 of its own seed).
After one untimed pass each (a backend that compiles per input shape does it there), the passes alternate
default, recipe, recipe, default, ... so that a change in the machine's load falls on
both; ms per image is the mean over the passes (sampling, noise to uint8 images). Accuracy is the shapes
judge's colour AND shape (deterministic: the same on every pass). A run without a judge (not trained on
`shapes`) is measured as `tune` measures it: SSIM x 100 and PSNR of each configuration's images against the
reference configuration's (PyTorch FP32, the run's own settings, no cache) on the same fresh seeds, --images
of them (image i of class i mod the class count). Prints a table and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="images of a run without a judge")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.defaults import SAMPLING
    from mmgen_deploy.evaluation.evaluate import conditional_accuracy
    from mmgen_deploy.numerics import psnr, ssim
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime.select import open_choice, resolve_backend
    from mmgen_deploy.sampling import make_conditioning, sample
    from mmgen_deploy.sampling.loop import run_sampling_defaults
    from mmgen_deploy.tuning.quality import has_judge, reference_images
    from mmgen_deploy.tuning.recipe import load_recipe

    run = RunDir(args.run)
    recipe = load_recipe(run)
    config = run.load_config()
    own = run_sampling_defaults(config)
    choice = resolve_backend("auto", run)
    judged = has_judge(run)
    if judged:
        class_ids = [k for k in range(config.dit.num_classes) for _ in range(args.per_class)]
    else:
        class_ids = [i % config.dit.num_classes for i in range(args.images)]
        reference = reference_images(run, args.seed, args.images)
    engine, settings = recipe.candidate.engine, recipe.candidate.settings
    recipe_choice = resolve_backend(engine.backend, recipe.model_dir, engine.precision, device=engine.device)
    configs: dict[str, dict[str, Any]] = {
        "default": {"run": run, "choice": choice, "steps": int(own["steps"]), "sampler": str(own["sampler"]),
                    "cfg_scale": float(own["cfg_scale"]), "cache": SAMPLING.cache,
                    "batch_size": SAMPLING.batch_size, "threads": args.threads},
        "recipe": {"run": RunDir(recipe.model_dir), "choice": recipe_choice, "steps": settings.steps,
                   "sampler": settings.sampler, "cfg_scale": settings.cfg_scale, "cache": settings.cache,
                   "batch_size": engine.batch_size, "threads": args.threads},
    }
    runners = {name: open_choice(c["choice"], c["run"], threads=c["threads"]) for name, c in configs.items()}
    results: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in configs}
    try:
        for name, c in configs.items():  # warm-up: an untimed pass each (every call shape)
            condition = make_conditioning(runners[name], c["run"].load_config(), class_ids=class_ids)
            sample(runners[name], c["run"].load_config(), condition, steps=c["steps"], sampler=c["sampler"],
                   cfg_scale=c["cfg_scale"], seed=args.seed, batch_size=c["batch_size"], cache=c["cache"])
        order = ["default", "recipe"]
        for p in range(args.passes):
            for name in order if p % 2 == 0 else order[::-1]:
                c = configs[name]
                model_config = c["run"].load_config()
                condition = make_conditioning(runners[name], model_config, class_ids=class_ids)
                started = time.perf_counter()
                result = sample(runners[name], model_config, condition, steps=c["steps"], sampler=c["sampler"],
                                cfg_scale=c["cfg_scale"], seed=args.seed, batch_size=c["batch_size"],
                                cache=c["cache"])
                results[name]["seconds"].append(time.perf_counter() - started)
                if "accuracy" not in results[name]:
                    images = np.asarray(result.images)
                    if judged:
                        results[name].update(conditional_accuracy(images, class_ids))
                        results[name].pop("per_class", None)
                    else:
                        results[name]["accuracy"] = float(np.mean([ssim(r[None], i[None]) for r, i in
                                                                   zip(reference, images, strict=True)]))
                        results[name]["psnr_db"] = float(np.mean([min(100.0, psnr(r, i)) for r, i in
                                                                  zip(reference, images, strict=True)]))
    finally:
        for runner in runners.values():
            runner.close()

    n = len(class_ids)
    rows = []
    for name, c in configs.items():
        ms = [1000 * s / n for s in results[name]["seconds"]]
        results[name]["ms_per_image"] = float(np.mean(ms))
        results[name]["ms_per_image_passes"] = [round(v, 2) for v in ms]
        label = (f"{'student ' if recipe.candidate.model == 'student' and name == 'recipe' else ''}"
                 f"{c['choice'].backend} {c['choice'].precision} b{c['batch_size']} {c['sampler']} {c['steps']} "
                 f"steps cfg {c['cfg_scale']:g} cache {c['cache']}")
        results[name]["configuration"] = label
        rows.append((name, label, 100 * results[name]["accuracy"], results[name]["ms_per_image"], ms))
    ratio = results["default"]["ms_per_image"] / results["recipe"]["ms_per_image"]
    drop = 100 * (results["default"]["accuracy"] - results["recipe"]["accuracy"])
    print(f"machine: {cpu_features().model}, {platform.machine()}; threads {args.threads}; {n} images, "
          f"seed {args.seed}, {args.passes} passes")
    measure = "colour AND shape" if judged else "SSIM x 100 to the reference (PSNR)"
    print(f"| configuration | {measure} | ms / image (mean; passes) |")
    print("|---|---|---|")
    for name, label, accuracy, ms_mean, ms in rows:
        quality = f"{accuracy:.1f} %" if judged else f"{accuracy:.2f} ({results[name]['psnr_db']:.1f} dB)"
        print(f"| {name}: {label} | {quality} | {ms_mean:.2f} ({', '.join(f'{v:.2f}' for v in ms)}) |")
    print(f"recipe: {ratio:.2f}x faster per image, {drop:+.1f} points lost (default minus recipe)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"results": results, "speed_ratio": ratio, "points_lost": drop, "seed": args.seed,
                       "threads": args.threads, "images": n}, file, indent=2)


if __name__ == "__main__":
    main()
