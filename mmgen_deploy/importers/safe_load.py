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


# Pickle opcodes that push a string: STACK_GLOBAL takes its module and name from the last two.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING"}


def _pickle_bytes(path: Path) -> bytes:
    """The pickle program of a checkpoint: `data.pkl` of a torch.save zip, or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    with open(path, "rb") as file:
        return file.read(64 * 1024 * 1024)  # the object graph comes first; tensor bytes follow it


def _globals_it_calls(program: bytes) -> list[str]:
    """Every `module.name` the pickle program would import (and so could call), read with pickletools,
    which decodes the instructions without executing any of them. A legacy torch.save file holds
    several pickles one after another: each is read until one fails to decode."""
    import io
    import pickletools

    found: list[str] = []
    stream = io.BytesIO(program)
    while stream.tell() < len(program):
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in _STRING_OPS:
                    strings.append(str(arg))
                elif opcode.name == "GLOBAL" or opcode.name == "INST":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except (ValueError, EOFError, IndexError, UnicodeDecodeError):
            break  # past the pickles: raw tensor bytes
    # Protocols 0-2 spell the builtins module as Python 2 did.
    return list(dict.fromkeys(name.replace("__builtin__.", "builtins.", 1) for name in found))


def _allowed_global_names() -> set[str]:
    """What torch's restricted unpickler rebuilds (tensors, storages, containers), and ours."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in ALLOWED_GLOBALS}
    try:
        from torch import _weights_only_unpickler

        names |= set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: only the plainly safe names below
        names |= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    return names


def _refusal(path: Path, message: str) -> CheckpointError:
    """Why the restricted unpickler refused `path`, said as what loading it would do."""
    hint = ("if you trust the file, re-save its state dict as plain tensors (e.g. "
            "`torch.save(ckpt['state_dict'], 'clean.pt')` or safetensors) and import that")
    try:
        allowed = _allowed_global_names()
        calls = [name for name in _globals_it_calls(_pickle_bytes(path)) if name not in allowed]
    except (OSError, zipfile.BadZipFile, KeyError):
        calls = []
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match and not calls:  # what torch's loader named, when the instructions could not be read
        calls.append(match.group(1))
    if calls:
        named = ", ".join(f"`{name}`" for name in calls[:3])
        return CheckpointError(f"refusing {path}: this file would run code when loaded (it calls {named}); "
                               "nothing of it was run", hint)
    return CheckpointError(f"refusing {path}: it is a pickle in a form the safe loader does not read (not "
                           "torch.save's), and only tensors, containers and argparse.Namespace are allowed", hint)


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
        raise _refusal(path, str(exc)) from None
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
