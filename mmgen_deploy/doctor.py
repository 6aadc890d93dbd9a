"""Environment report: what this machine can run, and with which versions."""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import asdict, dataclass


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


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
