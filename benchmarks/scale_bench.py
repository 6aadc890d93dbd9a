"""Real-size pipeline benchmark: make -> import -> export -> build-engine -> generate for S/2, B/2, XL/2 pairs.

    flock /tmp/mmgen-heavy.lock python benchmarks/scale_bench.py --presets S/2,B/2 [--vq f8]
        [--work-dir /tmp/mmgen-scale-bench] [--max-rss-gb 20] [--markdown FILE] [--json FILE] [--keep]

For each DiT preset it writes a diffusers pair with random weights (`benchmarks/large_models.py`:
a DiT on the latent of a 256 px VQ-f8 or f4), then runs the pipeline as a user would, each
stage its own `mmgen` subprocess:

    make      python benchmarks/large_models.py PRESET PAIR --vq f8
    import    mmgen import --vq PAIR/vqvae --dit PAIR/transformer --out RUN
    export    mmgen export RUN                                  (ONNX FP32 + mixed FP16, validated)
    build     mmgen build-engine RUN --runtime tensorrt-rtx      (ahead of time, no GPU needed)
    generate  mmgen generate RUN --class 207 --n 2 --steps 4 --backend onnxruntime --precision fp32
    step      the denoiser alone on ONNX Runtime CPU (FP32 and FP16 graphs), batch 2 = one image with
              guidance: median ms per call of 3 after a warm-up (one sampling step)

and prints, per stage, wall seconds, the peak RSS the kernel recorded for that process
(`os.wait4`'s `ru_maxrss`: the process and any children it waited for) and the size of what it
wrote. A stage that fails (or exceeds `--max-rss-gb`, checked every 0.2 s: the process group is
killed before the machine's OOM killer picks a victim) is reported with its last error line and
the stages that need its output are skipped. Every preset's folder (GBs at XL size) is deleted
when its row is done unless `--keep`.

This is a benchmark, not a test: it runs for minutes to tens of minutes and needs ~12+ GB for
XL/2. Run it alone (`flock /tmp/mmgen-heavy.lock ...` on a shared machine) and quote the load
average it prints beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESETS = ("S/2", "B/2", "XL/2")
STAGES = ("make", "import", "export", "build", "generate", "step")

_STEP_SNIPPET = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from mmgen_deploy.export import onnx_path
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.specs import component_specs
run, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = component_specs(RunDir(run).load_config())["denoiser"]
feeds = spec.make_inputs(batch, np.random.default_rng(0))  # the spec's own inputs (names, dtypes, ranges)
result = {}
for precision in ("fp32", "fp16"):
    started = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path(run, precision, "denoiser")), providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    result[precision] = {"ms": 1000 * sorted(times)[len(times) // 2], "load_s": load,
                         "all_ms": [1000 * t for t in times]}
    del session
print(json.dumps(result))
"""


