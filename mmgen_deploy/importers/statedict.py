"""State-dict checks shared by every layout: missing, unknown and mis-shaped tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mmgen_deploy.importers.safe_load import CheckpointError

StateDict = dict[str, torch.Tensor]


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tensor_state(obj: object, source: str) -> StateDict:
    """`obj` as a flat {name: tensor} dict, or a clear refusal."""
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    non_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {_listing(non_tensors)}",
                              "point at the weights (a state dict), not at a training checkpoint of another kind")
    return {str(k): v for k, v in obj.items()}


def require(state: StateDict, key: str, source: str, layout: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source} has no tensor {key!r}, which every {layout} checkpoint has",
                              "check that the file is of the layout given (or detected)")
    return state[key]


def count_indexed(state: StateDict, prefix: str, suffix: str) -> int:
    """How many consecutive i have f"{prefix}{i}{suffix}" in `state` (0, 1, 2, ... without gaps)."""
    n = 0
    while f"{prefix}{n}{suffix}" in state:
        n += 1
    return n


def fit_state(model: nn.Module, state: StateDict, source: str, *, layout: str) -> None:
    """Load `state` into `model` strictly, naming every problem in one message.

    Unknown keys (in the file, not in the model), missing keys (in the model, not in the
    file) and shape mismatches (tensor name and both shapes) are all listed, so one
    attempt shows everything that is wrong.
    """
    expected = model.state_dict()
    unknown = set(state) - set(expected)
    missing = set(expected) - set(state)
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch {_listing(mismatched, 4)}")
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unknown:
        problems.append(f"unknown keys {_listing(unknown)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the {layout} architecture read from it: " + "; ".join(problems),
                              "the file may be of another model family, truncated, or edited")
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
