"""Step caching's speed: the denoising loop with and without a cache policy, in one process, side by side.

    python benchmarks/cache_speed.py RUN [--backend onnxruntime] [--precision fp32] [--steps 50]
        [--policies none,every:2] [--repeats 2] [--images 1] [--threads N]

Opens the runner once, samples `--images` images (class 0, seed 0, guidance 4: the denoiser runs a
batch of 2 per image) with each policy in turn, `--repeats` rounds alternating the policies (so a
change in the machine's load hits them alike), after one untimed 2-step warm-up per policy, and
prints per policy the median of the denoising loops' wall time (`SampleResult.denoise_seconds`, what
`mmgen generate` reports) and its ratio to the first policy's, with the block evaluations kept.
`--calls N` (instead) times single calls of the whole denoiser and of each part at the sampling
batch, N rounds alternating, and prints the loop time a policy's recompute schedule implies.
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
    parser.add_argument("--calls", type=int, default=0, help="time single calls instead (N rounds)")
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
    if args.calls:
        try:
            time_calls(runner, config, args)
        finally:
            runner.close()
        return
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


def time_calls(runner: object, config: object, args: argparse.Namespace) -> None:
    """Median single-call latency of the denoiser and its parts on the inputs the loop feeds them."""
    import time

    import numpy as np

    from mmgen_deploy.sampling.cache import parse_cache_policy
    from mmgen_deploy.specs import DENOISER_PARTS, component_specs

    specs = component_specs(config, parts=True)  # type: ignore[arg-type]
    feeds = specs["denoiser"].make_inputs(2 * args.images, np.random.default_rng(0))
    given = dict(feeds)
    given.update({k: v.copy() for k, v in runner.run("denoiser_head", feeds).items()})  # type: ignore[attr-defined]
    given.update({k: v.copy() for k, v in runner.run("denoiser_body", {  # type: ignore[attr-defined]
        n: given[n] for n in specs["denoiser_body"].input_names}).items()})
    names = ("denoiser", *DENOISER_PARTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.calls + 1):  # the first round warms up
        for name in names:
            started = time.perf_counter()
            runner.run(name, {n: given[n] for n in specs[name].input_names})  # type: ignore[attr-defined]
            times[name].append(time.perf_counter() - started)
    ms = {n: 1e3 * statistics.median(t[1:]) for n, t in times.items()}
    print("| call | median ms |")
    print("|---|---|")
    for name in names:
        print(f"| {name} | {ms[name]:.1f} |")
    for policy in args.policies.split(","):
        decider = parse_cache_policy(policy).decider(args.steps)
        if not parse_cache_policy(policy).enabled:
            loop = args.steps * ms["denoiser"]
        else:
            recomputed = sum(decider.recompute(i, given["modulated_input"]) for i in range(args.steps))
            loop = args.steps * (ms["denoiser_head"] + ms["denoiser_tail"]) + recomputed * ms["denoiser_body"]
        print(f"{policy}: {args.steps} steps imply {loop / 1e3:.2f} s of model calls, "
              f"{args.steps * ms['denoiser'] / loop:.2f}x")


if __name__ == "__main__":
    main()
