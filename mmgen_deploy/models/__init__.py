"""Native PyTorch models: the VQ autoencoder, the DiT and their deployable components."""

from mmgen_deploy.models.components import (
    COMPONENT_NAMES,
    TEXT_COMPONENT_NAMES,
    DecoderComponent,
    DenoiserComponent,
    EncoderComponent,
    QuantizerComponent,
    TextDenoiserComponent,
    TextEncoderComponent,
    build_components,
    component_names,
    rerandomize_,
)
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.text_encoder import TextEncoder
from mmgen_deploy.models.vqvae import VectorQuantizer, VQModel

__all__ = [
    "COMPONENT_NAMES",
    "TEXT_COMPONENT_NAMES",
    "DecoderComponent",
    "DenoiserComponent",
    "DiT",
    "EncoderComponent",
    "QuantizerComponent",
    "TextDenoiserComponent",
    "TextEncoder",
    "TextEncoderComponent",
    "VQModel",
    "VectorQuantizer",
    "build_components",
    "component_names",
    "rerandomize_",
]
