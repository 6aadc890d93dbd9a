"""Default step counts per preset, and creating (or refusing to reuse) a run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.io_utils import remove_path
from mmgen_deploy.rundir import RUN_ENTRIES as _RUN_ENTRIES
from mmgen_deploy.rundir import RunDir


@dataclass(frozen=True)
class TrainRecipe:
    """Default training lengths (and, where a preset needs them, DiT batch size and learning rate).

    The tiny numbers fit the quickstart's 8-minute CPU budget: on a budget of wall-clock time, a
    small DiT learns more from many small-batch steps at a high learning rate than from fewer large
    ones (measured: docs/design/dit-recipe.md).
    """

    vq_steps: int
    dit_steps: int
    dit_batch_size: int | None = None  # None: DiTTrainSettings' default
    dit_lr: float | None = None
    text_lr_scale: float | None = None  # text encoder rate / DiT rate; None: DiTTrainSettings' default


_RECIPES = {
    # DiT batch 64 at lr 6e-3: at a fixed 200 s, batch 128 / lr 1e-3 reached 19% conditional
    # accuracy, batch 64 / lr 4e-3 79%, batch 64 / lr 6e-3 87%; lr 1e-2 diverged (19%).
    "tiny": TrainRecipe(vq_steps=500, dit_steps=4000, dit_batch_size=64, dit_lr=6e-3),
    # Text-to-image on the tiny preset (`mmgen quickstart --text`, 12-minute CPU budget): the text
    # encoder trains jointly with the DiT, so a step costs ~1.4x a class step with pooled
    # conditioning (the quickstart's) and ~1.8x with cross-attention (benchmarks/text_train_bench.py).
    # The text encoder at 1/6 of the DiT's rate (1e-3): at 6e-3 its residual stream grew to a norm
    # of ~1000 from embeddings of norm ~3, and single words drowned: "top" and "bottom" pooled to
    # vectors 1e-3 apart, so position followed the prompt 38% of the time (100% at 1e-3).
    "tiny+text": TrainRecipe(vq_steps=500, dit_steps=5000, dit_batch_size=64, dit_lr=6e-3, text_lr_scale=1 / 6),
}
_DEFAULT = TrainRecipe(vq_steps=20000, dit_steps=100000)
TEXT_RECIPE_SUFFIX = "+text"


def recipe_for(preset_name: str, *, text: bool = False) -> TrainRecipe:
    """The default step counts of `preset_name`; a text-to-image model may have its own."""
    if text and preset_name + TEXT_RECIPE_SUFFIX in _RECIPES:
        return _RECIPES[preset_name + TEXT_RECIPE_SUFFIX]
    return _RECIPES.get(preset_name, _DEFAULT)


def _describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _describe_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            return f"{prefix}{key}: {a!r} there, {b!r} requested"
    return None


def prepare_run(out: Path, config: ModelConfig, data: dict[str, Any], *, overwrite: bool,
                resume: bool = False) -> RunDir:
    """A run directory for `config` trained on `data`.

    An existing run of the same model and data is reused (to resume, or to train the
    next stage); one of another model is refused unless `overwrite`, and then only the
    run's own entries are removed. A non-empty folder that is not a run is never touched.
    """
    run = RunDir(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder", "choose another {out}", params=["out"])
    if run.exists():
        existing_config = run.load_config() if not overwrite else None
        existing_data = run.read_meta().get("data", {})
        if existing_data:  # fields added since the run was made compare at their defaults
            from mmgen_deploy.data import DataSpec

            existing_data = DataSpec.from_dict(existing_data).to_dict()
        if existing_config is not None:
            difference = _describe_difference(
                {"model": existing_config.to_dict(), "data": existing_data},
                {"model": config.to_dict(), "data": data})
            if difference is None:
                return run
            raise RunDirError(f"{out} already holds a different model ({difference})",
                              "pass {overwrite} to replace it, or choose another {out}",
                              params=["overwrite", "out"])
        if resume:
            raise UsageError("{resume} and {overwrite} contradict each other", "use one of them",
                             params=["resume", "overwrite"])
        for name in _RUN_ENTRIES:
            remove_path(out / name)  # a link is removed, never followed
    elif out.is_dir() and not run.is_empty():
        raise RunDirError(f"{out} is a non-empty folder that is not an mmgen run directory",
                          "choose an empty or new folder for {out}", params=["out"])
    elif resume:
        raise RunDirError(f"nothing to resume in {out}", "train without {resume} first", params=["resume"])
    run.initialize(config, data=data)
    return run
