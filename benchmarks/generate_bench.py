"""End-to-end generation time: PyTorch eager vs ONNX Runtime CPU, same model, same settings, one run.

    python benchmarks/generate_bench.py [RUN_DIR] [--steps 50] [--batch-size 16] [--threads 2] [--json out.json]

Without RUN_DIR it builds a re-randomised tiny model in a temporary folder and exports
its FP32 ONNX set (the speed of a network does not depend on whether it is trained).
Each backend first runs one warm-up batch, then `--repeats` timed runs of the same
batch; the median is reported. Printed per backend: wall seconds, images/s, process
CPU seconds, both ratios to torch, and the share of the denoising loop's wall time spent
outside the denoiser calls. On a shared machine prefer `--threads 1` and the CPU figures.
It prints figures and asserts nothing: timings on a shared machine vary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _prepare_run(workdir: Path) -> Path:
    import torch

    from mmgen_deploy.config import preset
    from mmgen_deploy.export import export_run
    from mmgen_deploy.models import DiT, VQModel, rerandomize_
    from mmgen_deploy.rundir import save_run

    config = preset("tiny")
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(workdir / "run", config, vq.eval(), dit.eval())
    export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder"))
    return run.root


def bench(run_dir: Path, *, steps: int, batch_size: int, sampler: str, cfg_scale: float, threads: int,
          repeats: int, precisions: list[str]) -> dict[str, Any]:
    import torch

    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample

    torch.set_num_threads(threads)
    config = RunDir(run_dir).load_config()
    classes = [i % config.dit.num_classes for i in range(batch_size)]
    settings: dict[str, Any] = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=0,
                                    batch_size=batch_size)
    rows: dict[str, Any] = {}
    backends = [("torch", "fp32")] + [("onnxruntime", p) for p in precisions]
    for backend, precision in backends:
        runner, _choice = open_runner(run_dir, backend, precision, device="cpu", threads=threads)
        sample(runner, config, classes[: min(2, batch_size)], **{**settings, "steps": 2})  # warm-up, sessions
        results, cpu_seconds = [], []
        for _ in range(repeats):
            cpu_start = time.process_time()
            results.append(sample(runner, config, classes, **settings))
            cpu_seconds.append(time.process_time() - cpu_start)
        runner.close()
        best = sorted(results, key=lambda r: r.total_seconds)[len(results) // 2]  # the median run
        rows[f"{backend}-{precision}"] = {
            "backend": backend, "precision": precision,
            "total_seconds": statistics.median(r.total_seconds for r in results),
            "all_runs_seconds": [round(r.total_seconds, 4) for r in results],
            # CPU seconds of the whole process: on a shared machine the wall clock mostly measures
            # the neighbours; CPU time does not (with --threads 1 it is the cleanest figure).
            "cpu_seconds": statistics.median(cpu_seconds),
            "images_per_second": batch_size / statistics.median(r.total_seconds for r in results),
            "denoise_seconds": best.denoise_seconds, "denoiser_call_seconds": best.denoise_model_seconds,
            "loop_overhead_fraction": best.loop_overhead_fraction,
            "decode_seconds": best.model_seconds - best.denoise_model_seconds,
        }
    torch_s, torch_cpu = rows["torch-fp32"]["total_seconds"], rows["torch-fp32"]["cpu_seconds"]
    for row in rows.values():
        row["speedup_vs_torch"] = torch_s / row["total_seconds"]
        row["cpu_speedup_vs_torch"] = torch_cpu / row["cpu_seconds"]
    return {"settings": {**settings, "threads": threads, "repeats": repeats, "run_dir": str(run_dir),
                         "denoiser_batch": batch_size * (2 if cfg_scale != 1.0 else 1)},
            "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path, help="run directory with an fp32 ONNX export")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="also time the fp16 ONNX set (must be exported)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mmgen-bench-") as tmp:
        run_dir = args.run_dir or _prepare_run(Path(tmp))
        report = bench(run_dir, steps=args.steps, batch_size=args.batch_size, sampler=args.sampler,
                       cfg_scale=args.cfg_scale, threads=args.threads, repeats=args.repeats,
                       precisions=["fp32", "fp16"] if args.fp16 else ["fp32"])
    s = report["settings"]
    print(f"{s['batch_size']} images, {s['steps']} {s['sampler']} steps, cfg {s['cfg_scale']} "
          f"(denoiser batch {s['denoiser_batch']}), {s['threads']} threads, median of {s['repeats']}")
    print(f"{'backend':<18}{'wall s':>9}{'images/s':>10}{'vs torch':>10}{'CPU s':>9}{'CPU vs torch':>14}"
          f"{'loop outside model':>20}")
    for name, row in report["results"].items():
        print(f"{name:<18}{row['total_seconds']:>9.3f}{row['images_per_second']:>10.2f}"
              f"{row['speedup_vs_torch']:>9.2f}x{row['cpu_seconds']:>9.3f}{row['cpu_speedup_vs_torch']:>13.2f}x"
              f"{100 * row['loop_overhead_fraction']:>19.2f}%")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
