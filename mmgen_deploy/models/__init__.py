"""Native PyTorch models: the VQ and KL autoencoders, the DiT and their deployable components."""

from mmgen_deploy.models.autoencoder_kl import AutoencoderKL
from mmgen_deploy.models.components import (
    DecoderComponent,
    DenoiserComponent,
    EncoderComponent,
    KLDecoderComponent,
    KLEncoderComponent,
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
    "AutoencoderKL",
    "DecoderComponent",
    "DenoiserComponent",
    "DiT",
    "EncoderComponent",
    "KLDecoderComponent",
    "KLEncoderComponent",
    "QuantizerComponent",
    "TextDenoiserComponent",
    "TextEncoder",
    "TextEncoderComponent",
    "VQModel",
    "VectorQuantizer",
    "build_components",
    "rerandomize_",
]
