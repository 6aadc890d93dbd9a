"""Find out what a path holds and read it with the right importer.

A path can be
- a diffusers model directory (config.json + diffusion_pytorch_model.safetensors/.bin,
  possibly sharded) whose `_class_name` is VQModel, AutoencoderKL or DiTTransformer2DModel
  (older DiT pipelines call it Transformer2DModel with norm_type ada_norm_zero);
- a diffusers pipeline directory (model_index.json: a `DiTPipeline` with `transformer/`, `vae/`,
  `scheduler/` and `id2label` class names) holding such models and a scheduler;
- a checkpoint file (.pt/.pth/.ckpt/.bin/.safetensors): an official DiT state dict or
  train.py dict, or a taming/LDM VQ or LDM / Stable Diffusion KL Lightning checkpoint. The
  layout is recognised from the tensor names.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgen_deploy.config import DiffusionConfig
from mmgen_deploy.importers.dit import ImportedDiT, import_diffusers_dit, import_official_dit
from mmgen_deploy.importers.kl import KL_CLASSES, KLArchitecture, import_diffusers_kl, import_ldm_kl, is_ldm_kl_state
from mmgen_deploy.importers.safe_load import CheckpointError, load_checkpoint, read_json_object
from mmgen_deploy.importers.scheduler import read_scheduler as _read_scheduler
from mmgen_deploy.importers.statedict import StateDict, tensor_state
from mmgen_deploy.importers.vq import DEFAULT_NORM_GROUPS, VQArchitecture, import_diffusers_vq, import_taming_vq

VQ_CLASSES = ("VQModel",)
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class Found:
    """What one path turned out to hold."""

    vq: VQArchitecture | None = None
    kl: KLArchitecture | None = None
    dit: ImportedDiT | None = None
    scheduler: Path | None = None
    class_names: tuple[str, ...] | None = None  # a pipeline's id2label, in class-id order
    notes: list[str] = field(default_factory=list)

    @property
    def first_stage(self) -> VQArchitecture | KLArchitecture | None:
        return self.vq or self.kl


def _sharded_weights(folder: Path, index: Path) -> StateDict:
    """The tensors of a sharded save (`*.safetensors.index.json` + `*-0000i-of-0000n.safetensors`), checked
    against the index: every shard present, every tensor it lists found in the shard it names."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map", "re-save the model with save_pretrained()")
    shards = sorted(set(weight_map.values()))
    absent = [name for name in shards if not (folder / name).is_file()]
    if absent:
        raise CheckpointError(f"{folder}: {len(absent)} of the {len(shards)} shards listed in {index.name} are "
                              f"missing ({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''})",
                              "copy every shard next to the index (an interrupted download?)")
    state: StateDict = {}
    for shard in shards:
        part = tensor_state(load_checkpoint(folder / shard), str(folder / shard))
        listed = {key for key, name in weight_map.items() if name == shard}
        lost = sorted(listed - set(part))
        if lost:
            raise CheckpointError(f"{folder / shard} lacks {len(lost)} tensor(s) that {index.name} puts there "
                                  f"(e.g. {lost[0]})", "the shard is truncated or from another save")
        state.update(part)
    return state


def _diffusers_weights(folder: Path) -> StateDict:
    """All tensors of a diffusers model folder (single file or sharded with an index, or one precision variant)."""
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return tensor_state(load_checkpoint(folder / name), str(folder / name))
        index = folder / f"{name}.index.json"
        if index.is_file():
            return _sharded_weights(folder, index)
    # Only a precision variant (e.g. diffusion_pytorch_model.fp16.safetensors, or its shards with
    # diffusion_pytorch_model.safetensors.index.fp16.json): fine, it is cast to FP32.
    variant_indexes = sorted(folder.glob("diffusion_pytorch_model.safetensors.index.*.json"))
    if len(variant_indexes) == 1:
        return _sharded_weights(folder, variant_indexes[0])
    variants = sorted(p for p in folder.glob("diffusion_pytorch_model.*.safetensors") if "-of-" not in p.name)
    if len(variants) == 1 and not variant_indexes:
        return tensor_state(load_checkpoint(variants[0]), str(variants[0]))
    if len(variants) + len(variant_indexes) > 1:
        raise CheckpointError(f"{folder} holds several precision variants "
                              f"({', '.join(p.name for p in [*variant_indexes, *variants])}) and no default weights",
                              "keep one variant in the folder, or save the FP32 weights with save_pretrained()")
    raise CheckpointError(f"{folder} has a config.json but no weights ({', '.join(_WEIGHT_NAMES)})",
                          "save the model with save_pretrained() or copy the weight file next to config.json")


def _model_folder(folder: Path) -> Found:
    cfg = read_json_object(folder / "config.json")
    cls = cfg.get("_class_name", "")
    source = str(folder)
    if cls in VQ_CLASSES:
        return Found(vq=import_diffusers_vq(cfg, _diffusers_weights(folder), source))
    if cls in DIT_CLASSES:
        if cls == "Transformer2DModel" and (cfg.get("norm_type") != "ada_norm_zero" or not cfg.get("patch_size")):
            raise CheckpointError(f"{folder}: a Transformer2DModel that is not a class-conditional DiT "
                                  "(needs norm_type 'ada_norm_zero' and a patch_size)")
        found = Found(dit=import_diffusers_dit(cfg, _diffusers_weights(folder), source))
        sibling = folder.parent / "scheduler"
        if (sibling / "scheduler_config.json").is_file():
            found.scheduler = sibling
        return found
    if cls in KL_CLASSES:
        return Found(kl=import_diffusers_kl(cfg, _diffusers_weights(folder), source))
    raise CheckpointError(f"{folder}/config.json describes a {cls or 'model of unknown class'}; "
                          f"expected one of {', '.join(VQ_CLASSES + KL_CLASSES + DIT_CLASSES)}")


