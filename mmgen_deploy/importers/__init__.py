"""`mmgen import`: turn models people already have into a run directory.

Layouts: diffusers VQModel / DiTTransformer2DModel directories (or a pipeline holding
both and a scheduler), official DiT checkpoints (.pt state dict or train.py dict), and
taming-transformers / latent-diffusion VQ checkpoints (.ckpt). Every file is read safely
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
from mmgen_deploy.importers.safe_load import ALLOWED_GLOBALS, CheckpointError, load_checkpoint
from mmgen_deploy.importers.sources import Found, read_scheduler, read_source
from mmgen_deploy.importers.vq import VQArchitecture, import_diffusers_vq, import_taming_vq
from mmgen_deploy.io_utils import atomic_dir, sha256_file

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointError",
    "ImportedDiT",
    "VQArchitecture",
    "import_diffusers_dit",
    "import_diffusers_vq",
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


def _merge(found: list[tuple[str, Found]]) -> tuple[VQArchitecture | None, ImportedDiT | None, Path | None, str,
                                                   str]:
    vq = dit = scheduler = None
    vq_from = dit_from = ""
    for origin, part in found:
        if part.vq is not None:
            if vq is not None:
                raise UsageError(f"two VQ models given ({vq_from} and {origin})", "give exactly one VQ model")
            vq, vq_from = part.vq, origin
        if part.dit is not None:
            if dit is not None:
                raise UsageError(f"two DiT models given ({dit_from} and {origin})", "give exactly one DiT")
            dit, dit_from = part.dit, origin
        scheduler = scheduler or part.scheduler
    return vq, dit, scheduler, vq_from, dit_from


def import_run(out: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None,
               vq_path: str | os.PathLike[str] | None = None, dit_path: str | os.PathLike[str] | None = None,
               scheduler_path: str | os.PathLike[str] | None = None,
               class_names_file: str | os.PathLike[str] | None = None, image_size: int | None = None,
               num_heads: int | None = None, norm_groups: int | None = None, force: bool = False) -> dict[str, Any]:
    """Import a VQ model and a DiT into the run directory `out`; return a report (JSON-ready)."""
    from mmgen_deploy.rundir import RunDir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a directory path for the run")
    if not RunDir(out).is_empty() and not force:
        raise UsageError(f"{out} already exists and is not empty", "choose a new --out or pass --force to replace it")
    with RunDir(out).writing("import", create=True):
        return _import_run(out, source=source, vq_path=vq_path, dit_path=dit_path, scheduler_path=scheduler_path,
                           class_names_file=class_names_file, image_size=image_size, num_heads=num_heads,
                           norm_groups=norm_groups)


def _import_run(out: Path, *, source: str | os.PathLike[str] | None, vq_path: str | os.PathLike[str] | None,
                dit_path: str | os.PathLike[str] | None, scheduler_path: str | os.PathLike[str] | None,
                class_names_file: str | os.PathLike[str] | None, image_size: int | None, num_heads: int | None,
                norm_groups: int | None) -> dict[str, Any]:
    from mmgen_deploy.rundir import RunDir

    paths = [(label, Path(p)) for label, p in (("SOURCE", source), ("--vq", vq_path), ("--dit", dit_path))
             if p is not None]
    if not paths:
        raise UsageError("nothing to import", "give SOURCE, or --vq PATH and --dit PATH")
    found = [(f"{label} {p}", read_source(p, num_heads=num_heads, norm_groups=norm_groups)) for label, p in paths]
    for label, part in found:
        if label.startswith("--vq") and part.vq is None:
            raise UsageError(f"{label} holds no VQ model", "point --vq at a VQModel directory or taming/LDM VQ .ckpt")
        if label.startswith("--dit") and part.dit is None:
            raise UsageError(f"{label} holds no DiT", "point --dit at a DiT directory or official DiT checkpoint")
    vq, dit, found_scheduler, vq_from, dit_from = _merge(found)
    source_notes = [note for _, part in found for note in part.notes]
    if dit is None:
        raise UsageError("a run directory needs a DiT as well as the VQ model", "add --dit PATH")
    if vq is None:
        why = (" (official DiT checkpoints were trained on Stable Diffusion KL-f8 latents; pairing them with a "
               "VQ model only makes sense for a DiT trained on that VQ model's latents)"
               if dit.layout.startswith("official") else "")
        skipped = "".join(f"; {note}" for note in source_notes)
        raise UsageError(f"a run directory needs a VQ model to pair with the DiT{why}{skipped}", "add --vq PATH")

    # The image size is not stored in VQ weights: the DiT's latent size fixes it.
    factor = 2 ** (len(vq.channel_mult) - 1)
    paired_size = dit.config.input_size * factor
    if image_size is not None and image_size != paired_size:
        raise UsageError(f"--image-size {image_size} gives {image_size // factor}x{image_size // factor} latents, "
                         f"but the DiT works on {dit.config.input_size}x{dit.config.input_size}",
                         f"use --image-size {paired_size} or leave it out")
    if dit.config.in_channels != vq.embed_dim:
        raise UsageError(f"cannot pair them: the DiT ({dit_from}) takes {dit.config.in_channels}-channel latents but "
                         f"the VQ model ({vq_from}) makes {vq.embed_dim}-channel ones (embed_dim)",
                         "pair a DiT trained on this VQ model's latents")
    vq_config, vq_model = vq.build(paired_size)

    notes = [*source_notes, *vq.notes, *dit.notes]
    if vq.default_image_size is not None and vq.default_image_size != paired_size:
        notes.append(f"the VQ config's sample_size {vq.default_image_size} is replaced by {paired_size}, the image "
                     f"size whose latent is the DiT's {dit.config.input_size}x{dit.config.input_size}")
    scheduler_file = Path(scheduler_path) if scheduler_path is not None else found_scheduler
    scheduler_info: dict[str, Any] | None = None
    if scheduler_file is not None:
        diffusion, scheduler_info = read_scheduler(scheduler_file)
        notes.append(f"noise schedule from {scheduler_info['path']}")
    else:
        diffusion = DiffusionConfig()
        notes.append("no scheduler config found: DiT's schedule (1000 linear betas 1e-4..0.02, epsilon)")
    if dit.layout.startswith("official"):
        notes.append("official DiT weights were trained on Stable Diffusion KL-f8 latents (x0.18215); paired "
                     "with a VQ model they only produce sensible images if trained on its latents")
    class_names = (read_class_names(class_names_file, dit.config.num_classes) if class_names_file is not None
                   else tuple(f"class {i}" for i in range(dit.config.num_classes)))
    try:
        config = ModelConfig(vq=vq_config, dit=dit.config, diffusion=diffusion, class_names=class_names)
        config.validate()
    except ConfigError as exc:
        raise UsageError(f"cannot pair the VQ model and the DiT: {exc.message}") from None

    imported = {
        "vqvae": {"layout": vq.layout, "path": str(Path(vq.source).resolve()),
                  "sha256": _fingerprint(Path(vq.source)), **vq.extras},
        "dit": {"layout": dit.layout, "path": str(Path(dit.source).resolve()),
                "sha256": _fingerprint(Path(dit.source))},
        "scheduler": scheduler_info,
        "notes": notes,
    }
    with atomic_dir(out) as tmp:
        run = RunDir(tmp)
        run.initialize(config, data={"source": "import"}, extra={"imported": imported})
        run.save_weights("vqvae", vq_model)
        run.save_weights("dit", dit.model)
        run.load_deployable()  # read back through the normal path (what export etc. will see) before the rename
    return {"run_dir": str(out), "config": config.to_dict(), "imported": imported,
            "params": {"vqvae": sum(p.numel() for p in vq_model.parameters()),
                       "dit": sum(p.numel() for p in dit.model.parameters() if p.requires_grad)}}
