"""Training data: the built-in procedural `shapes` set and user image folders.

`DataSpec` is the JSON-able description stored in run.json (``data``), from which the
same train/validation split can be rebuilt later (e.g. by `mmgen eval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.data.dataset import ImageData
from mmgen_deploy.errors import UsageError

BUILTIN_DATASETS = ("shapes",)


@dataclass(frozen=True)
class DataSpec:
    """`name` is "shapes" or "folder"; `path` only for folders."""

    name: str = "shapes"
    image_size: int = 32
    seed: int = 0
    num_train: int = 20000  # shapes only: images are generated, so their number is a choice
    num_val: int = 512
    val_fraction: float = 0.1  # folders only
    path: str | None = None
    # shapes only: this fraction of the 180 (colour, shape, size, position) combinations never
    # appears in the training split; text-to-image evaluation prompts come from them.
    holdout_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def parse(cls, text: str, *, image_size: int, seed: int) -> DataSpec:
        """`--data` value: a built-in name or a folder path."""
        if text in BUILTIN_DATASETS:
            return cls(name=text, image_size=image_size, seed=seed)
        path = Path(text).expanduser()
        if not path.is_dir():
            raise UsageError(f"--data {text!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                             "nor an existing folder", "pass `shapes` or the path of a folder of images")
        return cls(name="folder", image_size=image_size, seed=seed, path=str(path.resolve()))


def load_split(spec: DataSpec, split: str, progress=None) -> ImageData:
    """The `split` ("train" or "val") images of `spec`."""
    if spec.name == "shapes":
        from mmgen_deploy.data.shapes import make_shapes

        count = spec.num_train if split == "train" else spec.num_val
        if not 0.0 <= spec.holdout_fraction <= 0.5:
            raise UsageError(f"holdout fraction {spec.holdout_fraction} is out of range", "use a value in [0, 0.5]")
        return make_shapes(count, seed=spec.seed, image_size=spec.image_size, split=split,
                           holdout_fraction=spec.holdout_fraction)
    if spec.name == "folder":
        from mmgen_deploy.data.folder import load_folder

        if spec.path is None:
            raise UsageError("folder dataset without a path", "pass --data PATH")
        data = load_folder(spec.path, spec.image_size, progress=progress)
        order = np.random.default_rng(spec.seed).permutation(len(data))
        num_val = min(len(data) - 1, max(1, round(spec.val_fraction * len(data)))) if len(data) > 1 else 0
        if num_val == 0:  # a single image: validate on it rather than on nothing
            return data
        return data.subset(np.sort(order[:num_val] if split == "val" else order[num_val:]))
    raise UsageError(f"unknown dataset {spec.name!r}", f"use one of {', '.join(BUILTIN_DATASETS)} or a folder")


__all__ = ["BUILTIN_DATASETS", "DataSpec", "ImageData", "load_split"]
