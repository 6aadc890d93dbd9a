"""TensorRT / TensorRT-RTX engines: build, manifest and staleness checks.

Importing this package does not import TensorRT or touch CUDA; the submodule `builder`
does so only when called. Engines are run by `runtime.tensorrt_runner`.
"""

from mmgen_deploy.engines.flavour import RUNTIMES, Flavour, install_hint, installed_flavours, load_flavour
from mmgen_deploy.engines.manifest import (
    CorruptEngineError,
    EngineSet,
    StaleEngineError,
    check_engine_dir,
)

__all__ = [
    "RUNTIMES",
    "CorruptEngineError",
    "EngineSet",
    "Flavour",
    "StaleEngineError",
    "check_engine_dir",
    "install_hint",
    "installed_flavours",
    "load_flavour",
]
