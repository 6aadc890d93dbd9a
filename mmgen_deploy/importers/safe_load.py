"""Load checkpoint files without ever executing code from them.

safetensors files hold nothing but tensors. Everything else goes through
`torch.load(weights_only=True)`, PyTorch's restricted unpickler, which only rebuilds
tensors and plain containers. The only extra class allowed is `argparse.Namespace`
(official DiT train.py checkpoints store their command-line arguments as one), and only
for the duration of this one call. A pickle that asks for any other global is refused
with the name of that global; nothing it references is imported or called.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import MMGenError

# Exactly the classes these layouts need beyond tensors and containers. Keep this short:
# every entry is a class the unpickler may construct from untrusted bytes.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(MMGenError):
    """A checkpoint that cannot be imported (unsafe, unreadable or of an unknown layout)."""


def _refused_construct(message: str) -> str:
    """What the restricted unpickler refused, from its (long, multi-line) message."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"the class or function `{match.group(1)}`"
    match = re.search(r"Unsupported operand (\d+)", message)
    if match:
        return f"pickle instruction {match.group(1)}, which the restricted loader does not accept"
    return "a pickle construct that is not plain data"


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read `path` safely: a dict of tensors for safetensors, the unpickled object otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors has its own error types for each kind of damage
            raise CheckpointError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}",
                                  "re-download or re-export it") from None
    import torch

    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            # torch warns about pickle protocols it did not write itself; the refusal below says enough.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _refused_construct(str(exc))
        raise CheckpointError(
            f"refused to load {path}: it needs {what}, and loading it could run code from the file "
            "(only tensors, containers and argparse.Namespace are allowed)",
            "if you trust the file, re-save its state dict as plain tensors "
            "(e.g. `torch.save(ckpt['state_dict'], 'clean.pt')` or safetensors) and import that",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first}",
                              "check that the download is complete") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a config.json, model_index.json, shard index), or a
    CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
