"""Crash leftovers and the run directory's writer lock.

A killed export leaves `RUN/.onnx.<random>.tmp/` behind; the next writer on that run removes
it and says so. Two writers on one run at once: the second is refused in one line naming the
first, with exit code 75, and nothing of the first's work is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmgen_deploy.cli.app import main
from mmgen_deploy.errors import RunDirBusyError
from mmgen_deploy.io_utils import read_lock_holder, sweep_leftovers
from mmgen_deploy.rundir import LOCK_NAME, RunDir, save_run


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_sweep_removes_temporaries_restores_a_set_aside_copy_and_keeps_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run / "run.json", 10)
    _write(run / ".onnx.k3j2h1ab.tmp" / "fp32" / "denoiser.onnx", 3000)      # killed export
    _write(run / "engines" / ".tensorrt_rtx-1.7-aot.zz9_ab12.tmp" / "denoiser.plan", 500)  # killed build
    _write(run / "engines" / "tensorrt_rtx-1.7-aot" / "denoiser.plan", 7)
    _write(run / "reports" / ".eval.json.q1w2e3r4.tmp", 20)                   # killed atomic_path
    _write(run / "onnx.old" / "x", 1)                                        # user's folder: kept
    _write(run / ".notes.tmp", 1)                                            # not our pattern: kept
    # A swap killed between its two renames: the old export is set aside and onnx/ is missing.
    _write(run / ".onnx.old" / "manifest.json", 2)
    _write(tmp_path / ".run.a1b2c3d4.tmp" / "run.json", 40)                   # killed `mmgen import --out run`
    _write(tmp_path / ".other.a1b2c3d4.tmp" / "run.json", 40)                 # another run's: kept

    found = sweep_leftovers(tmp_path, recurse=False, only_target="run") + sweep_leftovers(run)
    removed = {item.path.relative_to(tmp_path).as_posix(): item.bytes for item in found if item.action == "removed"}
    assert removed == {".run.a1b2c3d4.tmp": 40, "run/.onnx.k3j2h1ab.tmp": 3000,
                       "run/engines/.tensorrt_rtx-1.7-aot.zz9_ab12.tmp": 500, "run/reports/.eval.json.q1w2e3r4.tmp": 20}
    assert [item.path.name for item in found if item.action == "restored"] == [".onnx.old"]
    assert (run / "onnx" / "manifest.json").is_file() and not (run / ".onnx.old").exists()
    for kept in ("engines/tensorrt_rtx-1.7-aot/denoiser.plan", "onnx.old/x",
                 ".notes.tmp", "run.json"):
        assert (run / kept).exists(), kept
    assert (tmp_path / ".other.a1b2c3d4.tmp").exists()
    # Once the target exists again, a set-aside copy is the stale one and is removed.
    _write(run / ".onnx.old" / "manifest.json", 2)
    assert [i.action for i in sweep_leftovers(run)] == ["removed"] and (run / "onnx" / "manifest.json").is_file()


def test_lock_is_reentrant_in_a_process_and_gone_with_an_empty_created_folder(tmp_path: Path,
                                                                               random_models: tuple) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    _write(run.root / ".onnx.k3j2h1ab.tmp" / "a.onnx", 5)
    with run.writing("export") as outer:
        assert [item.path.name for item in outer] == [".onnx.k3j2h1ab.tmp"]
        with RunDir(run.root).writing("build engines") as inner:  # nested writer: same lock, no second sweep
            assert inner == []
        holder = read_lock_holder(run.lock_path)
        assert holder["pid"] == os.getpid() and holder["purpose"] == "export"
    # create=True on a missing folder makes it for the lock, and takes it away again if nothing else came.
    fresh = RunDir(tmp_path / "fresh")
    with fresh.writing("import", create=True):
        assert (fresh.root / LOCK_NAME).is_file()
    assert not fresh.root.exists()
    # A non-empty folder that is not a run directory gets no lock file (train refuses it, import --overwrite replaces).
    _write(tmp_path / "photos" / "cat.png", 3)
    with RunDir(tmp_path / "photos").writing("train", create=True):
        pass
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.png"]


_HOLDER = """
import sys, time
from mmgen_deploy.rundir import RunDir
with RunDir(sys.argv[1]).writing("train the DiT"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_writer_in_another_process_is_refused_in_one_line(tmp_path: Path, random_models: tuple,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=rf"pid {holder.pid}\b.*train the DiT"), run.writing("export"):
            pass
        from mmgen_deploy.export import export_run

        with pytest.raises(RunDirBusyError, match="cannot export"):  # the library function locks by itself
            export_run(run, precisions=("fp32",), components=("denoiser",))
        assert not run.onnx_dir.exists()
        code, output = _cli(["import", "--vq", "x", "--dit", "y", "--out", str(run.root), "--overwrite"], capsys)
        lines = output.strip().splitlines()
        assert code == 75 and len(lines) == 1, output
        assert f"pid {holder.pid}" in lines[0] and "cannot import" in lines[0] and f"kill {holder.pid}" in lines[0]
        assert run.weights_sha256()  # the run is intact
    finally:
        holder.kill()
        holder.wait()
    with run.writing("export"):  # the kernel released the killed holder's lock
        pass


def test_killed_export_leaves_a_temp_folder_that_the_next_export_removes(tmp_path: Path, random_models: tuple,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A real `mmgen export` subprocess: refused company while it runs, SIGKILLed mid-export, cleaned up after."""
    config, vq, dit = random_models
    run = save_run(tmp_path / "run", config, vq, dit)
    argv = ["export", str(run.root), "--precision", "fp32", "--components", "denoiser"]
    proc = subprocess.Popen([sys.executable, "-m", "mmgen_deploy", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while read_lock_holder(run.lock_path).get("pid") != proc.pid:
            assert proc.poll() is None, f"export ended early: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "the export never took the run's lock"
            time.sleep(0.01)
        code, output = _cli(argv, capsys)  # a second export while the first runs
        lines = output.strip().splitlines()
        assert code == 75 and len(lines) == 1, output
        assert f"pid {proc.pid}" in lines[0] and f"`mmgen {' '.join(argv)}`" in lines[0], output
        while not any(any(tmp.rglob("*")) for tmp in run.root.glob(".onnx.*.tmp")):
            assert proc.poll() is None, "the export finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = list(run.root.glob(".onnx.*.tmp"))
    assert len(leftovers) == 1 and not run.onnx_dir.exists()
    code, output = _cli(argv, capsys)
    assert code == 0, output
    notes = [line for line in output.splitlines() if line.startswith("note: removed")]
    assert len(notes) == 1 and str(leftovers[0]) in notes[0] and "interrupted" in notes[0], output
    assert not list(run.root.glob(".onnx.*.tmp"))
    manifest = json.loads((run.onnx_dir / "manifest.json").read_text())
    assert list(manifest["files"]["fp32"]) == ["denoiser"]
