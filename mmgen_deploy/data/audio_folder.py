"""User WAV files from a folder, in the layouts image folders use (see `data.folder`): class
sub-folders (``ROOT/<class name>/<clip>.wav``) and/or ``metadata.jsonl`` lines of
``{"file_name": ..., "text": ...}``.

Every clip is brought to the `tones` format: several channels are averaged to mono, the first
`CLIP_SECONDS` are kept and a shorter clip is padded with silence at its end. Another sample rate
is refused (resampling would change what the user hears; the message says how to convert), and so
is a silent clip (there is nothing to learn from it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmgen_deploy.data.dataset import AudioData
from mmgen_deploy.data.folder import scan_folder
from mmgen_deploy.data.tones import CLIP_SAMPLES, SAMPLE_RATE
from mmgen_deploy.data.wav import read_wav
from mmgen_deploy.errors import MMGenError

AUDIO_SUFFIXES = (".wav",)
# A clip whose loudest sample stays below this (about -80 dBFS) is silence.
SILENCE_PEAK = 1e-4


def holds_audio(root: Path) -> bool:
    """Whether a folder is one of WAV files (it holds some, in it or its sub-folders)."""
    return any(path.suffix.lower() in AUDIO_SUFFIXES and path.is_file() and not path.name.startswith(".")
               for path in root.rglob("*"))


def load_clip(path: Path, sample_rate: int = SAMPLE_RATE, num_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """One WAV file as a mono (num_samples,) float32 clip (see the module doc for the conversions)."""
    wav = read_wav(path)
    if wav.sample_rate != sample_rate:
        raise MMGenError(f"{path} is sampled at {wav.sample_rate} Hz, not {sample_rate} Hz",
                         f"convert it first, e.g. `sox {path.name} -r {sample_rate} out.wav` or "
                         f"`ffmpeg -i {path.name} -ar {sample_rate} out.wav`")
    mono = wav.samples.mean(axis=1)[:num_samples]
    if float(np.abs(mono).max(initial=0.0)) < SILENCE_PEAK:
        raise MMGenError(f"{path} is silent (its first {num_samples / sample_rate:g} s stay below "
                         f"{SILENCE_PEAK:g} of full scale)", "remove the file or replace it with a recording")
    clip = np.zeros(num_samples, dtype=np.float32)
    clip[:len(mono)] = mono
    return clip


def load_audio_folder(root: str | Path, progress=None) -> AudioData:
    """Load every WAV of `root` (see the module doc for the layouts and conversions)."""
    paths, labels, texts, class_names = scan_folder(root, AUDIO_SUFFIXES, kind="WAV files", builtin="tones")
    clips = []
    for path in paths:
        clips.append(load_clip(path))
        if progress is not None:
            progress()
    return AudioData(np.stack(clips), np.asarray(labels, dtype=np.int64), texts, class_names, SAMPLE_RATE)