@dataclass
class StageResult:
    stage: str
    command: list[str]
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0
    returncode: int | None = None
    output_bytes: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    load_before: float = 0.0
    load_after: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants right now (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def run_stage(stage: str, command: list[str], *, max_rss: int, log: Path, env: dict[str, str]) -> StageResult:
    """Run one stage as a subprocess; the kernel's peak RSS comes from wait4 on exactly that process."""
    result = StageResult(stage=stage, command=command, load_before=os.getloadavg()[0])
    killed_for_memory = threading.Event()
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                if _tree_rss(proc.pid) > max_rss:
                    killed_for_memory.set()
                    os.killpg(proc.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result.seconds = round(time.perf_counter() - started, 1)
    result.peak_rss_bytes = usage.ru_maxrss * 1024  # Linux reports kilobytes
    result.cpu_seconds = round(usage.ru_utime + usage.ru_stime, 1)
    result.returncode = proc.returncode
    result.load_after = os.getloadavg()[0]
    if killed_for_memory.is_set():
        result.error = f"stopped at --max-rss-gb {max_rss / 1e9:.0f} (peak {result.peak_rss_bytes / 1e9:.1f} GB)"
    elif proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.lstrip().startswith("error")]
        result.error = (errors or lines or [f"exit code {proc.returncode}"])[-1].strip()[:300]
    return result


def _mmgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmgen_deploy", *args]


def bench_preset(preset: str, args: argparse.Namespace, env: dict[str, str], results: list[StageResult]) -> None:
    """Run every stage for one preset, appending to `results` as they finish (so an interrupted run still
    reports what it measured); the preset's folder is deleted at the end, also on Ctrl-C, unless --keep."""
    slug = preset.replace("/", "_")
    work = args.work_dir / slug
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        _bench_stages(preset, args, env, results, work)
    finally:
        if args.keep:
            print(f"[{preset}] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _bench_stages(preset: str, args: argparse.Namespace, env: dict[str, str], results: list[StageResult],
                  work: Path) -> None:
    pair, run = work / "pair", work / "run"
    max_rss = int(args.max_rss_gb * 1e9)
    plan: list[tuple[str, list[str]]] = [
        ("make", [sys.executable, str(ROOT / "benchmarks" / "large_models.py"), preset, str(pair), "--vq", args.vq,
                  "--json", str(work / "pair.json")]),
        ("import", _mmgen("import", "--vq", str(pair / "vqvae"), "--dit", str(pair / "transformer"), "--out", str(run),
                          "--json", str(work / "import.json"))),
        ("export", _mmgen("export", str(run), "--json", str(work / "export.json"))),
        ("build", _mmgen("build-engine", str(run), "--runtime", "tensorrt-rtx", "--json", str(work / "build.json"))),
        ("generate", _mmgen("generate", str(run), "--class", "207", "--n", "2", "--steps", str(args.steps),
                            "--backend", "onnxruntime", "--precision", "fp32", "--json", str(work / "generate.json"))),
        ("step", [sys.executable, "-c", _STEP_SNIPPET, str(run), str(args.step_batch), "3"]),
    ]
    needs = {"import": "make", "export": "import", "build": "export", "generate": "export", "step": "export"}
    ok: dict[str, bool] = {}
    for stage, command in plan:
        if stage not in args.stages:
            ok[stage] = False
            continue
        if stage in needs and not ok.get(needs[stage], False):
            results.append(StageResult(stage, command, error=f"skipped: needs {needs[stage]}"))
            ok[stage] = False
            continue
        print(f"[{preset}] {stage}: {' '.join(command[:6])} ...", file=sys.stderr, flush=True)
        result = run_stage(stage, command, max_rss=max_rss, log=work / f"{stage}.log", env=env)
        _add_detail(result, work, pair, run)
        ok[stage] = result.ok
        results.append(result)
        print(f"[{preset}] {stage}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.1f} s, peak "
              f"{result.peak_rss_bytes / 1e9:.2f} GB{'' if result.ok else ' - ' + str(result.error)}",
              file=sys.stderr, flush=True)


def _add_detail(result: StageResult, work: Path, pair: Path, run: Path) -> None:
    """Sizes of what the stage wrote, and the figures its JSON report gives."""
    if not result.ok:
        return
    if result.stage == "make":
        result.output_bytes = tree_bytes(pair)
        info = json.loads((work / "pair.json").read_text())
        result.detail = {"params": info["params"]}
    elif result.stage == "import":
        result.output_bytes = sum(tree_bytes(run / part / "model.safetensors") for part in ("vqvae", "dit"))
        result.detail = {"params": json.loads((work / "import.json").read_text())["params"]}
    elif result.stage == "export":
        result.output_bytes = tree_bytes(run / "onnx")
        manifest = json.loads((work / "export.json").read_text())
        result.detail = {
            "bytes": {precision: {component: entry["bytes"] + _data_bytes(run, entry)
                                  for component, entry in entries.items()}
                      for precision, entries in manifest["files"].items()},
            "seconds": {precision: {component: round(entry.get("export_seconds", 0.0)
                                                     + entry.get("convert_seconds", 0.0), 1)
                                    for component, entry in entries.items()}
                        for precision, entries in manifest["files"].items()},
        }
    elif result.stage == "build":
        engines = run / "engines"
        result.output_bytes = tree_bytes(engines)
        report = json.loads((work / "build.json").read_text())
        result.detail = {"components": report.get("components")}
    elif result.stage == "generate":
        report = json.loads((work / "generate.json").read_text())
        result.detail = {key: report.get(key) for key in ("timing",) if key in report}
    elif result.stage == "step":
        log = (work / "step.log").read_text().strip().splitlines()
        result.detail = json.loads(log[-1])


def _data_bytes(run: Path, entry: dict[str, Any]) -> int:
    data = run / "onnx" / (entry["path"] + ".data")
    return data.stat().st_size if data.is_file() else 0


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for name in ("torch", "onnx", "onnxruntime", "tensorrt_rtx", "modelopt", "diffusers"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 2**30, 1), "python": platform.python_version(),
            "load_average": os.getloadavg(), "versions": versions}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f}" if value else "-"


