"""`mmgen import`: turn models people already have into a run directory.

Layouts: diffusers VQModel / AutoencoderKL / DiTTransformer2DModel directories (or a pipeline
such as DiTPipeline holding them, a scheduler and id2label class names), official DiT checkpoints
(.pt state dict or train.py dict), and taming-transformers / latent-diffusion VQ or KL
checkpoints (.ckpt). Every file is read safely
(see `safe_load`), every tensor is checked by name and shape, and the run directory is
written to a temporary folder and renamed only once complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmgen_deploy.config import DiffusionConfig, ModelConfig
from mmgen_deploy.errors import ConfigError, UsageError
from mmgen_deploy.importers.dit import ImportedDiT, import_diffusers_dit, import_official_dit, official_dit_keys
from mmgen_deploy.importers.kl import KLArchitecture, import_diffusers_kl, import_ldm_kl
from mmgen_deploy.importers.safe_load import ALLOWED_GLOBALS, CheckpointError, load_checkpoint
from mmgen_deploy.importers.sources import Found, read_scheduler, read_source
from mmgen_deploy.importers.vq import VQArchitecture, import_diffusers_vq, import_taming_vq
from mmgen_deploy.io_utils import atomic_dir, check_write_target, sha256_file

FirstStage = VQArchitecture | KLArchitecture

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointError",
    "ImportedDiT",
    "KLArchitecture",
    "VQArchitecture",
    "import_diffusers_dit",
    "import_diffusers_kl",
    "import_diffusers_vq",
    "import_ldm_kl",
    "import_official_dit",
    "import_run",
    "import_taming_vq",
    "load_checkpoint",
    "official_dit_keys",
    "read_class_names",
    "read_source",
]


def read_class_names(path: str | os.PathLike[str], num_classes: int) -> tuple[str, ...]:
    """One class name per line (blank lines ignored); the count must match the DiT's classes."""
    path = Path(path)
    try:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise UsageError(f"cannot read class names from {path}: {exc.strerror or exc}") from None
    if len(names) != num_classes:
        raise UsageError(f"{path} lists {len(names)} class names but the DiT has {num_classes} classes",
                         "give exactly one name per line, in class-id order")
    return names


