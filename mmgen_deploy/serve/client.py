"""A small HTTP client for `mmgen_generate` (tritonclient; `mmgen client`, the benchmark, the tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.serve import MODEL_NAME

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.text.tokenizer import WordTokenizer


class RemoteError(MMGenError):
    """The server answered with an error (bad request, failed generation) or could not be reached."""


def _tritonclient_http() -> Any:
    try:
        import tritonclient.http as httpclient
    except ImportError as exc:
        raise NotAvailableError(f"tritonclient is not installed ({exc})",
                                "pip install 'mmgen-deploy[serve]'") from None
    return httpclient


def _message(exc: BaseException) -> str:
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return str(message)


def normalize_url(url: str) -> str:
    """`http://host:port`, `host:port` or `host` -> `host:port` as tritonclient wants it."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "") or not parsed.hostname:
        raise UsageError(f"cannot use server URL {url!r}",
                         "give http://HOST:PORT (the HTTP endpoint, default port 8000)")
    return f"{parsed.hostname}:{parsed.port or 8000}"


@dataclass(frozen=True)
class ImageRequest:
    """One request: row i = (class_ids[i], classes[i] or prompts[i]; seeds[i], indices[i]) at one
    steps / cfg_scale / sampler / cache policy (None: the server's default).

    `classes` are class names or ids as text (the CLASS input); `class_ids` integers (CLASS_ID).
    Row i draws its noise from default_rng([seeds[i], indices[i]]) (indices default to 0).
    """

    seeds: list[int]
    class_ids: list[int] | None = None
    prompts: list[str] | None = None
    classes: list[str] | None = None
    indices: list[int] | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        given = [labels for labels in (self.class_ids, self.classes, self.prompts) if labels is not None]
        if len(given) != 1:
            raise UsageError("give class ids, classes or prompts (exactly one of them)")
        if len(given[0]) != len(self.seeds) or not given[0]:
            raise UsageError(f"{len(given[0])} labels for {len(self.seeds)} seeds: give one seed per image")
        if self.indices is not None and len(self.indices) != len(self.seeds):
            raise UsageError(f"{len(self.indices)} indices for {len(self.seeds)} seeds: give one index per image")


@dataclass(frozen=True)
class ServedModel:
    """What the server says about `mmgen_generate` (its config.pbtxt parameters)."""

    config: ModelConfig
    tokenizer: WordTokenizer | None
    max_batch_size: int
    samplers: tuple[str, ...]
    default_sampler: str
    default_steps: int
    default_cfg_scale: float
    max_steps: int
    max_cfg_scale: float
    default_cache: str
    backend: str
    precision: str

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any]) -> ServedModel:
        from mmgen_deploy.config import ModelConfig
        from mmgen_deploy.text.tokenizer import WordTokenizer

        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        if "run_config" not in params:
            raise RemoteError("the served mmgen_generate model has no run_config parameter (written by an older "
                              "mmgen triton-repo)", "rewrite the repository with this version's `mmgen triton-repo`")
        config = ModelConfig.from_dict(json.loads(params["run_config"]))
        tokenizer = WordTokenizer.from_dict(json.loads(params["tokenizer"])) if params.get("tokenizer") else None
        samplers = tuple(s for s in params.get("samplers", SAMPLING.sampler).split(",") if s)
        return cls(config=config, tokenizer=tokenizer, max_batch_size=int(model_config.get("max_batch_size", 1)),
                   samplers=samplers, default_sampler=params.get("default_sampler", samplers[0]),
                   default_steps=int(params.get("default_steps", SAMPLING.steps)),
                   default_cfg_scale=float(params.get("default_cfg_scale", SAMPLING.cfg_scale)),
                   max_steps=int(params.get("max_steps", SAMPLING.max_steps)),
                   max_cfg_scale=float(params.get("max_cfg_scale", SAMPLING.max_cfg_scale)),
                   default_cache=params.get("default_cache", SAMPLING.cache),
                   backend=params.get("backend", "auto"), precision=params.get("precision", "auto"))


