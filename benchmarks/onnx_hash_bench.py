"""What checking an exported graph against its manifest costs a runner open (`RunDir.check_onnx_intact`).

    python benchmarks/onnx_hash_bench.py RUN_DIR [--precision fp32] [--component denoiser] [--repeats 3]
        [--json FILE]

Every ONNX Runtime / OpenVINO open and every engine build hashes the graph and its external data
and compares the result with the export manifest. The hashes are remembered (per file: path, device,
inode, size, mtime, ctime) in the mmgen cache, so only the first open after an export reads the
files. This measures, on a real run (build a large one with `benchmarks/large_models.py`,
`mmgen import` and `mmgen export --external-data`, or `benchmarks/scale_bench.py --keep`):

    cold        nothing remembered, the files evicted from the page cache first
                (posix_fadvise DONTNEED on these files only): a first open after a reboot
    warm        nothing remembered, the files in the page cache: a first open right after the export
    remembered  the hashes remembered: every later open

and, for scale, what creating the ONNX Runtime session of the same graph costs (warm). Each figure is
the median of `--repeats` runs in this process; the cache is a fresh temporary folder per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen_deploy.io_utils import format_bytes  # noqa: E402
from mmgen_deploy.onnx_files import onnx_files  # noqa: E402
from mmgen_deploy.rundir import RunDir  # noqa: E402


def _evict(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed_check(run: RunDir, manifest: dict[str, Any], precision: str, component: str) -> float:
    started = time.perf_counter()
    run.check_onnx_intact(manifest, precision, component)
    return time.perf_counter() - started


def measure(run: RunDir, precision: str, component: str, repeats: int) -> dict[str, Any]:
    from mmgen_deploy.io_utils import read_json

    manifest = read_json(run.onnx_manifest_path)
    graph = run.onnx_path(precision, component)
    files = onnx_files(graph)
    seconds: dict[str, list[float]] = {"cold": [], "warm": [], "remembered": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="mmgen-hash-bench-") as cache:
            os.environ["MMGEN_CACHE_DIR"] = cache
            _evict(files)
            seconds["cold"].append(_timed_check(run, manifest, precision, component))
        with tempfile.TemporaryDirectory(prefix="mmgen-hash-bench-") as cache:
            os.environ["MMGEN_CACHE_DIR"] = cache
            seconds["warm"].append(_timed_check(run, manifest, precision, component))
            seconds["remembered"].append(_timed_check(run, manifest, precision, component))
    import onnxruntime as ort

    session_seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        session_seconds.append(time.perf_counter() - started)
        del session
    return {
        "graph": str(graph), "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "all_seconds": seconds,
        "ort_session_seconds": statistics.median(session_seconds),
        "load_average": os.getloadavg()[0],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--component", default="denoiser")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = measure(RunDir(args.run_dir), args.precision, args.component, args.repeats)
    median = result["median_seconds"]
    print(f"{result['graph']}: {' + '.join(f['name'] for f in result['files'])}, {format_bytes(result['bytes'])}")
    print(f"| open | check_onnx_intact (median of {args.repeats}) |")
    print("|---|---|")
    for name in ("cold", "warm", "remembered"):
        print(f"| {name} | {median[name] * 1000:.1f} ms |")
    print(f"| (ONNX Runtime session creation, for scale) | {result['ort_session_seconds'] * 1000:.0f} ms |")
    print(f"load average {result['load_average']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
