"""Load `mmgen serve` with Triton's own `perf_analyzer`, next to `mmgen generate`'s in-process images/s.

Not a test: it prints figures and asserts nothing about speed. One request = one image.

1. `mmgen serve RUN` (a real tritonserver, as a user starts it), then perf_analyzer over HTTP at
   concurrency 1, 4 and 16: requests/s and p50 / p95 / p99 latency (its CSV).
2. Server memory (RSS of tritonserver and its Python-backend stub, the whole process group)
   after warm-up, after every level, and after a sustained run of --requests more requests.
3. `mmgen generate RUN --n 16 --batch-size 16` with the same backend, threads and steps: images/s.

    PYTHONPATH=$PWD python benchmarks/perf_analyzer_bench.py --run RUN_DIR --steps 10 --json pa.json

perf_analyzer: `pip install perf-analyzer` (its wheel needs glibc >= 2.38); elsewhere pass
--perf-analyzer PATH, e.g. the binary inside the tritonclient 2.41 wheel (see docs/serving.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _tiny_run(root: Path) -> Path:
    """A tiny class run with re-randomised weights and its fp32 ONNX set (no training, no download)."""
    import torch

    from mmgen_deploy.config import preset
    from mmgen_deploy.export import export_run
    from mmgen_deploy.models import DiT, VQModel, rerandomize_
    from mmgen_deploy.rundir import save_run

    config = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(root / "run", config, vq.eval(), dit.eval())
    export_run(run.root, precisions=["fp32"], components=["denoiser", "quantizer", "decoder"])
    return run.root


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the process group (the server and its backend stubs)."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the name: state, ppid, pgrp, ...
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total_kib / 1024


def input_data(config: Any, steps: int, count: int = 64) -> dict[str, Any]:
    """perf_analyzer --input-data: `count` different requests (class names or prompts, seeds), cycled."""
    rows = []
    for i in range(count):
        if config.uses_text:
            condition = {"PROMPT": [["a large blue triangle at the top", "a small red circle in the middle"][i % 2]]}
        else:
            names = config.class_names or tuple(str(c) for c in range(config.dit.num_classes))
            condition = {"CLASS": [names[i % len(names)]]}
        rows.append({**condition, "SEED": [i], "STEPS": [steps]})
    return {"data": rows}


def perf_analyzer(binary: list[str], url: str, data: Path, concurrency: int, out_csv: Path, *,
                  measurement_ms: int, request_count: int | None = None, timeout_s: float = 900) -> dict[str, float]:
    cmd = [*binary, "-m", "mmgen_generate", "-u", url, "-i", "http", "--input-data", str(data), "-b", "1",
           "--concurrency-range", f"{concurrency}:{concurrency}", "-f", str(out_csv)]
    if request_count:  # three windows of request_count / 3 (perf_analyzer wants three to call it stable)
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count",
                str(max(1, request_count // 3)), "--max-trials", "3", "--stability-percentage", "999"]
    else:
        # The shared machine never holds still: accept three windows whatever their spread.
        cmd += ["--measurement-interval", str(measurement_ms), "--max-trials", "3", "--stability-percentage", "999"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0 or not out_csv.is_file():
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {result.stdout[-800:]} {result.stderr[-800:]}")
    with out_csv.open() as handle:
        row = next(csv.DictReader(handle))
    return {"concurrency": concurrency, "requests_per_second": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000, "p95_ms": float(row["p95 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}


def generate_images_per_second(run_dir: Path, scratch: Path, steps: int, threads: int, backend: str) -> float:
    out = scratch / "generate"
    cmd = [sys.executable, "-m", "mmgen_deploy", "generate", str(run_dir), "--n", "16", "--batch-size", "16",
           "--steps", str(steps), "--backend", backend, "--precision", "fp32", "--threads", str(threads),
           "--out", str(out), "--json", str(scratch / "generate.json")]
    from mmgen_deploy.rundir import RunDir

    config = RunDir(run_dir).load_config()
    cmd[5:5] = ["--prompt", "a large blue triangle at the top"] if config.uses_text else ["--class", "0"]
    best = 0.0
    for _ in range(2):  # the first run pays session creation too; keep the better of two
        result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"mmgen generate failed: {result.stderr[-800:]}")
        timing = json.loads((scratch / "generate.json").read_text())["timing"]
        best = max(best, float(timing["images_per_second"]))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run directory (default: a tiny re-randomised class model)")
    parser.add_argument("--perf-analyzer", default="perf_analyzer", help="the perf_analyzer binary")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server and of generate")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--measurement-ms", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=3000, help="sustained requests for the memory check")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    binary = shutil.which(args.perf_analyzer) or args.perf_analyzer
    if not Path(binary).is_file():
        print(f"error: perf_analyzer not found ({args.perf_analyzer}); pip install perf-analyzer or pass "
              "--perf-analyzer PATH", file=sys.stderr)
        return 2
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.serve.server import free_loopback_ports

    results: dict[str, Any] = {"steps": args.steps, "threads": args.threads, "backend": args.backend,
                               "load_before": os.getloadavg(), "levels": []}
    with tempfile.TemporaryDirectory(prefix="mmgen-pa-bench-") as scratch_name:
        scratch = Path(scratch_name)
        run_dir = args.run or _tiny_run(scratch)
        config = RunDir(run_dir).load_config()
        data = scratch / "data.json"
        data.write_text(json.dumps(input_data(config, args.steps)))
        http, grpc = free_loopback_ports(2)
        endpoints = scratch / "endpoints.json"
        serve = subprocess.Popen(
            [sys.executable, "-m", "mmgen_deploy", "serve", str(run_dir), "--port", str(http), "--grpc-port",
             str(grpc), "--metrics-port", "0", "--backend", args.backend, "--precision", "fp32", "--threads",
             str(args.threads), "--max-batch", str(args.max_batch), "--max-queue-delay-us", "5000",
             "--json", str(endpoints)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            deadline = time.monotonic() + 300
            while not endpoints.is_file():
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mmgen serve did not start: {serve.stderr.read() if serve.stderr else ''}")
                time.sleep(0.2)
            time.sleep(0.2)
            pgid = int(json.loads(endpoints.read_text())["pid"])
            url = f"127.0.0.1:{http}"
            perf_analyzer([binary], url, data, 1, scratch / "warm.csv", measurement_ms=2000, request_count=20)
            results["rss_mib_after_warmup"] = group_rss_mib(pgid)
            print(f"server RSS after warm-up: {results['rss_mib_after_warmup']:.0f} MiB", flush=True)
            for level in (int(c) for c in args.concurrency.split(",")):
                figures = perf_analyzer([binary], url, data, level, scratch / f"c{level}.csv",
                                        measurement_ms=args.measurement_ms)
                figures["rss_mib_after"] = group_rss_mib(pgid)
                results["levels"].append(figures)
                print(f"concurrency {level:>2}: {figures['requests_per_second']:7.2f} req/s  p50 "
                      f"{figures['p50_ms']:7.1f} ms  p95 {figures['p95_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms"
                      f"  (server RSS {figures['rss_mib_after']:.0f} MiB)", flush=True)
            started = time.perf_counter()
            sustained = perf_analyzer([binary], url, data, 16, scratch / "sustained.csv",
                                      measurement_ms=args.measurement_ms, request_count=args.requests)
            sustained["seconds"] = time.perf_counter() - started
            results["sustained"] = {**sustained, "requests": args.requests}
            results["rss_mib_after_sustained"] = group_rss_mib(pgid)
            print(f"sustained {args.requests} requests at concurrency 16 in {sustained['seconds']:.0f} s "
                  f"({sustained['requests_per_second']:.2f} req/s): server RSS "
                  f"{results['rss_mib_after_warmup']:.0f} -> {results['rss_mib_after_sustained']:.0f} MiB",
                  flush=True)
        finally:
            if serve.poll() is None:
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    serve.kill()
        results["generate_images_per_second"] = generate_images_per_second(run_dir, scratch, args.steps,
                                                                           args.threads, args.backend)
        print(f"mmgen generate in-process (batch 16): {results['generate_images_per_second']:.2f} images/s",
              flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
