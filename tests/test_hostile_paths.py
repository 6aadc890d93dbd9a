"""What mmgen writes to: only regular files and real folders, never a link, device node, FIFO or socket.

Run as root, as mmgen is on edge boxes and in containers: a mistyped `--out /dev/...` or a run
folder received from someone else (a planted `.mmgen.lock` link, `reports/` pointing at a system
folder) must be refused in one line, leaving the node or the link's target untouched. The device
nodes are real (`mknod` of /dev/null's numbers in a temporary folder), as are the FIFOs, sockets
and links. Running out of space is real too: a tiny tmpfs where it can be mounted, /dev/full
(whose every write fails with ENOSPC) otherwise. Also here: temporaries of killed writers are
removed by later writers, and two batches into one folder are refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmgen_deploy.cli.app import main
from mmgen_deploy.errors import DiskFullError, RunDirError, UnsafePathError
from mmgen_deploy.io_utils import (
    STALE_DEAD_WRITER_S,
    atomic_dir,
    atomic_path,
    check_write_target,
    disk_full_as_error,
    write_json,
)
from mmgen_deploy.rundir import LOCK_NAME, RunDir

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and mounts need root (mknod, mount)")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def _null_device(path: Path) -> Path:
    """A character device with /dev/null's numbers: writes to it go nowhere, but replacing it is damage."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    return path


