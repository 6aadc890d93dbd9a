"""Native PyTorch models: the VQ autoencoder, the DiT and their deployable components."""

from mmgen_deploy.models.components import (
    COMPONENT_NAMES,
    DecoderComponent,
    DenoiserComponent,
    EncoderComponent,
    QuantizerComponent,
    build_components,
    rerandomize_,
)
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.vqvae import VectorQuantizer, VQModel

__all__ = [
    "COMPONENT_NAMES",
    "DecoderComponent",
    "DenoiserComponent",
    "DiT",
    "EncoderComponent",
    "QuantizerComponent",
    "VQModel",
    "VectorQuantizer",
    "build_components",
    "rerandomize_",
]
