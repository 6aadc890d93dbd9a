"""Distilled students against their teacher: accuracy vs denoiser sample-evaluations, and speed.

    python benchmarks/distill_front.py TEACHER_RUN --student 4=runs/student4 --student 2=runs/student2 \
        [--teacher-steps 10,20,50] [--samples-per-class 10] [--backend onnxruntime] [--speed-images 36]

For every student (made by `mmgen distill`) and the teacher at each of --teacher-steps, `mmgen eval`'s
sampling and pixel checker on the same seeds (10 images per class = 180 by default); then, side by side
in this process, `generate` of the teacher and of each student with their own defaults (teacher: 50 DDIM
steps, guidance 4 as a doubled batch; student: its K steps, guidance as an input) on the same images,
timing the sampling in-process. Runs without their exported FP32 set are exported first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmgen_deploy.evaluation.evaluate import EvalSettings, evaluate_run
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.sampling.generate import GenerateRequest, generate_to_folder


def _ensure_exported(run: RunDir) -> None:
    from mmgen_deploy.export import export_run

    if not run.onnx_manifest_path.is_file():
        export_run(run, precisions=("fp32",))


def _accuracy(run: RunDir, steps: int | None, per_class: int, backend: str) -> tuple[float, int, float]:
    """(colour AND shape accuracy, sample-evaluations per image, sampling seconds)."""
    report = evaluate_run(run, EvalSettings(samples_per_class=per_class, steps=steps, backend=backend))
    generation = report["generation"]
    config = run.load_config()
    per_image = generation["steps"] * (1 if config.dit.guidance_embed or generation["cfg_scale"] == 1 else 2)
    return float(generation["accuracy"]), per_image, float(generation["sampling_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--student", action="append", default=[], metavar="K=DIR")
    parser.add_argument("--teacher-steps", default="10,20,50")
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--speed-images", type=int, default=36, help="images per generate in the speed test")
    parser.add_argument("--out", type=Path, default=Path("/tmp/distill_front"))
    args = parser.parse_args()

    teacher = RunDir(args.teacher)
    students = [(int(k), RunDir(d)) for k, d in (s.split("=", 1) for s in args.student)]
    for run in (teacher, *(s for _, s in students)):
        if args.backend != "torch":
            _ensure_exported(run)

    print("| model | steps | sample-evaluations / image | colour AND shape | sampling s |")
    print("|---|---|---|---|---|")
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        acc, evals, seconds = _accuracy(teacher, steps, args.samples_per_class, args.backend)
        print(f"| teacher | {steps} | {evals} | {100 * acc:.1f} % | {seconds:.1f} |", flush=True)
    for k, student in students:
        acc, evals, seconds = _accuracy(student, None, args.samples_per_class, args.backend)
        print(f"| student K={k} | {k} | {evals} | {100 * acc:.1f} % | {seconds:.1f} |", flush=True)

    config = teacher.load_config()
    per_class = max(1, args.speed_images // config.dit.num_classes)
    print(f"\nspeed: generate with each run's defaults, {per_class * config.dit.num_classes} images, "
          f"{args.backend} fp32, in-process")
    print("| model | sampling s | denoising loop s | ratio to teacher |")
    print("|---|---|---|---|")
    rows = [("teacher", teacher), *((f"student K={k}", s) for k, s in students)]
    times: dict[str, tuple[float, float]] = {}
    for name, run in rows:
        request = GenerateRequest(n=per_class, backend=args.backend, precision="fp32",
                                  out=args.out / name.replace(" ", "_").replace("=", ""))
        result = generate_to_folder(run, request).result
        times[name] = (result.total_seconds, result.denoise_seconds)
    base = times["teacher"][0]
    for name, (total, loop) in times.items():
        print(f"| {name} | {total:.2f} | {loop:.2f} | {base / total:.1f}x |")


if __name__ == "__main__":
    main()