def _identity(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_ino, info.st_mode, info.st_rdev


@pytest.fixture()
def specials(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """One of each thing mmgen must not write to, with a precious file the link points at."""
    folder = tmp_path / "specials"
    folder.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    made = {"fifo": folder / "fifo", "link": folder / "link", "dangling link": folder / "dangling"}
    os.mkfifo(made["fifo"])
    made["link"].symlink_to(precious)
    made["dangling link"].symlink_to(tmp_path / "nowhere")
    server = socket.socket(socket.AF_UNIX)
    made["socket"] = folder / "socket"
    server.bind(str(made["socket"]))
    if os.geteuid() == 0:
        made["device"] = _null_device(folder / "null")
    try:
        yield made
    finally:
        server.close()
    assert precious.read_text() == "keep me"


def test_check_write_target_names_what_it_refuses(specials: dict[str, Path], tmp_path: Path) -> None:
    expected = {"fifo": "FIFO", "link": "symbolic link", "dangling link": "symbolic link", "socket": "socket",
                "device": "character device"}
    for kind, path in specials.items():
        with pytest.raises(UnsafePathError, match=expected[kind]):
            check_write_target(path)
        with pytest.raises(UnsafePathError, match=expected[kind]):
            check_write_target(path, folder=True)
    regular = tmp_path / "file.json"
    regular.write_text("{}")
    check_write_target(regular)
    check_write_target(tmp_path / "new" / "deeper" / "file.json")
    check_write_target(tmp_path, folder=True)
    with pytest.raises(UnsafePathError, match="is a folder"):
        check_write_target(tmp_path)
    with pytest.raises(UnsafePathError, match="not a folder"):
        check_write_target(regular / "inside.json")


def test_atomic_writes_leave_every_special_file_as_it_was(specials: dict[str, Path]) -> None:
    before = {kind: _identity(path) for kind, path in specials.items()}
    for path in specials.values():
        with pytest.raises(UnsafePathError):
            write_json(path, {"x": 1})
        with pytest.raises(UnsafePathError), atomic_dir(path) as tmp:
            (tmp / "a.png").write_bytes(b"png")
        with pytest.raises(UnsafePathError), atomic_path(path / "inside.json") as tmp:
            tmp.write_text("{}")
    assert {kind: _identity(path) for kind, path in specials.items()} == before
    assert sorted(p.name for p in specials["fifo"].parent.iterdir()) == sorted(p.name for p in specials.values())


def test_a_planted_lock_is_never_followed_or_truncated(exported_tiny_run: RunDir, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    victim = tmp_path / "victim.txt"
    victim.write_text("root's file")
    run.lock_path.symlink_to(victim)
    code, output = _cli(["generate", str(run.root), "-c", "1", "--n", "1", "--steps", "1"], capsys)
    assert code != 0 and "lock file" in _one_line_error(output) and "symbolic link" in output
    assert victim.read_text() == "root's file" and run.lock_path.is_symlink()
    assert not run.samples_dir.exists()
    run.lock_path.unlink()
    os.mkfifo(run.lock_path)  # opening a FIFO for the lock must neither hang nor be accepted
    with pytest.raises(UnsafePathError, match="FIFO"), run.writing("test"):
        pass
    assert stat.S_ISFIFO(os.lstat(run.lock_path).st_mode)


def _copy_run(source: RunDir, target: Path) -> None:
    import shutil

    shutil.copytree(source.root, target, ignore=shutil.ignore_patterns(LOCK_NAME, "samples"))


@pytest.mark.parametrize("entry", ["reports", "samples", "onnx"])
def test_run_entries_that_are_links_are_refused_before_any_write(exported_tiny_run: RunDir, tmp_path: Path,
                                                                 entry: str) -> None:
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    elsewhere = tmp_path / "system-folder"
    if entry == "onnx":
        (run.root / "onnx").rename(elsewhere)
    else:
        elsewhere.mkdir()
    (run.root / entry).symlink_to(elsewhere)
    before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
    with pytest.raises(UnsafePathError, match=f"run entry {run.root / entry} is a symbolic link"), \
            run.writing("test"):
        pass
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before


def test_export_overwrite_with_onnx_as_a_link_is_one_line(exported_tiny_run: RunDir, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    elsewhere = tmp_path / "shared-onnx"
    (run.root / "onnx").rename(elsewhere)
    (run.root / "onnx").symlink_to(elsewhere)
    before = {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*")}
    code, output = _cli(["export", str(run.root), "--overwrite", "--precision", "fp32"], capsys)
    assert code != 0 and "symbolic link" in _one_line_error(output)
    assert (run.root / "onnx").is_symlink() and {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*")} == before


@needs_root
def test_generate_out_on_a_device_is_refused_and_the_device_stays(exported_tiny_run: RunDir, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    device = _null_device(tmp_path / "full")
    before = _identity(device)
    for out in (device, device / "x"):
        code, output = _cli(["generate", str(exported_tiny_run.root), "-c", "1", "--n", "1", "--steps", "1",
                             "--out", str(out)], capsys)
        assert code != 0 and "character device" in _one_line_error(output), output
    assert _identity(device) == before and [p.name for p in tmp_path.iterdir()] == ["full"]


def test_json_to_a_fifo_link_or_device_is_refused_up_front(exported_tiny_run: RunDir, specials: dict[str, Path],
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    targets = [*specials.values(), stdout_link]
    before = {path: _identity(path) for path in targets}
    for path in targets:
        code, output = _cli(["info", str(exported_tiny_run.root), "--json", str(path)], capsys)
        assert code != 0 and "--json" in _one_line_error(output) and "'-' writes to stdout" in output
    out = tmp_path / "images"
    code, output = _cli(["generate", str(exported_tiny_run.root), "-c", "1", "--n", "1", "--steps", "1",
                         "--out", str(out), "--json", str(specials["fifo"])], capsys)
    assert code != 0 and "FIFO" in _one_line_error(output)
    assert not out.exists()  # refused before any work
    assert {path: _identity(path) for path in targets} == before
    code, output = _cli(["info", str(exported_tiny_run.root), "--json", "-"], capsys)
    assert code == 0 and json.loads(output[output.index("{"):])


# -- out of space ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tiny_tmpfs(folder: Path, size: str) -> Iterator[Path | None]:
    """A tmpfs of `size` mounted at `folder`, or None where mounting is not allowed."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_out_of_space_is_one_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {target}"), \
            atomic_path(target) as tmp, open("/dev/full", "wb") as full:
        tmp.write_text("partial")
        full.write(b"x" * 65536)
        full.flush()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as other, disk_full_as_error(target):
        raise OSError(errno.EACCES, "permission denied")
    assert not isinstance(other.value, DiskFullError)
    with _tiny_tmpfs(tmp_path / "small", "16k") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here: the /dev/full case above is the only out-of-space check")
        with pytest.raises(DiskFullError), atomic_path(small / "weights.bin") as tmp:
            tmp.write_bytes(b"w" * 1_000_000)
        with pytest.raises(DiskFullError), atomic_dir(small / "images") as tmp:
            for k in range(64):
                (tmp / f"{k}.png").write_bytes(b"p" * 4096)
        assert list(small.iterdir()) == []


@needs_root
def test_generate_onto_a_full_disk_is_one_line_and_writes_nothing(exported_tiny_run: RunDir, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with _tiny_tmpfs(tmp_path / "small", "8k") as small:
        if small is None:
            pytest.skip("cannot mount a tmpfs here")
        code, output = _cli(["generate", str(exported_tiny_run.root), "-c", "1", "--n", "16", "--steps", "1",
                             "--out", str(small / "images")], capsys)
        assert code == 1 and "no space left on device while writing" in _one_line_error(output), output
        assert list(small.iterdir()) == []


# -- leftovers of killed writers ---------------------------------------------------------------------------------

_KILLED_WRITER = """
import os, sys
from pathlib import Path
from mmgen_deploy.io_utils import atomic_dir, atomic_path
folder = Path(sys.argv[1])
with atomic_dir(folder / "images") as tmp:
    (tmp / "0000_a.png").write_bytes(b"png")
    with atomic_path(folder / "samples.json") as part:
        part.write_text("{")
        os.kill(os.getpid(), 9)
"""


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env)
    assert killed.wait() == -9
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and all(name.endswith(".tmp") for name in leftovers), leftovers
    live = tmp_path / f".images.p{os.getpid()}.abcd1234.tmp"  # this process's own: in use
    live.mkdir()
    fifo = tmp_path / ".grid.png.p999999.abcd1234.tmp"  # our pattern, but not something mmgen made
    os.mkfifo(fifo)
    link = tmp_path / ".x.p999999.abcd1234.tmp"
    link.symlink_to(tmp_path / "images")
    busy = tmp_path / f".busy.p{killed.pid}.abcd1234.tmp"  # a dead writer's, still being written (another
    busy.mkdir()                                            # container's writer, whose pid means nothing here)
    (busy / "weights.bin").write_bytes(b"w")
    write_json(tmp_path / "fresh.json", {})  # a killed writer seconds ago may still be being looked at
    assert all((tmp_path / name).exists() for name in leftovers)
    past = time.time() - STALE_DEAD_WRITER_S - 5
    for path in [*tmp_path.rglob("*")]:  # as if the writer died that long ago
        os.utime(path, (past, past), follow_symlinks=False)
    os.utime(busy / "weights.bin")  # written just now
    later = tmp_path / "later"
    later.mkdir()
    write_json(tmp_path / "later.json", {})  # a folder is swept once per process: use a new one
    write_json(later / "x.json", {})
    assert all((tmp_path / name).exists() for name in leftovers)  # same folder, same process: swept already
    code = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                           "from mmgen_deploy.io_utils import write_json; write_json(Path(sys.argv[1]), {})",
                           str(tmp_path / "next.json")], env=env).returncode
    assert code == 0
    remaining = {p.name for p in tmp_path.iterdir()}
    assert not remaining & set(leftovers)
    assert {live.name, busy.name, fifo.name, link.name, "fresh.json", "later.json", "next.json", "later"} == remaining


# -- two batches, one folder ------------------------------------------------------------------------------------

_HOLD_BATCH_OUT = """
import sys, time
from pathlib import Path
from mmgen_deploy.batch import writing_out
with writing_out(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_batch_into_the_same_out_is_refused(exported_tiny_run: RunDir, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"class": 1, "n": 2, "seed": 3}) + "\n")
    out = tmp_path / "out"
    argv = ["batch", str(exported_tiny_run.root), str(requests), "--out", str(out), "--steps", "1",
            "--backend", "onnxruntime", "--precision", "fp32"]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_BATCH_OUT, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, output = _cli(argv, capsys)
        assert code == 75 and f"pid {holder.pid}" in _one_line_error(output), output
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    code, output = _cli(argv, capsys)
    assert code == 0, output
    code, output = _cli(argv, capsys)  # a rerun adds nothing
    assert code == 0, output
    keys = [json.loads(line)["key"] for line in (out / "manifest.jsonl").read_text().splitlines() if line]
    assert len(keys) == 2 and len(set(keys)) == 2


@needs_root
@pytest.mark.parametrize("argv", [["train", "vqvae", "--steps", "1", "--out"], ["quickstart", "--out"],
                                  ["import", "--vq", "x", "--dit", "y", "--out"]])
def test_a_run_directory_that_is_a_device_is_refused(tmp_path: Path, argv: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    device = _null_device(tmp_path / "null")
    before = _identity(device)
    code, output = _cli([*argv, str(device)], capsys)
    assert code != 0 and "character device" in _one_line_error(output)
    assert _identity(device) == before and [p.name for p in tmp_path.iterdir()] == ["null"]


# -- exported graphs are the ones the export wrote ----------------------------------------------------------------

def _scale_first_weight(path: Path) -> None:
    """Edit the graph the way a tampering would: one weight tensor times 1.5, saved in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(numpy_helper.to_array(tensor) * 1.5), tensor.name))
    onnx.save(model, str(path))


def _backends() -> list[str]:
    import importlib.util

    return ["onnxruntime", *(["openvino"] if importlib.util.find_spec("openvino") else [])]


@pytest.mark.parametrize("backend", _backends())
def test_generate_refuses_a_graph_edited_after_the_export(exported_tiny_run: RunDir, tmp_path: Path, backend: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMGEN_CACHE_DIR", str(tmp_path / "cache"))
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    argv = ["generate", str(run.root), "-c", "1", "--n", "1", "--steps", "1", "--backend", backend,
            "--precision", "fp32", "--out", str(tmp_path / "images")]
    code, output = _cli(argv, capsys)
    assert code == 0, output
    _scale_first_weight(run.onnx_path("fp32", "denoiser"))
    code, output = _cli([*argv[:-1], str(tmp_path / "again")], capsys)
    line = _one_line_error(output)
    assert code == 1 and "denoiser.onnx (or its external data) is not the graph `mmgen export` wrote" in line
    assert f"mmgen export {run.root} --overwrite" in line and not (tmp_path / "again").exists()


def test_a_remembered_hash_does_not_hide_external_data_changed_in_place(exported_tiny_run: RunDir, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash of a large data file is remembered (keyed by inode, size, mtime and ctime) so opens after the
    first do not re-read it; a change that even restores the old mtime still changes the ctime."""
    from mmgen_deploy.export import export_run, read_manifest
    from mmgen_deploy.io_utils import SETTLED_NS
    from mmgen_deploy.onnx_files import data_path

    cache = tmp_path / "cache"
    monkeypatch.setenv("MMGEN_CACHE_DIR", str(cache))
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    export_run(run, precisions=("fp32",), components=("denoiser",), external_data=True)
    data = data_path(run.onnx_path("fp32", "denoiser"))
    assert data.is_file()
    time.sleep(SETTLED_NS / 1e9 + 0.2)  # only files left alone for a moment are remembered
    run.check_onnx_intact(read_manifest(run), "fp32", "denoiser")
    remembered = {json.loads(entry.read_text())["path"] for entry in (cache / "sha256").glob("*.json")}
    assert {str(data.resolve()), str(run.onnx_path("fp32", "denoiser").resolve())} <= remembered
    before = os.stat(data)
    with open(data, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(data).st_mtime_ns == before.st_mtime_ns and os.stat(data).st_size == before.st_size
    code, output = _cli(["generate", str(run.root), "-c", "1", "--n", "1", "--steps", "1", "--backend",
                         "onnxruntime", "--precision", "fp32", "--out", str(tmp_path / "images")], capsys)
    assert code == 1 and "is not the graph `mmgen export` wrote" in _one_line_error(output)
    data.unlink()
    with pytest.raises(RunDirError, match="missing beside it"):
        run.check_onnx_intact(read_manifest(run), "fp32", "denoiser")


def test_triton_repository_ships_only_the_graphs_the_export_wrote(exported_tiny_run: RunDir, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    _scale_first_weight(run.onnx_path("fp32", "decoder"))
    code, output = _cli(["triton-repo", str(run.root), "--out", str(tmp_path / "repo"), "--layout", "ensemble"],
                        capsys)
    assert code == 1 and "decoder.onnx (or its external data) is not the graph" in _one_line_error(output)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("command", [["parity", "--steps", "1", "--images", "1", "--batch-sizes", "1"],
                                     ["eval", "--samples-per-class", "1", "--steps", "1"]])
def test_reports_that_are_links_are_refused_before_the_work(exported_tiny_run: RunDir, tmp_path: Path,
                                                            command: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir(tmp_path / "run")
    _copy_run(exported_tiny_run, run.root)
    system = tmp_path / "etc"
    system.mkdir()
    (run.root / "reports").symlink_to(system)
    code, output = _cli([command[0], str(run.root), *command[1:]], capsys)
    assert code != 0 and f"run entry {run.root / 'reports'} is a symbolic link" in _one_line_error(output)
    assert list(system.iterdir()) == []
