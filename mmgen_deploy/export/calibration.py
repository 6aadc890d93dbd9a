"""Real inputs for every component, derived from dataset images.

Both the FP16 conversion (which activations overflow FP16?) and the "real data"
validation need inputs that look like deployment traffic, per component:
encoder = images; each next first-stage component = what its predecessor made of them (VQ:
quantizer = the latents h, decoder = their codes z_q; KL: decoder = the scaled latents);
denoiser = the encoder's latent noised to random timesteps with the forward process
x_t = sqrt(a_t) h + sqrt(1 - a_t) eps, with the images' class ids.
Text-to-image models: the text encoder gets the images' captions tokenized by the run's
tokenizer (every fourth one replaced by the empty prompt, the unconditional input of
guidance), and the denoiser gets the text encoder's outputs for those same prompts.
Without images, the spec's dummy inputs stand in (and the manifest says so); a text
model then still gets real prompts, made from its tokenizer's vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.sampling.schedulers import training_alphas_cumprod
from mmgen_deploy.specs import (
    DENOISER_PARTS,
    FIRST_STAGE_COMPONENTS,
    TEXT_OUTPUTS,
    ComponentSpec,
    Tensors,
    latent_name,
    text_condition_names,
)

if TYPE_CHECKING:
    from mmgen_deploy.text.tokenizer import WordTokenizer

CALIBRATION_SAMPLES = 16  # enough for the activation range check, cheap on 2 cores


@dataclass(frozen=True)
class CalibrationData:
    """Images (N, C, H, W) float32 in [-1, 1], optional class ids (N,) and captions (N)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = "images"
    captions: tuple[str, ...] | None = None


CalibrationSource = CalibrationData | np.ndarray | str | os.PathLike[str] | None


def load_calibration(source: CalibrationSource, config: ModelConfig,
                     limit: int = CALIBRATION_SAMPLES) -> CalibrationData | None:
    """Accept a CalibrationData, an image array, or an .npz with `images` (and optionally
    `labels`); check shapes and range against the config; keep the first `limit` samples."""
    if source is None:
        return None
    if isinstance(source, CalibrationData):
        data = source
    elif isinstance(source, np.ndarray):
        data = CalibrationData(images=source, source="array")
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"calibration file {path} does not exist", "pass an .npz holding an `images` array")
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "images" not in npz:
                    raise UsageError(f"{path} has no `images` array (it has: {', '.join(npz.files) or 'nothing'})",
                                     "save it with np.savez(path, images=..., labels=...)")
                labels = np.asarray(npz["labels"]) if "labels" in npz else None
                # Unicode arrays load without pickle; object arrays would be refused above.
                captions = tuple(str(c) for c in npz["captions"]) if "captions" in npz else None
                data = CalibrationData(images=np.asarray(npz["images"]), labels=labels, source=str(path),
                                       captions=captions)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read calibration file {path}: {exc}", "pass a NumPy .npz file") from None
    vq = config.first_stage
    expected = (vq.in_channels, vq.image_size, vq.image_size)
    images = data.images
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        want = ", ".join(map(str, expected))
        raise UsageError(f"calibration images have shape {tuple(images.shape)}, expected (N, {want})",
                         "give images of the model's size, channels first")
    if images.dtype == np.uint8:  # accept raw pixels, as a dataset stores them
        images = images.astype(np.float32) / 127.5 - 1.0
    images = images.astype(np.float32)
    if not np.isfinite(images).all() or np.abs(images).max() > 1.0 + 1e-3:
        raise UsageError("calibration images must be finite and scaled to [-1, 1]", "scale pixels as x / 127.5 - 1")
    labels = data.labels
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        if labels.shape[0] != images.shape[0] or labels.min() < 0 or labels.max() > config.dit.num_classes:
            raise UsageError(f"calibration labels must be {images.shape[0]} ids in [0, {config.dit.num_classes}]")
    captions = data.captions
    if captions is not None and len(captions) != images.shape[0]:
        raise UsageError(f"{len(captions)} calibration captions for {images.shape[0]} images", "give one per image")
    return CalibrationData(images=images[:limit],
                           labels=None if labels is None else labels[:limit], source=data.source,
                           captions=None if captions is None else tuple(captions[:limit]))


