"""A real-size diffusers DiTPipeline on a KL-f8 autoencoder through every stage, timed, with peak memory.

    flock /tmp/mmgen-heavy.lock python benchmarks/kl_pipeline.py XL/2 WORK_DIR [--image-size 256] [--json FILE]

writes `WORK_DIR/pipe/` (a `DiTPipeline` folder: `vae/` = `AutoencoderKL` with Stable Diffusion's VAE
config (128-256-512-512 channels, 2 res blocks, 4 latent channels, scale 0.18215), `transformer/` =
`DiTTransformer2DModel` of the preset (learned sigma, 1000 classes; `benchmarks.large_models.make_dit`),
`scheduler/` = DiT-XL-2-256's `DDIMScheduler` config, `id2label`), then runs, each as its own `mmgen`
process under `/usr/bin/time -v`: import -> export (FP32 + FP16) -> build-engine (TensorRT-RTX, ahead of
time) -> generate (ONNX Runtime CPU FP32) -> parity (ONNX Runtime FP32 and FP16); the FP32 and FP16
exports are separate stages, so a run cut short still says how far it got. Prints one line per
stage (seconds, peak RSS) and the parity verdicts. Weights are random (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Stable Diffusion's VAE (sd-vae-ft-ema / -mse): what every published DiT checkpoint denoises.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
# facebook/DiT-XL-2-256's scheduler_config.json.
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                     num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0)


def make_pipeline(dit: str, root: Path, image_size: int, seed: int = 0) -> dict[str, int]:
    import gc

    import diffusers
    import torch

    from benchmarks.large_models import NUM_CLASSES, make_dit

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**SD_VAE, sample_size=image_size).eval()
    params = {"vae": sum(p.numel() for p in vae.parameters())}
    vae.save_pretrained(root / "vae")
    del vae
    gc.collect()
    model = make_dit(dit, image_size // 8, 4, seed + 100)
    params["dit"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "transformer")
    del model
    gc.collect()
    diffusers.DDIMScheduler(**DIT_SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "id2label": {str(i): f"class {i}" for i in range(NUM_CLASSES)},
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return params


def run_stage(name: str, argv: list[str], log: Path) -> dict[str, Any]:
    """One `mmgen` command under /usr/bin/time -v: wall seconds, peak RSS, exit code."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "mmgen_deploy", *argv],
                              stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    record = {"stage": name, "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
              "peak_rss_gib": round(int(peak.group(1)) / 2**20, 2) if peak else None, "log": str(log)}
    print(f"{name:<28} rc {record['rc']}  {record['seconds']:>7.1f} s  peak RSS {record['peak_rss_gib']} GiB",
          flush=True)
    if proc.returncode:
        tail = [line for line in text.splitlines() if line.strip() and not line.startswith("\t")][-5:]
        print("   " + "\n   ".join(tail), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dit", help="DiT preset of benchmarks/large_models.py (XL/2, B/2, S/2, ...)")
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of generate and parity (default 4)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip (e.g. build,parity-fp16)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    params = make_pipeline(args.dit, work / "pipe", args.image_size)
    print(f"pipeline {args.dit} on KL-f8 {args.image_size}px: {params} params, {time.perf_counter() - start:.0f} s",
          flush=True)
    run, steps = str(work / "run"), str(args.steps)
    stages = [
        ("import", ["import", str(work / "pipe"), "--out", run, "--overwrite"]),
        ("export-fp32", ["export", run, "--precision", "fp32", "--overwrite",
                         "--json", str(work / "export-fp32.json")]),
        ("export-fp16", ["export", run, "--precision", "fp16", "--json", str(work / "export.json")]),
        ("build", ["build-engine", run, "--runtime", "tensorrt-rtx", "--opt-level", "0"]),
        ("generate", ["generate", run, "--backend", "onnxruntime", "--precision", "fp32", "--class", "207",
                      "--n", "1", "--steps", steps, "--out", str(work / "samples")]),
        ("parity-fp32", ["parity", run, "--backend", "onnxruntime", "--precision", "fp32", "--batch-sizes", "1",
                         "--images", "1", "--steps", steps, "--json", str(work / "parity-fp32.json")]),
        ("parity-fp16", ["parity", run, "--backend", "onnxruntime", "--precision", "fp16", "--batch-sizes", "1",
                         "--images", "1", "--steps", steps, "--json", str(work / "parity-fp16.json")]),
    ]
    records = []
    for name, stage_argv in stages:
        if name in skip:
            continue
        records.append(run_stage(name, stage_argv, work / f"{name}.log"))
        if records[-1]["rc"] and name.startswith(("import", "export")):
            break
    summary: dict[str, Any] = {"dit": args.dit, "image_size": args.image_size, "params": params, "stages": records}
    for precision in ("fp32", "fp16"):
        report = work / f"parity-{precision}.json"
        if report.is_file():
            data = json.loads(report.read_text())
            summary[f"parity_{precision}"] = [{k: c[k] for k in ("group", "name", "value", "threshold", "passed")}
                                              for c in data["checks"]]
            print(f"parity {precision}: {data['verdict']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if all(r["rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