def id2label_names(index: dict[str, Any], source: str) -> tuple[str, ...] | None:
    """A DiTPipeline's `id2label` ({"0": "tench, Tinca tinca", ...}) as class names in id order."""
    table = index.get("id2label")
    if table is None:
        return None
    if not isinstance(table, dict) or not table:
        raise CheckpointError(f"{source}: id2label must be a non-empty object of class id -> name")
    try:
        ids = sorted(int(k) for k in table)
    except ValueError:
        raise CheckpointError(f"{source}: id2label keys must be class ids (0, 1, ...)") from None
    if ids != list(range(len(ids))):
        raise CheckpointError(f"{source}: id2label must name every class id 0..{len(ids) - 1} exactly once")
    return tuple(str(table[str(i)] if str(i) in table else table[i]).strip() for i in ids)


def _pipeline_folder(folder: Path) -> Found:
    index = read_json_object(folder / "model_index.json")
    found = Found()
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        sub = folder / name
        if spec[1] in VQ_CLASSES + KL_CLASSES + DIT_CLASSES:
            part = _model_folder(sub)
            found.vq = part.vq or found.vq
            found.kl = part.kl or found.kl
            found.dit = part.dit or found.dit
        elif (sub / "scheduler_config.json").is_file():
            found.scheduler = sub
    if found.vq is not None and found.kl is not None:
        raise CheckpointError(f"pipeline {folder} holds both a VQModel and an AutoencoderKL",
                              "import the DiT with the one it was trained on ({vae_path} PATH)", params=["vae_path"])
    if found.first_stage is None and found.dit is None:
        raise CheckpointError(f"pipeline {folder} holds no VQModel, AutoencoderKL or DiT transformer"
                              + (f" ({'; '.join(found.notes)})" if found.notes else ""))
    found.class_names = id2label_names(index, str(folder / "model_index.json"))
    return found


def _unwrap_checkpoint(obj: Any, source: str) -> tuple[StateDict, Namespace | None, list[str]]:
    """Lightning / train.py wrappers -> (state dict, train.py args, notes)."""
    notes: list[str] = []
    args = None
    if isinstance(obj, dict):
        if isinstance(obj.get("args"), Namespace):
            args = obj["args"]
        if isinstance(obj.get("state_dict"), dict):
            notes.append("Lightning checkpoint: using its state_dict")
            obj = obj["state_dict"]
        elif isinstance(obj.get("ema"), dict):
            notes.append("train.py checkpoint: using the EMA weights ('ema'), as DiT's sample.py does")
            obj = obj["ema"]
        elif isinstance(obj.get("model"), dict):
            notes.append("train.py checkpoint without 'ema': using 'model'")
            obj = obj["model"]
    state = tensor_state(obj, source)
    # DistributedDataParallel wraps every name in `module.`.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("stripped the DistributedDataParallel 'module.' prefix")
    return state, args, notes


def _checkpoint_file(path: Path, *, num_heads: int | None, norm_groups: int | None) -> Found:
    source = str(path)
    state, args, notes = _unwrap_checkpoint(load_checkpoint(path), source)
    keys = set(state)
    if "x_embedder.proj.weight" in keys:
        dit = import_official_dit(state, source, num_heads=num_heads, args=args)
        dit.notes = notes + dit.notes
        return Found(dit=dit)
    if is_ldm_kl_state(state):
        kl = import_ldm_kl(state, source, norm_groups=norm_groups or DEFAULT_NORM_GROUPS)
        kl.notes = notes + kl.notes
        return Found(kl=kl)
    if any(k.startswith(("encoder.conv_in.", "first_stage_model.encoder.conv_in.")) for k in keys):
        vq = import_taming_vq(state, source, norm_groups=norm_groups or DEFAULT_NORM_GROUPS)
        vq.notes = notes + vq.notes
        return Found(vq=vq)
    if any(k.startswith(("transformer_blocks.", "encoder.down_blocks.")) for k in keys):
        raise CheckpointError(f"{path} holds diffusers weights without their config.json",
                              "pass the model directory (config.json + weights), not the weight file")
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"{path}: unrecognised tensor names (e.g. {sample})",
                          "expected an official DiT state dict or a taming/LDM VQ or KL checkpoint")


def read_source(path: str | Path, *, num_heads: int | None = None, norm_groups: int | None = None) -> Found:
    """Import whatever `path` holds (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _pipeline_folder(path)
        if (path / "config.json").is_file():
            return _model_folder(path)
        raise CheckpointError(f"{path} is a directory without config.json or model_index.json",
                              "point at a diffusers model/pipeline directory or a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return _checkpoint_file(path, num_heads=num_heads, norm_groups=norm_groups)


def read_scheduler(path: Path) -> tuple[DiffusionConfig, dict[str, Any]]:
    """A diffusers scheduler_config.json (or its folder) -> the noise schedule and sampler flags
    (see `importers.scheduler`)."""
    return _read_scheduler(path)
