"""Stage 2: the DiT on cached VQ latents (epsilon prediction, label dropout, AdamW, EMA).

A text-to-image run (``config.uses_text``) trains its `TextEncoder` jointly with the DiT:
one optimizer over both, captions tokenized once, caption dropout replacing a caption by
the empty prompt (the unconditional input of classifier-free guidance), EMA copies of both
saved for inference, and the word tokenizer saved next to the text encoder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.data.dataset import ImageData
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.io_utils import write_json
from mmgen_deploy.models.autoencoder_kl import AutoencoderKL
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.load import load_first_stage
from mmgen_deploy.models.text_encoder import TextEncoder
from mmgen_deploy.models.vqvae import VQModel
from mmgen_deploy.numerics import save_grid
from mmgen_deploy.rundir import RunDir, writes_run
from mmgen_deploy.sampling.schedulers import training_alphas_cumprod
from mmgen_deploy.text.tokenizer import WordTokenizer
from mmgen_deploy.training.common import (
    StepCallback,
    ema_decay_at,
    ema_update,
    interrupted,
    load_checkpoint,
    lr_at,
    progress_bar,
    restore_rng,
    rng_state,
    save_checkpoint,
    set_lr,
)


@dataclass(frozen=True)
class DiTTrainSettings:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    text_lr_scale: float = 1.0  # the text encoder's rate as a fraction of `lr` (why: recipes.py, tiny+text)
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 1000  # sample grid PNG every N steps (0: only at the end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def encode_latents(vq: VQModel | AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The latents the DiT learns to generate, of uint8 images: a VQ model's pre-quantization h, or a
    KL autoencoder's scaled posterior mean (deterministic, so the latents can be cached once)."""
    vq.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(vq.encode(batch))
    return torch.cat(out)


def cached_latents(run: RunDir, vq: VQModel | AutoencoderKL, data: ImageData) -> torch.Tensor:
    """Encode once per first-stage checkpoint: the cache is keyed by its weights' hash and the images."""
    from mmgen_deploy.io_utils import sha256_file
    from mmgen_deploy.rundir import first_stage_part

    path = run.checkpoint_path("dit_latents")
    key = f"{sha256_file(run.weights_path(first_stage_part(run.load_config())))}:{len(data)}:" \
          f"{int(data.images[:64].sum())}"
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache.get("key") == key:
                return cache["latents"]
        except Exception:  # a damaged cache is simply rebuilt
            pass
    latents = encode_latents(vq, data.images)
    save_checkpoint(path, {"key": key, "latents": latents, "step": 0})
    return latents


def adopt_data(run: RunDir, data: str, seed: int) -> None:
    """Give an imported run (its first stage and DiT from elsewhere, no training data) the data its
    DiT is to be trained on: `data` is `shapes` or an image folder, at the first stage's image size.

    The DiT is trained from scratch, so its label table follows the data: with another number of
    classes than the imported DiT's, `dit.num_classes` (and the class names) change to the data's;
    the architecture (depth, width, patch, diffusers numerics) and the noise schedule stay."""
    from mmgen_deploy.data import DataSpec, load_split

    meta = run.read_meta()
    if meta.get("data") and meta["data"].get("source") != "import":
        raise UsageError(f"{run.root} already trains on its own data (run.json: data)",
                         "leave out {data} (it is for runs made by `mmgen import`)", params=["data"])
    config = run.load_config()
    if config.uses_text:
        raise UsageError("{data}: text-to-image runs are made by `mmgen train --text`, not imported",
                         params=["data"])
    spec = DataSpec.parse(data, image_size=config.first_stage.image_size, seed=seed)
    if spec.is_audio:
        raise UsageError("{data}: an imported run's first stage works on images, not on audio",
                         "train an audio run from scratch: `mmgen train all --data tones`", params=["data"])
    names = tuple(load_split(spec, "train").class_names)
    dit = config.dit if len(names) == config.dit.num_classes else config.dit.replace(num_classes=len(names))
    new = config.replace(dit=dit, class_names=names)
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "diffusion", "class_names", "data")}
    if dit != config.dit:
        # The imported DiT weights no longer fit the resized label table: they are what this run
        # replaces, so keep them beside the run instead of leaving a part that cannot be loaded.
        old = run.weights_path("dit")
        if old.is_file():
            old.replace(old.with_name("imported.safetensors"))
        extra["dit_label_table"] = {"imported_classes": config.dit.num_classes, "data_classes": len(names)}
    run.initialize(new, data=spec.to_dict(), extra=extra)


# How many distinct training captions the text model's sample grid shows (2 samples each).
GRID_PROMPTS = 9


