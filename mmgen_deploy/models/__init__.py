"""Native PyTorch models: the VQ autoencoder, the DiT and their deployable components."""

from mmgen_deploy.models.components import (
    DecoderComponent,
    DenoiserComponent,
    EncoderComponent,
    QuantizerComponent,
    TextDenoiserComponent,
    TextEncoderComponent,
    build_components,
    rerandomize_,
)
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.text_encoder import TextEncoder
from mmgen_deploy.models.vqvae import VectorQuantizer, VQModel

__all__ = [
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
    "rerandomize_",
]
