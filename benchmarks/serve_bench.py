"""Load benchmark for `mmgen serve`: requests/s and p50/p95 latency at 1, 4 and 16 concurrent
clients, next to in-process `sample()` throughput (what `mmgen generate` runs), same backend.

Not a test: it prints figures and asserts nothing about speed. Each request is one image.

    PYTHONPATH=$PWD python benchmarks/serve_bench.py                 # tiny re-randomised model
    PYTHONPATH=$PWD python benchmarks/serve_bench.py --run RUN_DIR --steps 50 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _tiny_run(root: Path) -> Path:
    """A tiny run with re-randomised weights and an fp32 ONNX export (no training, no download)."""
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
    run = save_run(root / "run", config, vq.eval(), dit.eval())
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    return run.root


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_level(url: str, clients: int, requests_per_client: int, num_classes: int, steps: int) -> dict[str, Any]:
    from mmgen_deploy.serve.client import GenerateClient, ImageRequest

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(worker_id: int) -> None:
        client = GenerateClient(url, timeout_s=600)
        try:
            barrier.wait()
            for k in range(requests_per_client):
                seed = worker_id * 1000 + k
                request = ImageRequest(seeds=[seed], class_ids=[seed % num_classes], steps=steps)
                started = time.perf_counter()
                try:
                    client.generate(request)
                except Exception as exc:
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": wall,
            "requests_per_second": len(latencies) / wall if wall > 0 else float("nan"),
            "p50_ms": 1000 * _percentile(latencies, 50), "p95_ms": 1000 * _percentile(latencies, 95),
            "first_error": errors[0] if errors else None}


def in_process(run_dir: Path, backend: str, threads: int | None, steps: int, images: int, batch_size: int,
               num_classes: int) -> dict[str, Any]:
    """In-process sample(): one batch of `images` (throughput) and single images (latency)."""
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling import sample

    config = RunDir(run_dir).load_config()
    runner, _choice = open_runner(run_dir, backend, None, threads=threads)
    try:
        sample(runner, config, [0], steps=steps, seed=0)  # warm-up (session creation, first-call costs)
        started = time.perf_counter()
        sample(runner, config, [i % num_classes for i in range(images)], steps=steps, seed=0,
               batch_size=batch_size)
        batched = time.perf_counter() - started
        singles = []
        for i in range(5):
            started = time.perf_counter()
            sample(runner, config, [i % num_classes], steps=steps, seed=i)
            singles.append(time.perf_counter() - started)
    finally:
        runner.close()
    return {"images": images, "batch_size": batch_size, "images_per_second_batched": images / batched,
            "single_image_ms_p50": 1000 * statistics.median(singles)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run directory (default: a tiny re-randomised model)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per instance (0 = backend default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.serve.client import GenerateClient, batch_sizes_executed
    from mmgen_deploy.serve.repository import RepositoryOptions, write_repository
    from mmgen_deploy.serve.server import free_loopback_ports, running_server

    package_root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="mmgen-serve-bench-") as scratch:
        run_dir = args.run or _tiny_run(Path(scratch))
        config = RunDir(run_dir).load_config()
        num_classes = config.dit.num_classes
        repo = Path(scratch) / "repo"
        write_repository(run_dir, repo, RepositoryOptions(
            max_batch_size=args.max_batch, max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
            backend=args.backend, threads=args.threads, artifacts="reference", vendor_source=False))
        levels = [int(c) for c in args.clients.split(",")]
        results: dict[str, Any] = {"backend": args.backend, "steps": args.steps, "threads": args.threads,
                                   "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
                                   "instances": args.instances, "levels": []}
        http_port, grpc_port = free_loopback_ports(2)
        with running_server(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=None,
                            python_paths=[package_root]) as server:
            warm = GenerateClient(server.http_url)
            from mmgen_deploy.serve.client import ImageRequest

            warm.generate(ImageRequest(seeds=[0], class_ids=[0], steps=args.steps))
            before = batch_sizes_executed(warm.statistics())
            for clients in levels:
                level = load_level(server.http_url, clients, args.requests_per_client, num_classes, args.steps)
                after = batch_sizes_executed(warm.statistics())
                level["batch_sizes"] = {size: count - before.get(size, 0) for size, count in sorted(after.items())
                                        if count - before.get(size, 0) > 0}
                before = after
                results["levels"].append(level)
                print(f"{clients:>3} clients: {level['requests_per_second']:7.2f} req/s  "
                      f"p50 {level['p50_ms']:8.1f} ms  p95 {level['p95_ms']:8.1f} ms  "
                      f"errors {level['errors']}  executions by batch size {level['batch_sizes']}", flush=True)
            warm.close()
        threads = args.threads or None
        reference = in_process(run_dir, args.backend, threads, args.steps, args.max_batch, args.max_batch,
                               num_classes)
        results["in_process"] = reference
        print(f"in-process sample() ({args.backend}): {reference['images_per_second_batched']:7.2f} images/s "
              f"batched x{reference['batch_size']}, single image {reference['single_image_ms_p50']:.1f} ms",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
