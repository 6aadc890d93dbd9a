"""Small file helpers: safe write targets, atomic writes, hashing, JSON, leftovers of killed writers, an
exclusive lock.

Every file or folder mmgen writes goes through `check_write_target` (directly, or through
`atomic_path` / `atomic_dir` / `exclusive_lock`): mmgen writes only regular files and real folders,
and never replaces, truncates or writes through a symbolic link, a device node, a FIFO or a socket.
A run folder received from someone else, or a mistyped `/dev/...`, so can never make it overwrite
something outside what it writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import DiskFullError, UnsafePathError

# -- what may be written ----------------------------------------------------------------------------------------

_SAFE_HINT = "choose another path: mmgen writes only regular files and folders, never through a link or into a " \
             "device, FIFO or socket"


def describe_file_type(mode: int) -> str:
    """What `mode` (an lstat st_mode) is, in words."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a regular file"


def check_write_target(path: str | os.PathLike[str], *, folder: bool = False, label: str = "",
                       param: str | None = None, hint: str = _SAFE_HINT) -> None:
    """Refuse (`UnsafePathError`, one line) to write `path` unless it is absent or, not followed as a
    link, a regular file (`folder=True`: a real folder), and its nearest existing parent is a folder.

    `label` prefixes the message (what the path is: "run directory"); `param`, the argument that named
    the path, prefixes it by name (`MMGenError.params`: the CLI prints its option). Links above `path`
    (a symlinked home or /tmp) are the user's own layout and are followed; the run directory checks
    its own entries (`RunDir.writing`).
    """
    path = Path(path)
    label = "{" + param + "}" if param else label
    params = [param] if param else []
    name = f"{label} {path}" if label else str(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:  # a parent is a file or device
        mode = None
    if mode is not None:
        if stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode):
            return
        raise UnsafePathError(f"{name} is {describe_file_type(mode)}, not a "
                              f"{'folder' if folder else 'regular file'} mmgen may write", hint, params=params)
    parent = path.parent
    while True:
        try:
            parent_mode = os.stat(parent).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(parent):  # a link to nothing: mkdir would fail on it, or make its target
                raise UnsafePathError(f"{name}: {parent} is a symbolic link to nothing, not a folder", hint,
                                      params=params) from None
            if parent == parent.parent:
                return
            parent = parent.parent
            continue
        if not stat.S_ISDIR(parent_mode):
            raise UnsafePathError(f"{name}: {parent} is {describe_file_type(parent_mode)}, not a folder", hint,
                                  params=params)
        return


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn running out of space (ENOSPC, or EDQUOT: the user's quota) while writing `path` into one
    `DiskFullError` line; the caller's cleanup (temp files) still runs as the error passes through."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device while writing {path}",
                                "free space on that disk or choose another output folder") from None
        raise


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree without following links (a link is removed, not its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _temp_prefix(target: Path) -> str:
    # The writer's pid in the name tells a later command whether the writer is still alive.
    return f".{target.name}.p{os.getpid()}."


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` only on success.

    A failure (or Ctrl-C) leaves `target` exactly as it was and removes the temp file; running
    out of space is one `DiskFullError` line. `target` must be absent or a regular file
    (`check_write_target`); stale temporaries of killed writers beside it are removed first.
    """
    target = Path(target)
    check_write_target(target)
    with disk_full_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            check_write_target(target)  # nothing was put in its place meanwhile
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` (an old one is removed).

    `target` must be absent or a real folder (`check_write_target`); out of space is one
    `DiskFullError` line, and the temporary folder is removed.
    """
    target = Path(target)
    check_write_target(target, folder=True)
    with disk_full_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            check_write_target(target, folder=True)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists() or old.is_symlink():
                    remove_path(old)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path | None:
    """mmgen's per-user cache: $MMGEN_CACHE_DIR, else $XDG_CACHE_HOME/mmgen, else ~/.cache/mmgen;
    MMGEN_CACHE_DIR="" turns every cache off. Nothing in it is needed: deleting it only costs time."""
    root = os.environ.get("MMGEN_CACHE_DIR")
    if root is not None:
        return Path(root) if root else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmgen"


def evict_least_recent(folder: Path, pattern: str, max_bytes: int, keep: Path) -> None:
    """Remove the files of `folder` matching `pattern` used longest ago (oldest mtime: readers
    touch what they use) until they total at most `max_bytes`; never `keep`, the file just
    written, even when it alone is over the limit."""
    files = []
    for path in folder.glob(pattern):
        with contextlib.suppress(OSError):
            stat = path.stat()
            files.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


# What writing a cache entry raises when the cache cannot take it: a read-only folder (OSError), a full
# disk (DiskFullError) or a cache path that is a file, link or device (UnsafePathError).
CACHE_WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, DiskFullError, UnsafePathError)


def store_in_cache(target: Path, write: Callable[[Path], object], replaces: str, max_bytes: int) -> None:
    """Write a cache entry atomically (`write(tmp)`, then rename to `target`), remove the older
    entries it replaces (the files of its folder matching `replaces`), and keep the folder's files
    of its suffix under `max_bytes`. CACHE_WRITE_ERRORS propagate: callers decide what a full,
    read-only or unusable cache costs them."""
    with atomic_path(target) as tmp:
        write(tmp)
    for old in target.parent.glob(replaces):
        if old != target:
            old.unlink(missing_ok=True)
    evict_least_recent(target.parent, f"*{target.suffix}", max_bytes, keep=target)


# How long a file must have been left alone before its hash is remembered.
SETTLED_NS = 2_000_000_000


def sha256_file_remembered(path: str | os.PathLike[str]) -> str:
    """`sha256_file`, remembered across processes for as long as the file is provably unchanged.

    The entry (in `cache_root()/sha256/`) is keyed by the file's absolute path and holds its device,
    inode, size, mtime and ctime: any write or rename over the file changes the ctime, which no
    copying tool can set back, so a changed file is always hashed again (and a file changed in the
    last 2 s is not remembered at all). This spares the 1-3 s that hashing a DiT's weights costs
    every command that checks an export against its weights.
    """
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    root = cache_root()
    entry = root / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json" if root else None
    if entry is not None:
        try:
            known = read_json(entry)
            if known.get("path") == str(path) and known.get("stat") == stamp:
                return str(known["sha256"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    digest = sha256_file(path)
    # Only a file that has been left alone for a while is remembered (git's "racily clean" rule):
    # timestamps have a coarse clock, and a rewrite within the same tick could keep all of them.
    settled = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS
    if entry is not None and settled and path.stat().st_ctime_ns == stat.st_ctime_ns:
        with contextlib.suppress(*CACHE_WRITE_ERRORS):
            write_json(entry, {"path": str(path), "stat": stamp, "sha256": digest})
    return digest


# -- leftovers of interrupted writers -------------------------------------------------------------------------

# `atomic_path` / `atomic_dir` name their temporaries `.<target>.p<writer pid>.<8 random chars>.tmp`
# (tempfile's alphabet; older versions wrote no pid) and `atomic_dir` parks the replaced target as
# `.<target>.old` during the swap.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+?)(?:\.p(?P<pid>\d+))?\.[a-z0-9_]{8}\.tmp$")
_OLD_NAME = re.compile(r"^\.(?P<target>.+)\.old$")
# A temporary whose writer (the pid in its name) is gone and in which nothing was written for this
# long is a leftover; any other (no pid, or a pid that may have been reused) only after a day
# untouched. The wait covers a writer in another container sharing the folder, whose pid means
# nothing here, while it computes between writes.
STALE_DEAD_WRITER_S = 600.0
STALE_ANY_WRITER_S = 24 * 3600.0

log = logging.getLogger("mmgen_deploy.io_utils")
_swept_folders: set[str] = set()


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _newest_mtime(path: str, info: os.stat_result) -> float:
    """The latest modification time of a file, or of a folder and everything in it (links not followed)."""
    newest = info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_stale_temps(folder: Path) -> list[Leftover]:
    """Remove the temporaries killed writers of `atomic_path` / `atomic_dir` left in `folder` (not below).

    Only names of mmgen's own pattern, only regular files and real folders (never links, devices
    or FIFOs), and only when not in use: the writer named in the temp name is dead and nothing in the
    entry changed for `STALE_DEAD_WRITER_S`, or anyone's entry untouched for a day. Writers outside
    a run directory hold no lock, so this is how the folder of `generate --out` or `batch --out`
    gets rid of what a SIGKILL left. Once per folder and process; errors are ignored (a leftover
    that stays costs disk space only).
    """
    key = str(folder.absolute())
    if key in _swept_folders:
        return []
    _swept_folders.add(key)
    found: list[Leftover] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            continue
        idle = now - _newest_mtime(entry.path, info)
        pid = match.group("pid")
        writer_gone = pid is not None and not _writer_alive(int(pid))
        if not ((writer_gone and idle > STALE_DEAD_WRITER_S) or idle > STALE_ANY_WRITER_S):
            continue
        path = Path(entry.path)
        size = tree_bytes(path)
        try:
            remove_path(path)
        except OSError:
            continue
        found.append(Leftover(path, size, "removed"))
        log.warning("%s", found[-1].describe())
    return found

@dataclass(frozen=True)
class Leftover:
    """A temporary file or folder that an interrupted (killed) writer left behind, and what was done with it."""

    path: Path
    bytes: int
    action: str  # "removed" or "restored"

    def describe(self) -> str:
        if self.action == "restored":
            return (f"restored {self.path.with_name(self.path.name[1:-4])} from {self.path.name}, the copy an "
                    "interrupted replacement had set aside")
        return f"removed {self.path} ({format_bytes(self.bytes)}), left behind by an interrupted command"


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _is_absent(path: Path, ignore: frozenset[str]) -> bool:
    return not path.exists() or (path.is_dir() and all(p.name in ignore for p in path.iterdir()))


def sweep_leftovers(folder: Path, *, recurse: bool = True, only_target: str | None = None,
                    ignore: frozenset[str] = frozenset()) -> list[Leftover]:
    """Remove the temporaries of `atomic_path` / `atomic_dir` found in `folder` (and below it).

    Call this only while no other writer can be working in `folder` (hold its lock): every
    match is then the leftover of a killed process. A `.<name>.old` whose `<name>` is gone
    (killed between the two renames of `atomic_dir`) is renamed back, so the previous
    version returns; one whose `<name>` exists is removed. `only_target` limits the sweep
    to temporaries of that one name (used for a run directory's own siblings);
    entries named in `ignore` do not count when deciding that `<name>` is gone.
    """
    found: list[Leftover] = []
    if not folder.is_dir():
        return found
    subfolders: list[Path] = []
    for entry in sorted(folder.iterdir()):
        temp, old = _TEMP_NAME.match(entry.name), _OLD_NAME.match(entry.name)
        match = temp or old
        if match is not None and (only_target is None or match.group("target") == only_target):
            target = entry.with_name(match.group("target"))
            mode = entry.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                continue  # not something mmgen made: a link, device or FIFO is left alone
            if old is not None and stat.S_ISDIR(mode) and _is_absent(target, ignore):
                if target.exists() or target.is_symlink():
                    remove_path(target)
                os.replace(entry, target)
                found.append(Leftover(entry, 0, "restored"))
                subfolders.append(target)
                continue
            size = tree_bytes(entry)
            if stat.S_ISDIR(mode):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            found.append(Leftover(entry, size, "removed"))
        elif entry.is_dir() and not entry.is_symlink():
            subfolders.append(entry)
    if recurse:
        for sub in subfolders:
            found.extend(sweep_leftovers(sub, recurse=True, ignore=ignore))
    return found


# -- one writer at a time -------------------------------------------------------------------------------------

class LockBusy(Exception):
    """The lock is held by another process; `holder` is what that process wrote into the lock file."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{path} is held by another process")
        self.path = path
        self.holder = holder


