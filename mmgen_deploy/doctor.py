"""Environment report: what this machine can run, and with which versions."""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmgen_deploy.cpuinfo import CpuFeatures


@dataclass
class Check:
    name: str
    status: str  # "ok", "missing", "warn"
    version: str
    detail: str = ""


def _module_version(module_name: str) -> tuple[object | None, str]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a library that fails to load its .so
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return module, str(getattr(module, "__version__", "?"))


def collect() -> list[Check]:
    from mmgen_deploy import __version__

    checks = [
        Check("python", "ok", platform.python_version(), f"{sys.executable} ({platform.machine()})"),
        Check("mmgen-deploy", "ok", __version__),
    ]
    torch, version = _module_version("torch")
    if torch is None:
        checks.append(Check("torch", "missing", "-", version))
    else:
        cuda = torch.cuda.is_available()  # type: ignore[attr-defined]
        detail = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"  # type: ignore[attr-defined]
        checks.append(Check("torch", "ok", version, detail))
        if cuda:
            for i in range(torch.cuda.device_count()):  # type: ignore[attr-defined]
                props = torch.cuda.get_device_properties(i)  # type: ignore[attr-defined]
                checks.append(Check(f"cuda:{i}", "ok", f"sm_{props.major}{props.minor}",
                                    f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        else:
            checks.append(Check("cuda devices", "warn", "-", "none visible to torch (CPU only)"))
    for mod, label in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        module, version = _module_version(mod)
        if module is None:
            checks.append(Check(label, "missing", "-", version))
            continue
        detail = ""
        if mod == "onnxruntime":
            detail = "providers: " + ", ".join(module.get_available_providers())  # type: ignore[attr-defined]
        elif mod == "onnx":
            detail = f"max opset {module.defs.onnx_opset_version()}"  # type: ignore[attr-defined]
        checks.append(Check(label, "ok", version, detail))
    checks += cpu_checks(torch)
    checks.append(cache_check())
    checks += backend_checks()
    for mod, label, hint in (
        ("tensorrt", "tensorrt", "pip install 'mmgen-deploy[tensorrt]' (x86) or JetPack's python3-libnvinfer"),
        ("tensorrt_rtx", "tensorrt-rtx", "pip install 'mmgen-deploy[rtx]' (RTX PCs; builds engines without a GPU)"),
        ("polygraphy", "polygraphy", "pip install polygraphy"),
        ("modelopt", "modelopt (AutoCast)", "pip install 'mmgen-deploy[fp16]'"),
    ):
        module, version = _module_version(mod)
        if module is not None and mod.startswith("tensorrt") and not hasattr(module, "Builder"):
            module = None  # e.g. only `tensorrt-stubs` installed: a namespace package, no library
        if module is None:
            checks.append(Check(label, "missing", "-", hint))
        else:
            checks.append(Check(label, "ok", version))
    return checks


def cache_check() -> Check:
    """Where mmgen keeps what it can recompute (OpenVINO blobs, graphs rewritten for ONNX Runtime,
    remembered hashes), and how big it is."""
    from mmgen_deploy.io_utils import cache_root, format_bytes, tree_bytes
    from mmgen_deploy.runtime.openvino_runner import cache_limit_bytes

    root = cache_root()
    if root is None:
        return Check("mmgen cache", "ok", "off", "MMGEN_CACHE_DIR is empty: nothing is kept between processes")
    blobs = list((root / "openvino").glob("*.blob")) if (root / "openvino").is_dir() else []
    graphs = list((root / "onnxruntime").glob("*.onnx")) if (root / "onnxruntime").is_dir() else []
    size = tree_bytes(root) if root.exists() else 0
    return Check("mmgen cache", "ok", format_bytes(size),
                 f"{root}: {len(blobs)} OpenVINO blobs (limit {format_bytes(cache_limit_bytes())}, "
                 f"MMGEN_OPENVINO_CACHE_GB), {len(graphs)} graphs rewritten for ONNX Runtime; safe to "
                 "delete, MMGEN_CACHE_DIR= turns it off")


def cpu_checks(torch: object | None) -> list[Check]:
    """The CPU's BF16 / INT8 units (the real ceiling of a CPU-class box) and the runtimes that use them."""
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime.openvino_runner import openvino_available

    features = cpu_features()
    checks = [Check("cpu", "ok", features.model,
                    "flags: " + (", ".join(features.present()) or "no AVX-512 / BF16 / AMX / VNNI"))]
    openvino, version = _module_version("openvino") if openvino_available() else (None, "")
    ov_caps = ""
    if openvino is not None:
        try:
            core = openvino.Core()  # type: ignore[attr-defined]
            devices = list(core.available_devices)
            caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            ov_caps = ", ".join(caps)
            checks.append(Check("openvino", "ok", str(openvino.get_version()).split("-")[0],  # type: ignore[attr-defined]
                                f"devices: {', '.join(devices)}; CPU capabilities: {ov_caps}"))
        except Exception as exc:  # a broken install: say so, do not crash the report
            checks.append(Check("openvino", "warn", version, f"{type(exc).__name__}: {exc}"))
    else:
        checks.append(Check("openvino", "missing", "-", "pip install 'mmgen-deploy[openvino]' (BF16 on AMX / "
                            "AVX-512 BF16 CPUs, Intel GPUs and NPUs)"))
    torch_bf16 = False
    if torch is not None:
        try:
            torch_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # type: ignore[attr-defined]
        except Exception:
            torch_bf16 = False
    checks.append(cpu_bf16_check(features, openvino_bf16="BF16" in ov_caps, torch_bf16=torch_bf16))
    int8 = [name for name, flag in (("AMX-INT8", "amx_int8"), ("AVX-512 VNNI", "avx512_vnni"),
                                    ("AVX VNNI", "avx_vnni")) if flag in features.flags]
    if int8:
        int8_users = ["onnxruntime (quantized Q/DQ graphs)"] + (["openvino"] if "INT8" in ov_caps else [])
        checks.append(Check("cpu int8", "ok", " + ".join(int8), "used by: " + "; ".join(int8_users)))
    else:
        checks.append(Check("cpu int8", "warn", "-", "no VNNI / AMX-INT8: INT8 graphs gain little here"))
    return checks


def cpu_bf16_check(features: CpuFeatures, *, openvino_bf16: bool, torch_bf16: bool) -> Check:
    """The `cpu bf16` row: AMX (BF16 pays: `auto` picks OpenVINO BF16 for large models), AVX-512 BF16
    without AMX (BF16 runs, but no faster than FP32: `auto` keeps FP32), or no BF16 units at all."""
    from mmgen_deploy.runtime.backends import OPENVINO_BF16_MIN_GFLOP, bf16_units

    users = (["openvino (precision bf16)"] if openvino_bf16 else []) + \
        (["torch autocast (oneDNN; backend torch, precision bf16)"] if torch_bf16 else [])
    used_by = "used by: " + ("; ".join(users) if users else "nothing installed (install OpenVINO)")
    if features.amx:
        auto = (f"auto picks OpenVINO BF16 for denoisers of {OPENVINO_BF16_MIN_GFLOP:g}+ GFLOP per evaluation"
                if openvino_bf16 else "auto would pick OpenVINO BF16 for large models once OpenVINO is installed")
        return Check("cpu bf16", "ok" if users else "warn", bf16_units(features),
                     f"AMX: BF16 matrix multiplies several times faster than FP32; {auto}; {used_by}")
    if features.native_bf16:
        return Check("cpu bf16", "warn", bf16_units(features),
                     "AVX-512 BF16 without AMX: BF16 runs but is no faster than FP32 here, so auto keeps "
                     f"ONNX Runtime FP32; {used_by}")
    return Check("cpu bf16", "warn", "-", "no BF16 units: FP32 is this CPU's fastest exact path")


def backend_checks() -> list[Check]:
    """One row per registry backend (installed or not, what it runs where) and one for the auto order."""
    from mmgen_deploy.runtime.backends import REGISTRY, capabilities, describe_auto_order

    rows = []
    for name, runs in capabilities():
        missing = REGISTRY[name].missing()
        rows.append(Check(f"backend {name}", "missing" if missing else "ok", "-" if missing else "installed",
                          missing or runs))
    rows.append(Check("backend auto", "ok", "order", describe_auto_order()))
    return rows


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
