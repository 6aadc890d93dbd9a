"""Serving behind NVIDIA Triton Inference Server.

- `repository`: writes a Triton model repository for a run (`mmgen triton-repo`).
- `triton_model`: the Python-backend `model.py` copied into that repository.
- `server`: finds a `tritonserver` (system-wide or the one inside the `nvidia-pytriton` wheel),
  starts it, waits for readiness, and stops it with its whole process group (`mmgen serve`).
- `client`: a small tritonclient-based client (`mmgen client`).

Nothing here imports torch or tritonclient at module level.
"""

from __future__ import annotations

MODEL_NAME = "mmgen_generate"