class _Held:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.depth = 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def read_lock_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def open_lock_file(path: Path) -> int:
    """Open (creating it) the lock file `path` for reading and writing, never through a link and only
    when it is a regular file: a lock planted as a link to another file (or a device, a FIFO) in a
    folder received from someone else must not make the holder overwrite that file."""
    hint = f"remove it (`rm {path}`): mmgen makes a new lock file"
    check_write_target(path, label="lock file", hint=hint)
    try:
        # O_NONBLOCK: opening a FIFO planted since the check must not hang (it is refused below).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link appeared since the check
            check_write_target(path, label="lock file", hint=hint)
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafePathError(f"lock file {path} is {describe_file_type(mode)}, not a regular file", hint)
    os.set_blocking(fd, True)
    return fd


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: dict[str, Any]) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if missing) without waiting for it.

    Re-entrant within one process (nested writers, such as `mmgen quickstart` running export,
    share the first one's lock); yields True for the outermost holder. Another process
    holding it raises `LockBusy` with what that process recorded (`holder`: pid, command,
    start time). The kernel drops the lock when its process dies, even by SIGKILL, so a
    lock file left behind never blocks anyone.
    """
    import fcntl

    key = str(path.parent.resolve() / path.name)  # the folder's links resolved, never the lock's own
    with _held_guard:
        held = _held.get(key)
        if held is None:
            fd = open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockBusy(path, read_lock_holder(path)) from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
            held = _held[key] = _Held(fd)
        held.depth += 1
        outermost = held.depth == 1
    try:
        yield outermost
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held[key]
                os.close(held.fd)  # releases the flock
