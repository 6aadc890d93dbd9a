"""mmgen-deploy: VQ / KL autoencoder + DiT from PyTorch to ONNX Runtime, OpenVINO and TensorRT, with parity."""

__version__ = "0.1.0"
