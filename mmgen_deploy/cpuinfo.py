"""What the CPU can do for inference: the instruction sets that decide the real ceiling.

FP32 is not the peak of a recent x86 CPU: AVX-512 BF16 and AMX run BF16 matrix multiplies
several times faster, and VNNI / AMX-INT8 do the same for INT8. Read from /proc/cpuinfo
(Linux); elsewhere every flag is reported as unknown (False) and nothing depends on it but
the `auto` choice and `mmgen doctor`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# flag in /proc/cpuinfo -> what it gives
FLAGS: dict[str, str] = {
    "avx512f": "AVX-512 (FP32)",
    "avx512_bf16": "AVX-512 BF16 dot products",
    "amx_tile": "AMX tiles",
    "amx_bf16": "AMX BF16 matrix multiply",
    "amx_int8": "AMX INT8 matrix multiply",
    "avx512_vnni": "AVX-512 VNNI (INT8 dot products)",
    "avx_vnni": "AVX VNNI (INT8 dot products)",
    "avx512_fp16": "AVX-512 FP16 arithmetic",
    "amx_fp16": "AMX FP16 matrix multiply",
}


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """BF16 matrix multiplies in hardware (AMX-BF16 or AVX-512 BF16)."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def present(self) -> list[str]:
        return [flag for flag in FLAGS if flag in self.flags]


def read_cpu_features(cpuinfo: str | None = None) -> CpuFeatures:
    """Parse /proc/cpuinfo text (or read it); unknown platforms give no flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return CpuFeatures(platform.processor() or platform.machine(), frozenset())
    flags: set[str] = set()
    model = platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return CpuFeatures(model, frozenset(flags))


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    return read_cpu_features()