def _fingerprint(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


# The import's path arguments: an error that names where a part came from (`origin`: "{vq_path} PATH",
# or "SOURCE PATH" for the positional source) names them by parameter (`MMGenError.params`).
PATH_PARAMS = ("vq_path", "vae_path", "dit_path")


def _merge(found: list[tuple[str, str, Found]]) -> tuple[FirstStage | None, ImportedDiT | None, Path | None, str,
                                                       str]:
    """`found`: (parameter, origin, what it holds) per path given."""
    stage: FirstStage | None = None
    dit: ImportedDiT | None = None
    scheduler = None
    stage_from = dit_from = ""
    # An autoencoder given explicitly (vq_path / vae_path) replaces the one a SOURCE pipeline ships.
    explicit = any(part.first_stage is not None for param, _, part in found if param in ("vq_path", "vae_path"))
    for param, origin, part in found:
        if part.first_stage is not None and param == "source" and explicit:
            part.notes.append(f"the autoencoder of {origin[len('SOURCE '):]} is replaced by the one given "
                              "explicitly")
        elif part.first_stage is not None:
            if stage is not None:
                raise UsageError(f"two first-stage autoencoders given ({stage_from} and {origin})",
                                 "give exactly one VQ model or KL autoencoder", params=PATH_PARAMS)
            stage, stage_from = part.first_stage, origin
        if part.dit is not None:
            if dit is not None:
                raise UsageError(f"two DiT models given ({dit_from} and {origin})", "give exactly one DiT",
                                 params=PATH_PARAMS)
            dit, dit_from = part.dit, origin
        scheduler = scheduler or part.scheduler
    return stage, dit, scheduler, stage_from, dit_from


def import_run(out: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None,
               vq_path: str | os.PathLike[str] | None = None, dit_path: str | os.PathLike[str] | None = None,
               scheduler_path: str | os.PathLike[str] | None = None,
               class_names_file: str | os.PathLike[str] | None = None, image_size: int | None = None,
               num_heads: int | None = None, norm_groups: int | None = None, overwrite: bool = False,
               vae_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Import a first stage (VQ model or KL autoencoder) and a DiT into the run directory `out`;
    return a report (JSON-ready). `vq_path` and `vae_path` both name the first stage (`--vq` for a
    VQ model, `--vae` for either kind)."""
    from mmgen_deploy.rundir import RunDir

    out = Path(out)
    if out.is_file():
        raise UsageError(f"{{out}} {out} is a file", "give a directory path for the run", params=["out"])
    if out.exists() and not out.is_dir():  # a device, FIFO or socket
        check_write_target(out, folder=True, param="out")
    if not RunDir(out).is_empty() and not overwrite:
        raise UsageError(f"{out} already exists and is not empty",
                         "choose a new {out} or pass {overwrite} to replace it", params=["out", "overwrite"])
    with RunDir(out).writing("import", create=True):
        return _import_run(out, source=source, vq_path=vq_path, vae_path=vae_path, dit_path=dit_path,
                           scheduler_path=scheduler_path, class_names_file=class_names_file, image_size=image_size,
                           num_heads=num_heads, norm_groups=norm_groups)


def _import_run(out: Path, *, source: str | os.PathLike[str] | None, vq_path: str | os.PathLike[str] | None,
                vae_path: str | os.PathLike[str] | None, dit_path: str | os.PathLike[str] | None,
                scheduler_path: str | os.PathLike[str] | None, class_names_file: str | os.PathLike[str] | None,
                image_size: int | None, num_heads: int | None, norm_groups: int | None) -> dict[str, Any]:
    from mmgen_deploy.rundir import RunDir, first_stage_part

    paths = [(param, Path(p)) for param, p in (("source", source), ("vq_path", vq_path), ("vae_path", vae_path),
                                               ("dit_path", dit_path)) if p is not None]
    if not paths:
        raise UsageError("nothing to import", "give SOURCE, or {vq_path}/{vae_path} PATH and {dit_path} PATH",
                         params=PATH_PARAMS)
    found = [(param, f"SOURCE {p}" if param == "source" else f"{{{param}}} {p}",
              read_source(p, num_heads=num_heads, norm_groups=norm_groups)) for param, p in paths]
    for param, origin, part in found:
        if param == "vq_path" and part.vq is None:
            hint = ("it is a KL autoencoder: pass it as {vae_path} PATH" if part.kl is not None
                    else "point {vq_path} at a VQModel directory or taming/LDM VQ .ckpt")
            raise UsageError(f"{origin} holds no VQ model", hint, params=PATH_PARAMS)
        if param == "vae_path" and part.first_stage is None:
            raise UsageError(f"{origin} holds no autoencoder",
                             "point {vae_path} at an AutoencoderKL/VQModel directory or an LDM first-stage .ckpt",
                             params=PATH_PARAMS)
        if param == "dit_path" and part.dit is None:
            raise UsageError(f"{origin} holds no DiT", "point {dit_path} at a DiT directory or official DiT checkpoint",
                             params=PATH_PARAMS)
    stage, dit, found_scheduler, stage_from, dit_from = _merge(found)
    source_notes = [note for _, _, part in found for note in part.notes]
    if dit is None:
        raise UsageError("a run directory needs a DiT as well as the autoencoder", "add {dit_path} PATH",
                         params=PATH_PARAMS)
    if stage is None:
        why = (" (official DiT checkpoints were trained on Stable Diffusion's KL-f8 VAE latents: give a diffusers "
               "AutoencoderKL folder such as sd-vae-ft-ema)" if dit.layout.startswith("official") else "")
        skipped = "".join(f"; {note}" for note in source_notes)
        raise UsageError(f"a run directory needs a first-stage autoencoder to pair with the DiT{why}{skipped}",
                         "add {vae_path} PATH (a KL autoencoder or VQ model) or {vq_path} PATH", params=PATH_PARAMS)
    kind = "KL autoencoder" if isinstance(stage, KLArchitecture) else "VQ model"

    # The image size is not stored in autoencoder weights: the DiT's latent size fixes it.
    factor = 2 ** (len(stage.channel_mult) - 1)
    paired_size = dit.config.input_size * factor
    if image_size is not None and image_size != paired_size:
        raise UsageError(f"{{image_size}} {image_size} gives {image_size // factor}x{image_size // factor} latents, "
                         f"but the DiT works on {dit.config.input_size}x{dit.config.input_size}",
                         f"use {{image_size}} {paired_size} or leave it out", params=["image_size"])
    if dit.config.in_channels != stage.embed_dim:
        raise UsageError(f"cannot pair them: the DiT ({dit_from}) takes {dit.config.in_channels}-channel latents but "
                         f"the {kind} ({stage_from}) makes {stage.embed_dim}-channel ones",
                         f"pair a DiT trained on this {kind}'s latents", params=PATH_PARAMS)
    stage_config, stage_model = stage.build(paired_size)

    notes = [*source_notes, *stage.notes, *dit.notes]
    if stage.default_image_size is not None and stage.default_image_size != paired_size:
        notes.append(f"the {kind}'s sample_size {stage.default_image_size} is replaced by {paired_size}, the image "
                     f"size whose latent is the DiT's {dit.config.input_size}x{dit.config.input_size}")
    scheduler_file = Path(scheduler_path) if scheduler_path is not None else found_scheduler
    scheduler_info: dict[str, Any] | None = None
    if scheduler_file is not None:
        diffusion, scheduler_info = read_scheduler(scheduler_file)
        notes.append(f"noise schedule and sampler flags from {scheduler_info['path']} ({scheduler_info['class']}: "
                     + ", ".join(f"{k}={v}" for k, v in scheduler_info["flags"].items()) + ")")
    else:
        diffusion = DiffusionConfig()
        notes.append("no scheduler config found: DiT's schedule (1000 linear betas 1e-4..0.02, epsilon)")
    if dit.layout.startswith("official") and kind == "VQ model":
        notes.append("official DiT weights were trained on Stable Diffusion KL-f8 latents (x0.18215); paired "
                     "with a VQ model they only produce sensible images if trained on its latents")
    pipeline_names = next((part.class_names for _, _, part in found if part.class_names is not None), None)
    if class_names_file is not None:
        class_names = read_class_names(class_names_file, dit.config.num_classes)
    elif pipeline_names is not None:
        if len(pipeline_names) != dit.config.num_classes:
            raise UsageError(f"the pipeline's id2label names {len(pipeline_names)} classes but the DiT has "
                             f"{dit.config.num_classes}", "give {class_names_file} FILE with one name per class",
                             params=["class_names_file"])
        class_names = pipeline_names
        notes.append(f"class names from the pipeline's id2label ({len(class_names)})")
    else:
        class_names = tuple(f"class {i}" for i in range(dit.config.num_classes))
    try:
        config = ModelConfig(first_stage=stage_config, dit=dit.config, diffusion=diffusion, class_names=class_names)
        config.validate()
    except ConfigError as exc:
        raise UsageError(f"cannot pair the {kind} and the DiT: {exc.message}") from None

    part_name = first_stage_part(config)
    imported = {
        part_name: {"layout": stage.layout, "path": str(Path(stage.source).resolve()),
                    "sha256": _fingerprint(Path(stage.source)), **stage.extras},
        "dit": {"layout": dit.layout, "path": str(Path(dit.source).resolve()),
                "sha256": _fingerprint(Path(dit.source))},
        "scheduler": scheduler_info,
        "notes": notes,
    }
    with atomic_dir(out) as tmp:
        run = RunDir(tmp)
        run.initialize(config, data={"source": "import"}, extra={"imported": imported})
        run.save_weights(part_name, stage_model)
        run.save_weights("dit", dit.model)
        from mmgen_deploy.models.load import load_deployable

        load_deployable(run)  # read back through the normal path (what export etc. will see) before the rename
    return {"run_dir": str(out), "config": config.to_dict(), "imported": imported,
            "params": {part_name: sum(p.numel() for p in stage_model.parameters()),
                       "dit": sum(p.numel() for p in dit.model.parameters() if p.requires_grad)}}