def build_tokenizer(captions: list[str], max_length: int) -> WordTokenizer:
    """The word tokenizer of a text-to-image run: the vocabulary of its training captions."""
    if not any(caption.strip() for caption in captions):
        raise UsageError("a text-to-image model needs captions, and this data has none",
                         'use {data} shapes, or a folder with a metadata.jsonl of {"file_name": ..., '
                         '"text": "a caption"} lines', params=["data"])
    return WordTokenizer.build(captions, max_length=max_length)


def grid_prompts(captions: list[str], count: int = GRID_PROMPTS) -> list[str]:
    """The fixed prompts of a text model's sample grids: the first `count` distinct training captions."""
    return [c for c in dict.fromkeys(captions) if c.strip()][:count]


@writes_run("train the DiT")
def train_dit(run: RunDir, train: ImageData, settings: DiTTrainSettings, *, resume: bool = False,
              callback: StepCallback | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Train the DiT of `run` on its first stage's latents (a VQ-VAE trained here, or an imported KL
    autoencoder); saves the EMA weights for inference.

    For a text-to-image run, also builds and saves the tokenizer and trains the text encoder.
    """
    config = run.load_config()
    vq = load_first_stage(run, config)
    latents = cached_latents(run, vq, train)
    labels = torch.from_numpy(train.labels).long()
    tokenizer: WordTokenizer | None = None
    if config.uses_text:
        assert config.text is not None
        tokenizer = build_tokenizer(train.captions, config.text.max_length)
        if tokenizer.vocab_size != config.text.vocab_size:
            raise RunDirError(f"the training captions give a vocabulary of {tokenizer.vocab_size} tokens but the "
                              f"run's text encoder has {config.text.vocab_size}",
                              "train this run on the data it was created for (or start a new run)")
        # Tokenized once: (N, L) ids, and the empty prompt that caption dropout substitutes.
        token_ids = torch.from_numpy(tokenizer(train.captions)).long()
        empty_ids = torch.from_numpy(tokenizer([""])).long()
    elif int(labels.max()) >= config.dit.num_classes:
        raise RunDirError(f"the data has class ids up to {int(labels.max())} but the DiT has "
                          f"{config.dit.num_classes} classes", "train this run on the data it was created for")
    # The same schedule the samplers use (one definition, float64, then float32 for training).
    alpha_bar = torch.from_numpy(training_alphas_cumprod(config.diffusion)).float()
    num_t = config.diffusion.num_train_timesteps
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    dit = DiT(config.dit)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    groups: list[dict[str, Any]] = [{"params": [p for p in dit.parameters() if p.requires_grad]}]
    text_encoder = TextEncoder(config.text) if config.text is not None else None
    text_ema = copy.deepcopy(text_encoder).eval().requires_grad_(False) if text_encoder is not None else None
    if text_encoder is not None:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr_scale": settings.text_lr_scale})
    # Fused: one kernel per step instead of a dozen per parameter (~10% of a tiny DiT step on CPU).
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    checkpoint = run.checkpoint_path("dit")
    start = 0
    if resume:
        state = load_checkpoint(checkpoint)
        if state.get("config") != config.dit.to_dict():
            raise RunDirError(f"{checkpoint} belongs to a different DiT configuration",
                              "train without {resume} (add {overwrite} to replace the run)",
                              params=["resume", "overwrite"])
        # Settings added since the checkpoint was written compare at their defaults.
        saved = {**DiTTrainSettings().to_dict(), **state.get("settings", {})}
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in settings.to_dict().items()
                                                               if k != "steps"}:
            raise RunDirError(f"{checkpoint} was trained with other settings ({saved})",
                              "resume with the same options (only {steps} may grow)", params=["steps"])
        dit.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if text_encoder is not None and text_ema is not None and config.text is not None:
            if "text_encoder" not in state or state.get("text_config") != config.text.to_dict():
                raise RunDirError(f"{checkpoint} has no matching text encoder",
                                  "train without {resume} (add {overwrite} to replace the run)",
                                  params=["resume", "overwrite"])
            text_encoder.load_state_dict(state["text_encoder"])
            text_ema.load_state_dict(state["text_ema"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # parameter groups differ: a text checkpoint from before the text encoder had its own
            raise RunDirError(f"{checkpoint} has an optimizer state of an older mmgen-deploy",
                              "train without {resume} (add {overwrite} to replace the run)",
                              params=["resume", "overwrite"]) from None
        restore_rng(state["rng"], generator)
        start = int(state["step"])
    last_saved = start if resume else None
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    c = config.dit.in_channels
    drop_prob = config.text.caption_dropout_prob if config.text is not None else config.dit.class_dropout_prob
    try:
        with progress_bar("DiT", settings.steps, start, show_progress) as advance:
            for step in range(start, settings.steps):
                dit.train()
                if text_encoder is not None:
                    text_encoder.train()
                set_lr(optimizer, lr_at(step, base_lr=settings.lr, warmup=settings.warmup, total=settings.steps))
                pick = torch.randint(0, len(latents), (settings.batch_size,), generator=generator)
                x0, y = latents[pick], labels[pick]
                t = torch.randint(0, num_t, (settings.batch_size,), generator=generator)
                noise = torch.randn(x0.shape, generator=generator)
                drop = torch.rand(settings.batch_size, generator=generator) < drop_prob
                a = alpha_bar[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                # With learn_sigma the extra channels get no loss here (plain epsilon MSE).
                if text_encoder is not None:
                    # Caption dropout: the empty prompt, as classifier-free guidance's unconditional half.
                    ids = torch.where(drop[:, None], empty_ids, token_ids[pick])
                    text, text_mask, text_pooled = text_encoder(ids)
                    prediction = dit(x_t, t.float(), text=text, text_mask=text_mask, text_pooled=text_pooled)[:, :c]
                else:
                    prediction = dit(x_t, t.float(), y, drop_labels=drop)[:, :c]
                loss = F.mse_loss(prediction, noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update(ema, dit, ema_decay_at(step, settings.ema_decay))
                if text_encoder is not None and text_ema is not None:
                    ema_update(text_ema, text_encoder, ema_decay_at(step, settings.ema_decay))
                metrics = {"loss": loss.item()}
                done = step + 1
                if done % settings.checkpoint_every == 0 or done == settings.steps:
                    state = {"step": done, "model": dit.state_dict(), "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                             "config": config.dit.to_dict(), "settings": settings.to_dict()}
                    if text_encoder is not None and text_ema is not None and config.text is not None:
                        state.update(text_encoder=text_encoder.state_dict(), text_ema=text_ema.state_dict(),
                                     text_config=config.text.to_dict())
                    save_checkpoint(checkpoint, state)
                    last_saved = done
                if settings.sample_every and done % settings.sample_every == 0 and done != settings.steps:
                    sample_grid(vq, ema, config, run.samples_dir / "train" / f"dit_step{done:06d}.png", steps=25,
                                text_encoder=text_ema, tokenizer=tokenizer, prompts=grid_prompts(train.captions))
                advance(loss=metrics["loss"])
                if callback is not None:
                    callback(done, metrics)
    except KeyboardInterrupt:
        raise interrupted("DiT", checkpoint, last_saved) from None
    train_seconds = time.perf_counter() - started
    if text_ema is not None and tokenizer is not None:
        # Text encoder and tokenizer first: a run with DiT weights always has what conditions them.
        run.save_tokenizer(tokenizer)
        run.save_weights("text_encoder", text_ema)
    run.save_weights("dit", ema)
    grid = sample_grid(vq, ema, config, run.samples_dir / "dit_samples.png", text_encoder=text_ema,
                       tokenizer=tokenizer, prompts=grid_prompts(train.captions))
    result = {"stage": "dit", "steps": settings.steps, "resumed_from": start if resume else None,
              "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
              "final_loss": metrics.get("loss"), "num_latents": len(latents),
              "sample_grid": str(grid) if grid else None, "settings": settings.to_dict()}
    if tokenizer is not None:
        result.update(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
                      conditioning=config.dit.conditioning, grid_prompts=grid_prompts(train.captions))
    write_json(run.train_report_path("dit"), result)
    training = dict(run.read_meta().get("training", {}))
    training["dit"] = {k: result[k] for k in ("steps", "train_seconds", "final_loss")}
    run.update_meta(training=training)
    return result


def sample_grid(vq: VQModel | AutoencoderKL, dit: DiT, config: ModelConfig, path: Path, *,
                steps: int = SAMPLING.steps, per_class: int = 2, cfg_scale: float = SAMPLING.cfg_scale,
                text_encoder: TextEncoder | None = None, tokenizer: WordTokenizer | None = None,
                prompts: list[str] | None = None) -> Path | None:
    """A grid with `per_class` samples of every class (one column per class), or for a text
    model of every prompt in `prompts` (one column per prompt; None without them)."""
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import make_conditioning, sample

    if config.uses_text and (text_encoder is None or tokenizer is None or not prompts):
        return None
    runner = TorchRunner(vq.eval(), dit.eval(), config=config,
                         text_encoder=text_encoder.eval() if config.uses_text and text_encoder is not None else None)
    grid_prompts_ = [p for _ in range(per_class) for p in prompts] if config.uses_text and prompts else []
    classes = [] if config.uses_text else [k for _ in range(per_class) for k in range(config.dit.num_classes)]
    condition = make_conditioning(runner, config, class_ids=classes, prompts=grid_prompts_, tokenizer=tokenizer)
    result = sample(runner, config, condition, steps=steps, sampler=SAMPLING.sampler, cfg_scale=cfg_scale, seed=0,
                    batch_size=64)
    columns = len(prompts or ()) if config.uses_text else config.dit.num_classes
    return save_grid(np.asarray(result.images), path, columns=columns)
