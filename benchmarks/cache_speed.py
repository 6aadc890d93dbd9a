"""Step caching's speed: the denoising loop with and without a cache policy, in one process, side by side.

    python benchmarks/cache_speed.py RUN [--backend onnxruntime] [--precision fp32] [--steps 50]
        [--policies none,every:2] [--repeats 2] [--images 1] [--threads N]

Opens the runner once, samples `--images` images (class 0, seed 0, guidance 4: the denoiser runs a
batch of 2 per image) with each policy in turn, `--repeats` rounds alternating the policies (so a
change in the machine's load hits them alike), after one untimed 2-step warm-up per policy, and
prints per policy the median of the denoising loops' wall time (`SampleResult.denoise_seconds`, what
`mmgen generate` reports) and its ratio to the first policy's, with the block evaluations kept.
The run needs its denoiser parts (`mmgen export RUN --components denoiser_parts`). A benchmark, not a
test; at real size (DiT-B/2 on a 256 px VQ-f8 latent) minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen_deploy.rundir import RunDir  # noqa: E402
from mmgen_deploy.runtime import open_runner  # noqa: E402
from mmgen_deploy.sampling import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--policies", default="none,every:2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    run = RunDir(args.run)
    config = run.load_config()
    policies = args.policies.split(",")
    runner, choice = open_runner(run, args.backend, args.precision, threads=args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# {choice.backend} {choice.precision} on {choice.device}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; commit {commit}; DiT depth "
          f"{config.dit.depth}, {args.images} image(s), {args.steps} steps, guidance 4")
    classes = [0] * args.images
    seconds: dict[str, list[float]] = {p: [] for p in policies}
    kept: dict[str, str] = {}
    try:
        for policy in policies:  # warm-up: sessions, compiled graphs, first-call allocations
            sample(runner, config, classes, steps=2, cache=policy, batch_size=args.images)
        for round_ in range(args.repeats):
            for policy in policies:
                result = sample(runner, config, classes, steps=args.steps, cache=policy, batch_size=args.images)
                seconds[policy].append(result.denoise_seconds)
                kept[policy] = result.cache.describe()
                print(f"round {round_ + 1}: {kept[policy]}; denoising loop {result.denoise_seconds:.2f} s",
                      flush=True)
    finally:
        runner.close()
    base = statistics.median(seconds[policies[0]])
    print("| cache | denoising loop s (median) | speed-up | block evaluations |")
    print("|---|---|---|---|")
    for policy in policies:
        median = statistics.median(seconds[policy])
        print(f"| {policy} | {median:.2f} | {base / median:.2f}x | {kept[policy].split(': ', 1)[1]} |")


if __name__ == "__main__":
    main()
