"""Step caching's quality/cost front on a trained class run: accuracy vs block evaluations vs wall time.

    python benchmarks/cache_front.py RUN [--backend onnxruntime] [--precision fp32] [--steps 50]
        [--policies none,every:2,every:3,adaptive:0.3] [--per-class 10] [--seed 0] [--threads N]
        [--signals] [--markdown FILE]

For each number of steps and each policy it samples what `mmgen eval` samples (`--per-class` images
of every class, seed 0, batch 90, guidance 4), judges them with eval's pixel checker
(`conditional_accuracy`: colour AND shape) and prints accuracy, the DiT block evaluations the
policy kept (evaluated / total, counted per image) and the denoising loops' wall time, all in one
process, side by side, on the same runner. `--signals` first prints the adaptive policy's signal
(the relative L1 change of the first block's modulated input from one step to the next, over the first
batch) at each step, from which a threshold can be chosen.

The run needs its denoiser parts (`mmgen export RUN --components denoiser_parts`). A benchmark,
not a test: minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen_deploy.defaults import SAMPLING  # noqa: E402
from mmgen_deploy.evaluation.evaluate import conditional_accuracy  # noqa: E402
from mmgen_deploy.rundir import RunDir  # noqa: E402
from mmgen_deploy.runtime import open_runner  # noqa: E402
from mmgen_deploy.sampling import sample  # noqa: E402

EVAL_BATCH = 90  # `mmgen eval`'s batch (EvalSettings.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", default=str(SAMPLING.steps), help="comma-separated, e.g. 10,20,50")
    parser.add_argument("--policies", default="none,every:2,every:3")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--signals", action="store_true", help="print the adaptive signal per step first")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    run = RunDir(args.run)
    config = run.load_config()
    class_ids = [k for k in range(config.dit.num_classes) for _ in range(args.per_class)]
    runner, choice = open_runner(run, args.backend, args.precision, threads=args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# {choice.backend} {choice.precision} on {choice.device}; {platform.processor() or platform.machine()}; "
          f"commit {commit}; {len(class_ids)} images, batch {EVAL_BATCH}, guidance {SAMPLING.cfg_scale}, "
          f"seed {args.seed}")
    rows = []
    try:
        for steps in (int(s) for s in args.steps.split(",")):
            if args.signals:
                probe = sample(runner, config, class_ids[:EVAL_BATCH], steps=steps, seed=args.seed,
                               batch_size=EVAL_BATCH, cache="adaptive:1e9")
                print(f"steps {steps}: adaptive signal per step: "
                      + " ".join(f"{s:.3f}" for s in probe.cache.signals[0][1:]))
            for policy in args.policies.split(","):
                started = time.perf_counter()
                result = sample(runner, config, class_ids, steps=steps, seed=args.seed, batch_size=EVAL_BATCH,
                                cache=policy)
                seconds = time.perf_counter() - started
                judged = conditional_accuracy(result.images, class_ids)
                stats = result.cache
                rows.append([str(steps), stats.policy, f"{100 * judged['accuracy']:.1f}",
                             f"{100 * judged['colour_accuracy']:.1f}", f"{100 * judged['shape_accuracy']:.1f}",
                             f"{stats.blocks_evaluated} / {stats.blocks_total}", f"{100 * stats.saved_fraction:.1f}",
                             f"{result.denoise_seconds:.1f}", f"{seconds:.1f}",
                             " ".join(str(s) for s in stats.recompute_steps[0]) if stats.recompute_steps else "all"])
                print(" | ".join(rows[-1]), flush=True)
    finally:
        runner.close()
    header = ["steps", "cache", "accuracy %", "colour %", "shape %", "block evaluations", "saved %",
              "denoise s", "total s", "recompute steps (first batch)"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    print("\n".join(table))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
