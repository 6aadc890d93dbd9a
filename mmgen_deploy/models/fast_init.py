"""Build a model whose weights are about to be loaded without initialising them first.

Random initialisation of a DiT-XL/2 (675M parameters) takes a minute on a busy 2-core machine
and is thrown away by the `load_state_dict` that follows. Inside `skip_weight_init()` the
`torch.nn.init` functions do nothing, so parameters are allocated but not filled; everything
else a constructor computes (buffers such as position tables) is unchanged. Only for models
whose every parameter is then loaded (the run directory refuses a state dict with missing keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    saved: dict[str, Any] = {}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    for name in _INIT_FUNCTIONS:
        if hasattr(torch.nn.init, name):
            saved[name] = getattr(torch.nn.init, name)
            setattr(torch.nn.init, name, keep)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)
