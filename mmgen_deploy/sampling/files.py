"""From a SampleResult to files: PNGs with metadata, a grid, a JSON sidecar."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.numerics import make_grid, to_pil
from mmgen_deploy.sampling.conditioning import class_name
from mmgen_deploy.sampling.loop import SampleResult


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "class"


def write_samples(result: SampleResult, config: ModelConfig, directory: Path, *, images_per_class: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one PNG per image (metadata in PNG text chunks), grid.png and samples.json into `directory`.

    Returns the sidecar's content. `directory` is expected to be a fresh temporary folder
    (the caller renames it into place), so nothing here needs to be atomic.
    """
    from PIL.PngImagePlugin import PngInfo

    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    settings = (("seed", result.seed), ("steps", result.steps), ("sampler", result.sampler),
                ("cfg_scale", result.cfg_scale), ("backend", result.backend), ("precision", result.precision))
    for k, image in enumerate(result.images):
        entry: dict[str, Any]
        if result.prompts:  # a text model: the prompt is what the image was asked to show
            prompt = result.prompts[k]
            filename = f"{k:04d}_{_slug(prompt)[:60].strip('-') or 'prompt'}.png"
            entry = {"file": filename, "index": k, "prompt": prompt}
            condition: tuple[tuple[str, Any], ...] = (("prompt", prompt),)
        else:
            class_id = result.class_ids[k]
            name = class_name(config, class_id)
            filename = f"{k:04d}_{_slug(name)}.png"
            entry = {"file": filename, "index": k, "class": name, "class_id": class_id}
            condition = (("class", name), ("class_id", class_id))
        info = PngInfo()
        for key, value in (*condition, ("index", k), *settings):
            # tEXt chunks; Pillow writes a UTF-8 iTXt instead for a prompt that Latin-1 cannot hold.
            info.add_text(key, str(value))
        to_pil(image).save(directory / filename, pnginfo=info)
        entries.append(entry)
    columns = images_per_class if 1 < images_per_class <= 16 else math.ceil(math.sqrt(len(result.images)))
    columns = max(1, min(columns, len(result.images)))
    to_pil(make_grid(result.images, columns)).save(directory / "grid.png")
    sidecar: dict[str, Any] = {
        "settings": {"seed": result.seed, "steps": result.steps, "sampler": result.sampler,
                     "cfg_scale": result.cfg_scale, "batch_size": result.batch_size,
                     "images_per_class": images_per_class, "timesteps": result.timesteps},
        "backend": {"backend": result.backend, "precision": result.precision, "device": result.device},
        "timing": result.timing(),
        "images": entries,
        "grid": "grid.png",
    }
    if result.prompts:
        sidecar["prompts"] = list(dict.fromkeys(result.prompts))
        sidecar["settings"]["images_per_prompt"] = sidecar["settings"].pop("images_per_class")
        sidecar["timing"]["text_encoder_seconds"] = result.text_encoder_seconds
    sidecar.update(extra or {})
    return sidecar
