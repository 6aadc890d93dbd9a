"""Training data: the built-in procedural `shapes` (images) and `tones` (audio) sets, and user
folders of images or WAV files.

`DataSpec` is the JSON-able description stored in run.json (``data``), from which the
same train/validation split can be rebuilt later (e.g. by `mmgen eval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy.data.dataset import AudioData, ImageData
from mmgen_deploy.errors import UsageError

if TYPE_CHECKING:
    from mmgen_deploy.config import AudioConfig

BUILTIN_DATASETS = ("shapes", "tones")
# The data sets of sound: their clips become spectrogram images (`data.spectrogram`).
AUDIO_DATASETS = ("tones", "wav_folder")
# `tones` clips generated for training by default (each is rendered, so their number is a choice).
TONES_NUM_TRAIN = 6000


@dataclass(frozen=True)
class DataSpec:
    """`name` is "shapes", "tones", "folder" (images) or "wav_folder"; `path` only for folders. For
    audio data `image_size` is the spectrogram's side."""

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

    @property
    def is_audio(self) -> bool:
        return self.name in AUDIO_DATASETS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def parse(cls, text: str, *, image_size: int, seed: int) -> DataSpec:
        """`--data` value: a built-in name or a folder path."""
        if text == "tones":
            return cls(name=text, image_size=image_size, seed=seed, num_train=TONES_NUM_TRAIN)
        if text in BUILTIN_DATASETS:
            return cls(name=text, image_size=image_size, seed=seed)
        path = Path(text).expanduser()
        if not path.is_dir():
            raise UsageError(f"{{data}} {text!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                             "nor an existing folder",
                             "pass `shapes`, `tones` or the path of a folder of images or WAV files", params=["data"])
        from mmgen_deploy.data.audio_folder import holds_audio

        name = "wav_folder" if holds_audio(path) else "folder"
        return cls(name=name, image_size=image_size, seed=seed, path=str(path.resolve()))


def _held_out(count: int, spec: DataSpec, split: str) -> np.ndarray | None:
    """The indices of a user folder's `split` (a seeded `val_fraction` is held out), or None for all."""
    order = np.random.default_rng(spec.seed).permutation(count)
    num_val = min(count - 1, max(1, round(spec.val_fraction * count))) if count > 1 else 0
    if num_val == 0:  # a single item: validate on it rather than on nothing
        return None
    return np.sort(order[:num_val] if split == "val" else order[num_val:])


def load_audio_split(spec: DataSpec, split: str, progress=None) -> AudioData:
    """The `split` ("train" or "val") clips of an audio data set."""
    if spec.name == "tones":
        from mmgen_deploy.data.tones import make_tones

        return make_tones(spec.num_train if split == "train" else spec.num_val, seed=spec.seed, split=split)
    if spec.name == "wav_folder":
        from mmgen_deploy.data.audio_folder import load_audio_folder

        if spec.path is None:
            raise UsageError("folder dataset without a path", "pass {data} PATH", params=["data"])
        data = load_audio_folder(spec.path, progress=progress)
        chosen = _held_out(len(data), spec, split)
        return data if chosen is None else data.subset(chosen)
    raise UsageError(f"{spec.name!r} is not an audio data set", f"use one of {', '.join(AUDIO_DATASETS)}")


def load_split(spec: DataSpec, split: str, progress=None, *, audio: AudioConfig | None = None) -> ImageData:
    """The `split` ("train" or "val") images of `spec`; for audio data, the clips' one-channel
    spectrograms (N, S, S, 1) made with `audio` (the run's transform; by default the one for the
    spectrogram side, `config.audio_layout`)."""
    if spec.is_audio:
        from mmgen_deploy.config import audio_layout
        from mmgen_deploy.data.spectrogram import clips_to_uint8

        clips = load_audio_split(spec, split, progress=progress)
        transform = audio or audio_layout(spec.image_size)
        return ImageData(clips_to_uint8(clips.clips, transform)[..., None], clips.labels, clips.captions,
                         clips.class_names)
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
            raise UsageError("folder dataset without a path", "pass {data} PATH", params=["data"])
        data = load_folder(spec.path, spec.image_size, progress=progress)
        chosen = _held_out(len(data), spec, split)
        return data if chosen is None else data.subset(chosen)
    raise UsageError(f"unknown dataset {spec.name!r}", f"use one of {', '.join(BUILTIN_DATASETS)} or a folder")


__all__ = ["AUDIO_DATASETS", "BUILTIN_DATASETS", "AudioData", "DataSpec", "ImageData", "load_audio_split",
           "load_split"]
