"""The torch models of a run directory: built from the run's configs, filled from its weight files.

`RunDir` owns where configs and weights live and reads and writes the weight files; this module
builds the models they belong to. `load_deployable` is the one loader of what a deployment derives
from (export, parity, serving, the torch backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from mmgen_deploy.config import KLConfig, ModelConfig, VQConfig
from mmgen_deploy.errors import RunDirError
from mmgen_deploy.models.autoencoder_kl import AutoencoderKL
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.fast_init import skip_weight_init
from mmgen_deploy.models.text_encoder import TextEncoder
from mmgen_deploy.models.vqvae import VQModel
from mmgen_deploy.rundir import FIRST_STAGE_PARTS, TEXT_PART, RunDir, safetensors_shapes
from mmgen_deploy.text.tokenizer import WordTokenizer

_Model = TypeVar("_Model", bound=torch.nn.Module)


@dataclass
class DeployableModels:
    """What every deployed artifact derives from: the config and the inference weights
    (plus, for a text-to-image model, its text encoder and tokenizer)."""

    config: ModelConfig
    first_stage: VQModel | AutoencoderKL  # of either kind
    dit: DiT
    text_encoder: TextEncoder | None = None
    tokenizer: WordTokenizer | None = None


def check_weights_match_config(run: RunDir, config: ModelConfig | None = None) -> None:
    """Refuse, from the weight files' headers alone, a config.json that makes tensors of other shapes
    than its weights hold (what a command that allocates by the config calls before it does)."""
    config = config or run.load_config()
    stage, text = config.first_stage, config.text
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        FIRST_STAGE_PARTS["vq"]: lambda: VQModel(stage),  # type: ignore[arg-type]
        FIRST_STAGE_PARTS["kl"]: lambda: AutoencoderKL(stage),  # type: ignore[arg-type]
        "dit": lambda: DiT(config.dit),
        TEXT_PART: lambda: TextEncoder(text),  # type: ignore[arg-type]
    }
    for part in run.model_parts(config):
        _check_fits(run, part, builders[part])


def _check_fits(run: RunDir, part: str, build: Callable[[], torch.nn.Module]) -> None:
    """The part's weight file against the shapes its config makes: read from the file's safetensors
    header and from the model built on the meta device, which holds no memory."""
    path = run.weights_path(part)
    if not path.is_file():
        raise RunDirError(f"missing weight file {path}",
                          f"train it (`mmgen train {'vqvae' if part == 'vqvae' else 'dit'}`) "
                          "or restore the file")
    stored = safetensors_shapes(path)
    with torch.device("meta"), skip_weight_init():
        wanted = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    wrong = [f"{name} is {list(stored[name])} in the file, the config makes it {list(shape)}"
             for name, shape in wanted.items() if name in stored and stored[name] != shape]
    missing = [name for name in wanted if name not in stored]
    unexpected = [name for name in stored if name not in wanted]
    problems = ([wrong[0]] if wrong else []) + ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
    if problems:
        raise RunDirError(f"{path} does not match its config.json: {'; '.join(problems)}",
                          "restore the config.json that came with these weights, or weights made for this config")


def _build_loaded(run: RunDir, part: str, build: Callable[[], _Model], *, skip_init: bool = True) -> _Model:
    """`build()` with the part's weights loaded, after `_check_fits`: a wrong or hostile config.json is
    refused before it can allocate anything."""
    _check_fits(run, part, build)
    if skip_init:
        with skip_weight_init():  # every parameter is loaded next
            model = build()
    else:
        model = build()
    run.load_weights_into(part, model)
    return model


def load_vqvae(run: RunDir, config: ModelConfig | None = None) -> VQModel:
    config = config or run.load_config()
    if not isinstance(config.first_stage, VQConfig):
        raise RunDirError(f"{run.root} has a KL autoencoder (vae/) as its first stage, not a VQ-VAE",
                          "VQ-only steps (train vqvae, codebook evaluation) do not apply to it")
    stage = config.first_stage
    return _build_loaded(run, FIRST_STAGE_PARTS["vq"], lambda: VQModel(stage)).eval()


def load_kl(run: RunDir, config: ModelConfig | None = None) -> AutoencoderKL:
    config = config or run.load_config()
    if not isinstance(config.first_stage, KLConfig):
        raise RunDirError(f"{run.root} has a VQ-VAE as its first stage, not a KL autoencoder")
    stage = config.first_stage
    return _build_loaded(run, FIRST_STAGE_PARTS["kl"], lambda: AutoencoderKL(stage)).eval()


def load_first_stage(run: RunDir, config: ModelConfig | None = None) -> VQModel | AutoencoderKL:
    """The first stage of either kind (VQ-VAE or KL autoencoder)."""
    config = config or run.load_config()
    return load_kl(run, config) if config.first_stage_kind == "kl" else load_vqvae(run, config)


def load_dit(run: RunDir, config: ModelConfig | None = None) -> DiT:
    dit_config = (config or run.load_config()).dit
    return _build_loaded(run, "dit", lambda: DiT(dit_config)).eval()


def load_text_encoder(run: RunDir, config: ModelConfig | None = None) -> TextEncoder:
    config = config or run.load_config()
    if config.text is None:
        raise RunDirError(f"{run.root} holds a class-conditioned model: it has no text encoder",
                          "use class names ({classes}) instead of prompts",
                          params=["classes"])
    text_config = config.text
    return _build_loaded(run, TEXT_PART, lambda: TextEncoder(text_config), skip_init=False).eval()


def load_models(run: RunDir) -> tuple[ModelConfig, VQModel | AutoencoderKL, DiT]:
    """The config, the first stage (of either kind) and the DiT (see `load_deployable` for everything)."""
    config = run.load_config()
    return config, load_first_stage(run, config), load_dit(run, config)


def load_deployable(run: RunDir) -> DeployableModels:
    """Load (and so verify) every part a deployment derives from: config, first stage (VQ-VAE
    or KL autoencoder), DiT and, for a text-to-image model, the text encoder and its tokenizer."""
    config = run.load_config()
    text = config.uses_text
    return DeployableModels(config, load_first_stage(run, config), load_dit(run, config),
                            load_text_encoder(run, config) if text else None,
                            run.load_tokenizer() if text else None)