class GenerateClient:
    """Thread-confined HTTP client (make one per thread: tritonclient's HTTP client is not thread-safe)."""

    def __init__(self, url: str, *, timeout_s: float = 300.0, model: str = MODEL_NAME) -> None:
        self._http = _tritonclient_http()
        self.url = normalize_url(url)
        self.model_name = model
        self.client = self._http.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                       network_timeout=timeout_s)

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model_name))
        except Exception:  # connection refused and friends: simply not ready
            return False

    def _input(self, name: str, array: np.ndarray, datatype: str) -> Any:
        tensor = self._http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        return tensor

    def model(self) -> ServedModel:
        """The served model's run config, tokenizer, defaults and limits."""
        try:
            model_config = self.client.get_model_config(self.model_name)
        except Exception as exc:
            raise RemoteError(f"server {self.url}: {_message(exc)}",
                              "check the URL, or that `mmgen serve` is running") from None
        return ServedModel.from_model_config(dict(model_config))

    def generate(self, request: ImageRequest) -> np.ndarray:
        """uint8 images (N, H, W, C) for one request; RemoteError with the server's message otherwise."""
        return self.generate_outputs(request, audio=False)[0]

    def generate_outputs(self, request: ImageRequest, *, audio: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(images, waveforms) for one request. `audio` (an audio run: `ServedModel.config.audio` is set)
        also asks for the float32 (N, samples) waveforms; otherwise they are None."""
        n = len(request.seeds)

        def strings(values: list[str]) -> np.ndarray:
            return np.asarray([v.encode() for v in values], dtype=np.object_).reshape(n, 1)

        inputs = []
        if request.class_ids is not None:
            inputs.append(self._input("CLASS_ID", np.asarray(request.class_ids, np.int32).reshape(n, 1), "INT32"))
        elif request.classes is not None:
            inputs.append(self._input("CLASS", strings(request.classes), "BYTES"))
        else:
            assert request.prompts is not None
            inputs.append(self._input("PROMPT", strings(request.prompts), "BYTES"))
        inputs.append(self._input("SEED", np.asarray(request.seeds, np.int64).reshape(n, 1), "INT64"))
        if request.indices is not None:
            inputs.append(self._input("INDEX", np.asarray(request.indices, np.int64).reshape(n, 1), "INT64"))
        if request.steps is not None:
            inputs.append(self._input("STEPS", np.full((n, 1), request.steps, np.int32), "INT32"))
        if request.cfg_scale is not None:
            inputs.append(self._input("CFG_SCALE", np.full((n, 1), request.cfg_scale, np.float32), "FP32"))
        if request.sampler is not None:
            inputs.append(self._input("SAMPLER", strings([request.sampler] * n), "BYTES"))
        if request.cache is not None:
            inputs.append(self._input("CACHE", strings([request.cache] * n), "BYTES"))
        outputs = [self._http.InferRequestedOutput(name, binary_data=True)
                   for name in ("IMAGE", *(("AUDIO",) if audio else ()))]
        try:
            result = self.client.infer(self.model_name, inputs, outputs=outputs)
        except Exception as exc:  # InferenceServerException, connection errors
            raise RemoteError(f"server {self.url}: {_message(exc)}",
                              "check the request values, or that `mmgen serve` is running") from None
        images = result.as_numpy("IMAGE")
        if images is None or images.shape[0] != n:
            raise RemoteError(f"server {self.url} returned {None if images is None else images.shape[0]} "
                              f"images for {n} requested")
        if not audio:
            return images, None
        waveforms = result.as_numpy("AUDIO")
        if waveforms is None or waveforms.shape[0] != n:
            raise RemoteError(f"server {self.url} returned no waveforms for an audio run",
                              "rewrite the repository with this version's `mmgen triton-repo`")
        return images, waveforms

    def statistics(self) -> dict[str, Any]:
        return dict(self.client.get_inference_statistics(self.model_name))

    def close(self) -> None:
        self.client.close()


def batch_sizes_executed(statistics: dict[str, Any]) -> dict[int, int]:
    """{batch size: execution count} from Triton's statistics (the dynamic batcher's merges)."""
    counts: dict[int, int] = {}
    for model in statistics.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            counts[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
    return counts
