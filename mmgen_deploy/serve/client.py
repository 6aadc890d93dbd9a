"""A small HTTP client for `mmgen_generate` (tritonclient; `mmgen client`, the benchmark, the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.serve import MODEL_NAME


class RemoteError(MMGenError):
    """The server answered with an error (bad request, failed generation) or could not be reached."""


def _tritonclient_http() -> Any:
    try:
        import tritonclient.http as httpclient
    except ImportError as exc:
        raise NotAvailableError(f"tritonclient is not installed ({exc})",
                                "pip install 'mmgen-deploy[serve]'") from None
    return httpclient


def normalize_url(url: str) -> str:
    """`http://host:port`, `host:port` or `host` -> `host:port` as tritonclient wants it."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "") or not parsed.hostname:
        raise UsageError(f"cannot use server URL {url!r}",
                         "give http://HOST:PORT (the HTTP endpoint, default port 8000)")
    return f"{parsed.hostname}:{parsed.port or 8000}"


@dataclass(frozen=True)
class ImageRequest:
    """One request: rows i = (class_ids[i] or prompts[i], seeds[i]) at one steps/guidance."""

    seeds: list[int]
    class_ids: list[int] | None = None
    prompts: list[str] | None = None
    steps: int | None = None
    guidance: float | None = None

    def __post_init__(self) -> None:
        labels = self.class_ids if self.class_ids is not None else self.prompts
        if labels is None or (self.class_ids is not None and self.prompts is not None):
            raise UsageError("give class ids or prompts (not both)")
        if len(labels) != len(self.seeds) or not labels:
            raise UsageError(f"{len(labels)} labels for {len(self.seeds)} seeds: give one seed per image")


class GenerateClient:
    """Thread-confined HTTP client (make one per thread: tritonclient's HTTP client is not thread-safe)."""

    def __init__(self, url: str, *, timeout_s: float = 300.0, model: str = MODEL_NAME) -> None:
        self._http = _tritonclient_http()
        self.url = normalize_url(url)
        self.model = model
        self.client = self._http.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                       network_timeout=timeout_s)

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # connection refused and friends: simply not ready
            return False

    def _input(self, name: str, array: np.ndarray, datatype: str) -> Any:
        tensor = self._http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        return tensor

    def generate(self, request: ImageRequest) -> np.ndarray:
        """uint8 images (N, H, W, 3) for one request; RemoteError with the server's message otherwise."""
        n = len(request.seeds)
        inputs = []
        if request.class_ids is not None:
            inputs.append(self._input("CLASS_ID", np.asarray(request.class_ids, np.int32).reshape(n, 1), "INT32"))
        else:
            assert request.prompts is not None
            inputs.append(self._input("PROMPT", np.asarray([p.encode() for p in request.prompts],
                                                           dtype=np.object_).reshape(n, 1), "BYTES"))
        inputs.append(self._input("SEED", np.asarray(request.seeds, np.int64).reshape(n, 1), "INT64"))
        if request.steps is not None:
            inputs.append(self._input("STEPS", np.full((n, 1), request.steps, np.int32), "INT32"))
        if request.guidance is not None:
            inputs.append(self._input("GUIDANCE", np.full((n, 1), request.guidance, np.float32), "FP32"))
        outputs = [self._http.InferRequestedOutput("IMAGE", binary_data=True)]
        try:
            result = self.client.infer(self.model, inputs, outputs=outputs)
        except Exception as exc:  # InferenceServerException, connection errors
            message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
            raise RemoteError(f"server {self.url}: {message}",
                              "check the request values, or that `mmgen serve` is running") from None
        images = result.as_numpy("IMAGE")
        if images is None or images.shape[0] != n:
            raise RemoteError(f"server {self.url} returned {None if images is None else images.shape[0]} "
                              f"images for {n} requested")
        return images

    def statistics(self) -> dict[str, Any]:
        return dict(self.client.get_inference_statistics(self.model))

    def close(self) -> None:
        self.client.close()


def batch_sizes_executed(statistics: dict[str, Any]) -> dict[int, int]:
    """{batch size: execution count} from Triton's statistics (the dynamic batcher's merges)."""
    counts: dict[int, int] = {}
    for model in statistics.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            counts[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
    return counts
