"""From a SampleResult to files: PNGs with metadata (an audio run: 16-bit WAVs with the settings in
their INFO chunk), a grid (of spectrograms, for audio), a JSON sidecar."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.numerics import make_grid, to_pil
from mmgen_deploy.sampling.conditioning import class_name
from mmgen_deploy.sampling.loop import SampleResult

# The spectrogram grid of an audio run is drawn this many times larger (nearest neighbour).
AUDIO_GRID_UPSCALE = 4


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "class"


def image_entry(config: ModelConfig, k: int, *, class_id: int | None = None, prompt: str | None = None,
                prefix: str = "") -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]]:
    """samples.json entry (file name included) and PNG condition chunks of image number k."""
    if prompt is not None:  # a text model: the prompt is what the image was asked to show
        filename = f"{prefix}{k:04d}_{_slug(prompt)[:60].strip('-') or 'prompt'}.png"
        return {"file": filename, "index": k, "prompt": prompt}, (("prompt", prompt),)
    assert class_id is not None
    name = class_name(config, class_id)
    filename = f"{prefix}{k:04d}_{_slug(name)}.png"
    return ({"file": filename, "index": k, "class": name, "class_id": class_id},
            (("class", name), ("class_id", class_id)))


def image_settings(*, seed: int, steps: int, sampler: str, cfg_scale: float, eta: float, cache: str, backend: str,
                   precision: str, device: str) -> tuple[tuple[str, Any], ...]:
    """Every setting that changes an image besides its condition and index, as (name, value) pairs: the
    PNG text chunks `generate`, `batch` and `client` write (and the settings samples.json records), so an
    image can be made again from what it carries. The pixels are bit-identical only on the same backend,
    precision, device and thread count (see the --seed help)."""
    return (("seed", seed), ("steps", steps), ("sampler", sampler), ("cfg_scale", cfg_scale), ("eta", eta),
            ("cache", cache), ("backend", backend), ("precision", precision), ("device", device))


def result_settings(result: SampleResult) -> tuple[tuple[str, Any], ...]:
    """`image_settings` of the images of one `sample` result."""
    return image_settings(seed=result.seed, steps=result.steps, sampler=result.sampler, cfg_scale=result.cfg_scale,
                          eta=result.eta, cache=result.cache.policy, backend=result.backend,
                          precision=result.precision, device=result.device)


def save_png(image: np.ndarray, path: Path, chunks: Sequence[tuple[str, Any]]) -> None:
    """One image as PNG with `generate`'s text chunks (class or prompt, index, seed, steps, ...)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks:
        # tEXt chunks; Pillow writes a UTF-8 iTXt instead for a prompt that Latin-1 cannot hold.
        info.add_text(key, str(value))
    to_pil(image).save(path, format="PNG", pnginfo=info)


def write_samples(result: SampleResult, config: ModelConfig, directory: Path, *, images_per_class: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one PNG per image (metadata in PNG text chunks), grid.png and samples.json into `directory`.

    Returns the sidecar's content. `directory` is expected to be a fresh temporary folder
    (the caller renames it into place), so nothing here needs to be atomic.
    """
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    settings = result_settings(result)
    for k, image in enumerate(result.images):
        entry, condition = image_entry(config, k, prompt=result.prompts[k] if result.prompts else None,
                                       class_id=None if result.prompts else result.class_ids[k])
        if result.audio is not None and config.audio is not None:  # the clip, its settings in the INFO chunk
            from mmgen_deploy.data.wav import write_wav

            entry["file"] = entry["file"].removesuffix(".png") + ".wav"
            write_wav(directory / entry["file"], result.audio[k], config.audio.sample_rate,
                      settings={key: value for key, value in (*condition, ("index", k), *settings)})
        else:
            save_png(image, directory / entry["file"], (*condition, ("index", k), *settings))
        entries.append(entry)
    columns = images_per_class if 1 < images_per_class <= 16 else math.ceil(math.sqrt(len(result.images)))
    columns = max(1, min(columns, len(result.images)))
    grid = to_pil(make_grid(result.images, columns))
    if result.audio is not None:  # spectrograms are small: each pixel a block people can see
        grid = grid.resize((grid.width * AUDIO_GRID_UPSCALE, grid.height * AUDIO_GRID_UPSCALE), 0)
    grid.save(directory / "grid.png")
    sidecar: dict[str, Any] = {
        "settings": {"seed": result.seed, "steps": result.steps, "sampler": result.sampler,
                     "cfg_scale": result.cfg_scale, "eta": result.eta, "cache": result.cache.policy,
                     "batch_size": result.batch_size, "images_per_class": images_per_class,
                     "timesteps": result.timesteps},
        "backend": {"backend": result.backend, "precision": result.precision, "device": result.device},
        "timing": result.timing(),
        "cache": result.cache.to_dict(),
        "images": entries,
        "grid": "grid.png",
    }
    if result.audio is not None and config.audio is not None:
        sidecar["audio"] = {"sample_rate": config.audio.sample_rate, "samples": int(result.audio.shape[1]),
                            "format": "16-bit PCM WAV, mono", "grid": "spectrograms, high frequencies at the top"}
    if result.prompts:
        sidecar["prompts"] = list(dict.fromkeys(result.prompts))
        sidecar["settings"]["images_per_prompt"] = sidecar["settings"].pop("images_per_class")
        sidecar["timing"]["text_encoder_seconds"] = result.text_encoder_seconds
    sidecar.update(extra or {})
    return sidecar
