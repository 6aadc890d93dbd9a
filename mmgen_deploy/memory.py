"""How much memory this process has and may still take, and the one-line refusal before a stage.

No torch, no onnx: the ONNX Runtime runner and the engine builder use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmgen_deploy.errors import MMGenError

GB = 1e9


class InsufficientMemoryError(MMGenError):
    """A stage would need more memory than the machine has available."""


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by a cgroup limit if there is one."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = int(limit) - usage
            available = room if available is None else min(available, room)
        break
    return available if available is not None else 1 << 62


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_memory(stage: str, need_bytes: int, hint: str, *, params: Sequence[str] = ()) -> None:
    """Refuse in one line when a stage's estimated peak (whole process) exceeds what this process
    has now plus what the machine has available. `need_bytes` is the estimated process peak; `params`:
    the settings `hint` names (`MMGenError.params`)."""
    have = rss_bytes() + available_bytes()
    if need_bytes > have:
        raise InsufficientMemoryError(
            f"{stage} needs about {need_bytes / GB:.1f} GB, this machine has {have / GB:.1f} GB available",
            hint, params=params)


def check_extra(stage: str, extra_bytes: int, hint: str, *, params: Sequence[str] = ()) -> None:
    """`check_memory` for a stage that adds `extra_bytes` to what this process holds now."""
    check_memory(stage, rss_bytes() + extra_bytes, hint, params=params)
