"""mmgen-deploy: VQ-VAE + DiT from PyTorch to FP16 TensorRT engines, with parity at every step."""

__version__ = "0.1.0"