def dataset_calibration(meta: dict[str, Any], count: int = CALIBRATION_SAMPLES) -> tuple[CalibrationData | None, str]:
    """The first `count` images of the run's validation split (run.json `data`), or None and why not."""
    described = meta.get("data") or {}
    if not isinstance(described, dict) or "name" not in described:
        return None, "the run records no dataset"
    from mmgen_deploy.data import DataSpec, load_split

    spec = DataSpec.from_dict(described)
    if spec.name in ("shapes", "tones"):  # generated: ask for just the samples needed (same deterministic stream)
        spec = replace(spec, num_val=count)
    from mmgen_deploy.config import AudioConfig

    audio = AudioConfig.from_dict(meta["audio"]) if isinstance(meta.get("audio"), dict) else None
    try:
        data = load_split(spec, "val", audio=audio)
    except (MMGenError, OSError, ValueError) as exc:
        return None, f"dataset unavailable: {exc}"
    if len(data) == 0:
        return None, "the dataset's validation split is empty"
    count = min(len(data), count)
    images = np.ascontiguousarray(data.images[:count].transpose(0, 3, 1, 2))  # NHWC uint8 -> NCHW
    return CalibrationData(images=images, labels=np.asarray(data.labels[:count]),
                           source=f"{spec.name} validation split",
                           captions=tuple(str(c) for c in data.captions[:count])), ""


def vocabulary_prompts(tokenizer: WordTokenizer, count: int) -> list[str]:
    """`count` deterministic prompts made of the tokenizer's own words, of varied lengths
    (1 word up to the longest prompt that fits): real token statistics when a run has no
    captions to draw from (e.g. its dataset is not on this machine)."""
    words = tokenizer.words or ("",)
    room = max(1, tokenizer.max_length - 2)
    prompts = []
    for i in range(count):
        length = 1 + (3 * i) % room
        prompts.append(" ".join(words[(7 * i + 5 * j) % len(words)] for j in range(length)))
    return prompts