def markdown(results: dict[str, list[StageResult]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GiB RAM; commit {info.get('commit')}; "
             f"VQ-{args.vq} at 256 px; generate: 2 images, {args.steps} DDIM steps, guidance; "
             f"step: denoiser batch {args.step_batch} on ONNX Runtime CPU.", ""]
    lines += ["| preset | stage | wall s | CPU s | peak RSS GB | output GB | load before/after | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for preset, rows in results.items():
        for row in rows:
            note = _note(row)
            out = _gb(row.output_bytes or 0) if row.output_bytes is not None else "-"
            seconds = f"{row.seconds:.1f}" if row.returncode is not None else "-"
            cpu = f"{row.cpu_seconds:.1f}" if row.returncode is not None else "-"
            load = f"{row.load_before:.1f} / {row.load_after:.1f}" if row.returncode is not None else "-"
            lines.append(f"| {preset} | {row.stage} | {seconds} | {cpu} | {_gb(row.peak_rss_bytes)} | {out} | {load} "
                         f"| {note} |")
    return "\n".join(lines) + "\n"


def _note(row: StageResult) -> str:
    if row.error:
        return f"FAILED: {row.error.replace('|', '/')}"
    if row.stage in ("make", "import"):
        params = row.detail.get("params", {})
        what = "diffusers (per-block embedder copies counted)" if row.stage == "make" else "native"
        return f"{what}: DiT {params.get('dit', 0) / 1e6:.1f}M + VQ {params.get('vqvae', 0) / 1e6:.1f}M params"
    if row.stage == "export":
        sizes = row.detail.get("bytes", {})
        den = {p: sizes.get(p, {}).get("denoiser", 0) for p in ("fp32", "fp16")}
        secs = row.detail.get("seconds", {})
        per = ", ".join(f"{c} {secs.get('fp32', {}).get(c, 0):.0f}+{secs.get('fp16', {}).get(c, 0):.0f} s"
                        for c in ("encoder", "decoder", "denoiser") if c in secs.get("fp32", {}))
        return (f"denoiser {den['fp32'] / 1e9:.2f} GB fp32 / {den['fp16'] / 1e9:.2f} GB fp16; "
                f"export+FP16 conversion: {per}")
    if row.stage == "build":
        comps = row.detail.get("components") or {}
        return ", ".join(f"{name} {c.get('build_seconds', 0):.1f} s" for name, c in comps.items())
    if row.stage == "generate":
        timing = row.detail.get("timing") or {}
        return f"{timing.get('images_per_second', 0):.3f} images/s" if timing else ""
    if row.stage == "step":
        return ", ".join(f"{p} {v['ms']:.0f} ms/step (session load {v['load_s']:.1f} s)" for p, v in row.detail.items())
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help="comma-separated DiT presets of benchmarks/large_models.py (default S/2,B/2,XL/2)")
    parser.add_argument("--vq", default="f8", choices=("f8", "f4"), help="autoencoder preset (default f8)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mmgen-scale-bench"),
                        help="where the pairs and run directories go (deleted per preset unless --keep)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the generate stage (default 4)")
    parser.add_argument("--step-batch", type=int, default=2,
                        help="denoiser batch of the per-step timing (default 2: one image with guidance)")
    parser.add_argument("--max-rss-gb", type=float, default=20.0,
                        help="kill a stage whose process tree exceeds this resident size (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the pairs and run directories")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="write every figure as JSON to this file")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = args.stages - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    sys.path.insert(0, str(ROOT))
    from benchmarks.large_models import DIT_PRESETS

    bad = [p for p in presets if p not in DIT_PRESETS]
    if bad:
        parser.error(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(DIT_PRESETS)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MMGEN_NO_COLOR", "1")
    info = machine()
    commit = ROOT / "COMMIT"  # a snapshot made with `git archive` records its commit here
    info["commit"] = commit.read_text().strip() if commit.is_file() else _git_commit()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GiB, load {info['load_average']}",
          file=sys.stderr)
    results: dict[str, list[StageResult]] = {}
    try:
        for preset in presets:
            results[preset] = []
            bench_preset(preset, args, env, results[preset])
    except KeyboardInterrupt:
        print("interrupted: the table has what was measured", file=sys.stderr)
    finally:
        info["load_average_end"] = os.getloadavg()
        table = markdown(results, info, args)
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "args": {k: (sorted(v) if isinstance(v, set) else str(v))
                                                                       for k, v in vars(args).items()},
                                             "results": {p: [asdict(r) for r in rows] for p, rows in results.items()}},
                                            indent=2, default=str))
    return 0 if all(r.ok for rows in results.values() for r in rows if r.returncode is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