def text_component_inputs(modules: dict[str, nn.Module], config: ModelConfig, tokenizer: WordTokenizer,
                          prompts: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs of the text encoder (tokenized prompts, every fourth one empty: the
    unconditional input guidance feeds) and the denoiser's text conditions (the encoder's
    outputs for the same prompts)."""
    prompts = ["" if i % 4 == 3 else p for i, p in enumerate(prompts)]
    input_ids = tokenizer.encode(prompts).input_ids
    with torch.no_grad():
        outputs = modules["text_encoder"](torch.from_numpy(input_ids))
    named = dict(zip(TEXT_OUTPUTS, outputs, strict=True))
    conditions = {name: named[name].numpy().astype(np.float32) for name in text_condition_names(config.dit)}
    return {"text_encoder": {Tensors.INPUT_IDS: input_ids}, "denoiser": conditions}


def _batched(module: nn.Module, inputs: list[torch.Tensor], batch: int,
             progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, ...]:
    """Run `module` over `inputs` `batch` samples at a time (a 256 px encoder holds ~1 GB of
    activations per image) and concatenate the outputs; `progress(done, total)` after each batch."""
    parts = []
    total = inputs[0].shape[0]
    for i in range(0, total, batch):
        out = module(*(x[i:i + batch] for x in inputs))
        parts.append(out if isinstance(out, tuple) else (out,))
        if progress is not None:
            progress(min(i + batch, total), total)
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


class FirstStageCache:
    """What the first stage made of images already run in this export, keyed by each image's bytes:
    the validation set and the 8-bit calibration set overlap (both are taken from the same images),
    and a 256 px VQ-f8 encoder costs seconds per image on a CPU, so each image is encoded once."""

    def __init__(self) -> None:
        self._rows: dict[bytes, dict[str, np.ndarray]] = {}

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        return self._rows.get(key)

    def put(self, key: bytes, row: dict[str, np.ndarray]) -> None:
        self._rows[key] = row

    def __len__(self) -> int:
        return len(self._rows)


def first_stage_inputs(images: np.ndarray, config: ModelConfig, specs: dict[str, ComponentSpec],
                       modules: dict[str, nn.Module], *, progress: Callable[[str], None] | None = None,
                       cache: FirstStageCache | None = None,
                       ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """The first stage's components' inputs for `images` (each component fed its predecessor's
    outputs by name: VQ encoder -> quantizer -> decoder, KL encoder -> decoder), and the latent
    the DiT denoises (the encoder's output). `progress` gets a line per batch ("encoder 3/48
    images"): a 256 px encoder takes seconds per image on a CPU. With `cache`, images it holds are
    not run again (and the ones run are added to it)."""
    if cache is None:
        produced = _run_first_stage(np.ascontiguousarray(images), config, specs, modules, progress)
    else:
        keys = [FirstStageCache.key(image) for image in images]
        todo = [i for i, key in enumerate(keys) if cache.get(key) is None]
        computed = _run_first_stage(np.ascontiguousarray(images[todo]), config, specs, modules, progress,
                                    before=len(keys) - len(todo)) if todo else {}
        for position, index in enumerate(todo):
            cache.put(keys[index], {t: v[position] for t, v in computed.items()})
        rows = [row for row in (cache.get(key) for key in keys) if row is not None]
        produced = {t: np.stack([row[t] for row in rows]) for t in (rows[0] if rows else {})}
    produced[Tensors.IMAGE] = np.ascontiguousarray(images)
    inputs = {name: {t: produced[t].astype(np.float32) for t in specs[name].input_names}
              for name in FIRST_STAGE_COMPONENTS[config.first_stage_kind]}
    return inputs, produced[latent_name(config)].astype(np.float32)


def _run_first_stage(images: np.ndarray, config: ModelConfig, specs: dict[str, ComponentSpec],
                     modules: dict[str, nn.Module], progress: Callable[[str], None] | None,
                     before: int = 0) -> dict[str, np.ndarray]:
    """Every first-stage output some later component (or the DiT) takes, for `images`, by tensor
    name; `before` images were taken from a cache (the progress lines say so)."""
    produced: dict[str, torch.Tensor] = {Tensors.IMAGE: torch.from_numpy(images)}
    # Small batches at large image sizes: the encoder's activations grow with batch x pixels.
    batch = max(1, min(images.shape[0], (64 * 64 * 16) // (images.shape[2] * images.shape[3])))
    chain = FIRST_STAGE_COMPONENTS[config.first_stage_kind]  # encoder first, then the decode chain
    cached = f" ({before} encoded before)" if before else ""
    with torch.no_grad():
        for position, name in enumerate(chain):
            module, spec = modules.get(name), specs[name]
            if module is None:
                raise ValueError(f"deriving real inputs needs the {name} module")
            # Run a component only for outputs a later one (or the DiT) takes: the decoder's images
            # are nobody's input, and a 256 px VQ-f8 decoder costs 0.6 TFLOP per image.
            wanted = {t for later in chain[position + 1:] for t in specs[later].input_names} | {latent_name(config)}
            if not wanted & set(spec.output_names):
                continue
            feeds = [produced[t] for t in spec.input_names]
            report = None if progress is None else (
                lambda done, total, name=name: progress(f"{name} {done}/{total} images{cached}"))
            produced.update(zip(spec.output_names, _batched(module, feeds, batch, report), strict=True))
    del produced[Tensors.IMAGE]
    return {t: v.numpy() for t, v in produced.items()}


def component_inputs(data: CalibrationData | None, config: ModelConfig, specs: dict[str, ComponentSpec],
                     modules: dict[str, nn.Module], seed: int = 0,
                     why_no_data: str = "no images given", *,
                     tokenizer: WordTokenizer | None = None, samples: int = CALIBRATION_SAMPLES,
                     progress: Callable[[str], None] | None = None, cache: FirstStageCache | None = None,
                     ) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """Per-component real inputs, and a word saying where they came from.

    A text model's text encoder and denoiser conditions come from prompts when
    `tokenizer` is given (and `modules` holds the text encoder): the images' captions, or
    prompts from the tokenizer's vocabulary when there are no captions."""
    rng = np.random.default_rng(seed)
    use_text = config.uses_text and tokenizer is not None and "text_encoder" in modules
    if data is None:
        n = samples
        inputs: dict[str, dict[str, np.ndarray]] = {name: spec.make_inputs(n, rng) for name, spec in specs.items()}
        source = f"spec dummy inputs ({why_no_data})"
        if use_text:
            assert tokenizer is not None
            text = text_component_inputs(modules, config, tokenizer, vocabulary_prompts(tokenizer, n))
            inputs["text_encoder"] = text["text_encoder"]
            inputs["denoiser"] = {**inputs["denoiser"], **text["denoiser"]}
            source += "; prompts from the tokenizer's vocabulary"
        return inputs, source
    images = data.images
    n = images.shape[0]
    inputs, h_np = first_stage_inputs(images, config, specs, modules, progress=progress, cache=cache)
    if "vocoder" in specs:  # an audio model's vocoder hears the real spectrograms
        inputs["vocoder"] = {Tensors.IMAGE: inputs["encoder"][Tensors.IMAGE]}
    a = training_alphas_cumprod(config.diffusion)
    t = np.asarray(rng.integers(0, config.diffusion.num_train_timesteps, size=n))
    noise = rng.standard_normal(h_np.shape)
    scale = np.sqrt(a[t])[:, None, None, None]
    x_t = (scale * h_np + np.sqrt(1.0 - a[t])[:, None, None, None] * noise).astype(np.float32)
    source = f"dataset images ({data.source}, {n} samples)"
    if not config.uses_text:
        labels = np.asarray(data.labels if data.labels is not None
                            else rng.integers(0, config.dit.num_classes + 1, size=n))
        inputs["denoiser"] = with_spec_inputs({Tensors.X_T: x_t, Tensors.T: t.astype(np.float32),
                                               Tensors.CLASS_IDS: labels.astype(np.int32)},
                                              specs["denoiser"], rng)
        return inputs, source
    denoiser = {Tensors.X_T: x_t, Tensors.T: t.astype(np.float32)}
    if use_text:
        assert tokenizer is not None
        has_captions = data.captions is not None and any(c.strip() for c in data.captions)
        prompts = list(data.captions) if has_captions and data.captions is not None \
            else vocabulary_prompts(tokenizer, n)
        text = text_component_inputs(modules, config, tokenizer, prompts)
        inputs["text_encoder"] = text["text_encoder"]
        denoiser.update(text["denoiser"])
        source += "; their captions" if has_captions else "; prompts from the tokenizer's vocabulary"
    else:  # no tokenizer / text encoder given: the spec's dummy text conditions stand in
        dummy = specs["denoiser"].make_inputs(n, rng)
        denoiser.update({k: v for k, v in dummy.items() if k not in denoiser})
        inputs["text_encoder"] = specs["text_encoder"].make_inputs(n, rng)
    inputs["denoiser"] = with_spec_inputs(denoiser, specs["denoiser"], rng)
    return inputs, source


def with_spec_inputs(feeds: dict[str, np.ndarray], spec: ComponentSpec,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`feeds` completed with the spec's own inputs for the names real data does not give (a
    distilled student's guidance scale: drawn from its distilled range)."""
    missing = [name for name in spec.input_names if name not in feeds]
    if not missing:
        return feeds
    n = len(next(iter(feeds.values())))
    dummy = spec.make_inputs(n, rng)
    return {**feeds, **{name: dummy[name] for name in missing}}


@torch.no_grad()
def denoiser_part_inputs(denoiser_inputs: dict[str, np.ndarray], specs: dict[str, ComponentSpec],
                         modules: dict[str, nn.Module], batch: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs of the denoiser's parts from the whole denoiser's real inputs: the head gets them as
    they are, the body the head's outputs, the tail the head's outputs and the body's residual
    (and each its prompt tokens and mask, when it has cross-attention)."""
    head, body = specs["denoiser_head"], specs["denoiser_body"]
    n = next(iter(denoiser_inputs.values())).shape[0]
    produced: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch):
        args = [torch.from_numpy(denoiser_inputs[name][start:start + batch]) for name in head.input_names]
        hidden, embedding, _ = modules["denoiser_head"](*args)
        given = {Tensors.HIDDEN: hidden, Tensors.EMBEDDING: embedding,
                 **{k: torch.from_numpy(v[start:start + batch]) for k, v in denoiser_inputs.items()}}
        residual = modules["denoiser_body"](*[given[name] for name in body.input_names])
        for name, value in ((Tensors.HIDDEN, hidden), (Tensors.EMBEDDING, embedding),
                            (Tensors.BODY_RESIDUAL, residual)):
            produced.setdefault(name, []).append(value.numpy().astype(np.float32))
    everything = {**denoiser_inputs, **{k: np.concatenate(v) for k, v in produced.items()}}
    return {name: {t: everything[t] for t in specs[name].input_names}
            for name in DENOISER_PARTS}
