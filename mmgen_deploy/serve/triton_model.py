"""Triton Python-backend model `mmgen_generate`, copied as `<repo>/mmgen_generate/1/model.py`.

Request semantics (one row of a request = one image; a request may carry several rows):
  CLASS      BYTES [1]  class models: a class name ("red circle") or id ("3")   (CLASS, CLASS_ID or PROMPT)
  CLASS_ID   INT32 [1]  class models: a class index in [0, num_classes)
  PROMPT     BYTES [1]  text-to-image models: a text prompt
  SEED       INT64 [1]  >= 0 (default 0)
  INDEX      INT64 [1]  >= 0 (default 0): the image draws its noise from default_rng([SEED, INDEX]),
                        so it equals image INDEX of `mmgen generate --seed SEED`
  STEPS      INT32 [1]  sampling steps in [1, max_steps]                (default: parameter default_steps)
  CFG_SCALE  FP32  [1]  classifier-free guidance scale in [0, max_cfg_scale] (default_cfg_scale)
  SAMPLER    BYTES [1]  one of the parameter `samplers`                   (default_sampler)
  CACHE      BYTES [1]  step-caching policy: none, every:N or adaptive:T  (default_cache); any but
                        none needs the denoiser's parts, which the server checks once, on first use
  -> IMAGE   UINT8 [H, W, C]
  -> AUDIO   FP32  [samples]  audio runs only: the vocoder's waveform of the row's spectrogram IMAGE
                        (1.0 = full scale, at the run's sample rate): the float32 samples `mmgen generate`
                        writes into its 16-bit WAV, so a client that quantises them the same way writes the
                        same WAV data

Triton's dynamic batcher hands `execute` several requests at once. All their rows go to one
`sample_specs` call: every distinct prompt is encoded once, rows are grouped by
(steps, cfg_scale, sampler, cache policy), and each group is sampled in one call with one (seed, index)
per image, so an image depends only on its own row, never on what it was batched with. An adaptive
cache policy decides over a whole batch, so its rows are grouped with their own request's only: each
request gets the images it gets alone.
A malformed request (a prompt sent to a class model, a class and a prompt together, a value out
of range) gets its own error response naming the problem; the others in the batch are served.

This file runs inside the Triton Python-backend stub, not in mmgen's process: it only uses
numpy, triton_python_backend_utils and mmgen_deploy's runtime/sampling API.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

# `mmgen serve` runs the stub on a source checkout: its path comes through this variable because
# the stub's embedded interpreter ignores PYTHONPATH.
for _entry in reversed(os.environ.get("MMGEN_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend)

from mmgen_deploy.defaults import SAMPLING  # noqa: E402


class RequestError(ValueError):
    """A request the model refuses; its message goes back to the client as a Triton error."""


def _optional(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonComponentRunner:
    """A `Runner` whose components are other models of this Triton server (BLS requests).

    The ensemble layout's sampling loop: `sample()` is unchanged, but each denoiser, quantizer and
    decoder call is an inference request that Triton schedules on the component model.
    """

    backend = "triton-bls"
    precision = "as exported"
    device = "triton"

    def __init__(self, specs: dict[str, Any], prefix: str) -> None:
        self.specs = specs
        self.prefix = prefix

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        inputs = []
        for tensor in spec.inputs:
            array = np.ascontiguousarray(feeds[tensor.name])
            if array.ndim == 1:  # declared [1] + reshape [] in config.pbtxt: send [batch, 1]
                array = array.reshape(-1, 1)
            inputs.append(pb_utils.Tensor(tensor.name, array))
        request = pb_utils.InferenceRequest(model_name=self.prefix + component, inputs=inputs,
                                            requested_output_names=spec.output_names)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.prefix}{component}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in spec.output_names}

    def close(self) -> None:
        pass


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        run_dir = Path(params.get("run_dir", "run"))
        if not run_dir.is_absolute():
            run_dir = version_dir / run_dir

        from mmgen_deploy.rundir import RunDir

        # Load (and so verify) the run first: a broken run fails the load with RunDir's message.
        run = RunDir(run_dir)
        self.config = run.load_config()
        use_bls = params.get("runner", "local") == "bls"
        if not use_bls:
            from mmgen_deploy.models.load import load_deployable

            load_deployable(run)
        self.tokenizer = run.load_tokenizer() if self.config.uses_text else None
        self.num_classes = self.config.dit.num_classes

        from mmgen_deploy.runtime import open_runner
        from mmgen_deploy.sampling.requests import sample_specs

        self.samplers = [s for s in params.get("samplers", SAMPLING.sampler).split(",") if s]
        self.default_sampler = params.get("default_sampler", self.samplers[0])
        self.default_steps = int(params.get("default_steps", SAMPLING.steps))
        self.default_cfg_scale = float(params.get("default_cfg_scale", SAMPLING.cfg_scale))
        self.max_steps = int(params.get("max_steps", SAMPLING.max_steps))
        self.max_cfg_scale = float(params.get("max_cfg_scale", SAMPLING.max_cfg_scale))
        from mmgen_deploy.sampling.cache import parse_cache_policy

        self._parse_cache_policy: Any = parse_cache_policy
        self.default_cache = parse_cache_policy(params.get("default_cache", SAMPLING.cache)).spec
        self._caching_checked = False  # whether this server can run the denoiser's parts: found on first use
        self._caching_problem: str | None = None
        self.batch_size = max(1, int(model_config.get("max_batch_size", SAMPLING.batch_size)))
        precision = params.get("precision", "auto")
        threads = int(params.get("threads", "0"))
        self.runner: Any
        choice = None
        if use_bls:
            from mmgen_deploy.specs import component_specs

            self.runner = TritonComponentRunner(component_specs(self.config, parts=True),
                                                params.get("component_prefix", "mmgen_"))
        else:
            self.runner, choice = open_runner(run_dir, params.get("backend", "auto"),
                                              None if precision == "auto" else precision, threads=threads or None)
        self._sample_specs: Any = sample_specs
        described = choice.describe() if choice is not None else getattr(self.runner, "backend", "?")
        kind = "text prompts" if self.config.uses_text else f"{self.num_classes} classes"
        pb_utils.Logger.log_info(f"mmgen_generate: run {run_dir}; {described}; {kind}; samplers "
                                 f"{','.join(self.samplers)} (default {self.default_sampler})")

    # -- parsing ----------------------------------------------------------------------
    def _conditions(self, request: Any) -> tuple[list[int] | None, list[str] | None]:
        """(class ids, None) or (None, prompts) of one request, checked against this model."""
        from mmgen_deploy.errors import UsageError
        from mmgen_deploy.sampling.conditioning import resolve_class

        names = _optional(request, "CLASS")
        ids = _optional(request, "CLASS_ID")
        prompts = _optional(request, "PROMPT")
        given = [name for name, value in (("CLASS", names), ("CLASS_ID", ids), ("PROMPT", prompts))
                 if value is not None]
        if len(given) > 1:
            raise RequestError(f"the request mixes {' and '.join(given)}: send one of CLASS (a class name or id), "
                               "CLASS_ID or PROMPT per request")
        if self.config.uses_text:
            if prompts is None:
                raise RequestError(f"this model is text-to-image: send PROMPT (a text prompt), not {given[0]}"
                                   if given else "send PROMPT (a text prompt): this model is text-to-image")
            return None, _strings(prompts)
        if prompts is not None:
            example = ", ".join(repr(n) for n in self.config.class_names[:3]) or f"0..{self.num_classes - 1}"
            raise RequestError(f"this model is class-conditioned: it takes CLASS (a class name or id, e.g. "
                               f"{example}), not PROMPT")
        if names is None and ids is None:
            raise RequestError("send CLASS (a class name or id) or CLASS_ID: this model is class-conditioned")
        if ids is not None:
            classes = [int(c) for c in ids.reshape(-1)]
            for c in classes:
                if not 0 <= c < self.num_classes:
                    raise RequestError(f"class id {c} is out of range: this model has classes "
                                       f"0..{self.num_classes - 1}")
            return classes, None
        assert names is not None
        try:
            return [resolve_class(self.config, name) for name in _strings(names)], None
        except UsageError as exc:
            raise RequestError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None

    def _specs(self, request: Any) -> list[Any]:
        """One ImageSpec per row of one request, validated."""
        from mmgen_deploy.sampling.requests import ImageSpec

        class_ids, prompts = self._conditions(request)
        labels: list[Any] = class_ids if class_ids is not None else (prompts or [])
        n = len(labels)
        if n == 0:
            raise RequestError("the request has no images (empty batch)")

        def column(name: str, default: Any, cast: Any) -> list[Any]:
            values = _optional(request, name)
            if values is None:
                return [cast(default)] * n
            flat = _strings(values) if values.dtype == np.object_ else list(values.reshape(-1))
            if len(flat) != n:
                raise RequestError(f"{name} has {len(flat)} values for {n} images")
            return [cast(v) for v in flat]

        seeds = column("SEED", 0, int)
        indices = column("INDEX", 0, int)
        steps = column("STEPS", self.default_steps, int)
        cfg_scales = column("CFG_SCALE", self.default_cfg_scale, float)
        samplers = column("SAMPLER", self.default_sampler, str)
        caches = [self._cache_policy(text) for text in column("CACHE", self.default_cache, str)]
        for name, values in (("seed", seeds), ("index", indices)):
            for v in values:
                if v < 0:
                    raise RequestError(f"{name} {v} is negative: seeds and indices must be >= 0")
        for s in steps:
            if not 1 <= s <= self.max_steps:
                raise RequestError(f"steps {s} is out of range: use 1..{self.max_steps}")
        for g in cfg_scales:
            if not (math.isfinite(g) and 0.0 <= g <= self.max_cfg_scale):
                raise RequestError(f"cfg_scale {g} is out of range: use 0..{self.max_cfg_scale:g}")
        for s in samplers:
            if s not in self.samplers:
                raise RequestError(f"sampler {s!r} is not served here: use one of {', '.join(self.samplers)}")
        return [ImageSpec(seed=seed, index=index, class_id=None if class_ids is None else label,
                          prompt=None if prompts is None else label, steps=st, cfg_scale=g, sampler=sm, cache=c)
                for label, seed, index, st, g, sm, c in zip(labels, seeds, indices, steps, cfg_scales, samplers,
                                                            caches, strict=True)]

    def _cache_policy(self, text: str) -> str:
        """A request's cache policy, normalised (`EVERY:2` -> `every:2`), or the reason it cannot be served."""
        from mmgen_deploy.errors import UsageError

        try:
            policy = self._parse_cache_policy(text)
        except UsageError as exc:
            raise RequestError(str(exc)) from None
        if policy.enabled:
            problem = self._caching_unavailable()
            if problem is not None:
                raise RequestError(f"cache {policy.spec} is not served here: {problem}")
        return str(policy.spec)

    def _caching_unavailable(self) -> str | None:
        """Why this server cannot run a cache policy (None: it can). Found once, by running each of the
        denoiser's parts on random inputs of the smallest batch an engine takes: this loads them where they
        are and names what is missing."""
        if self._caching_checked:
            return self._caching_problem
        from mmgen_deploy.errors import MMGenError
        from mmgen_deploy.specs import DENOISER_PARTS, component_specs, has_denoiser_parts

        problem = None
        if not has_denoiser_parts(self.config.dit):
            problem = (f"this model's DiT has {self.config.dit.depth} block(s), too few to split into the parts "
                       "step caching reuses")
        else:
            specs = component_specs(self.config, parts=True)
            rng = np.random.default_rng(0)
            try:
                for part in DENOISER_PARTS:
                    self.runner.run(part, specs[part].make_inputs(specs[part].engine_profile.min, rng))
            except MMGenError as exc:
                problem = str(exc)
            except Exception as exc:  # a BLS request to a part model the repository does not have
                problem = (f"{type(exc).__name__}: {exc} (write the repository after `mmgen export RUN_DIR "
                           "--components denoiser_parts`)")
        self._caching_checked, self._caching_problem = True, problem
        if problem is not None:
            pb_utils.Logger.log_info(f"mmgen_generate: step caching is not served: {problem}")
        return problem

    # -- serving ----------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, list[Any]] = {}
        for index, request in enumerate(requests):
            try:
                parsed[index] = self._specs(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if not parsed:
            return responses
        try:
            # One call for the whole dynamic batch: prompts encoded once, one sample() per settings group.
            everything = [spec for specs in parsed.values() for spec in specs]
            request_ids = [index for index, specs in parsed.items() for _ in specs]
            outputs = self._generate(everything, request_ids)
            offset = 0
            for index, specs in parsed.items():
                responses[index] = self._response({name: array[offset:offset + len(specs)]
                                                   for name, array in outputs.items()})
                offset += len(specs)
        except Exception:
            # Something failed in the merged batch: each request alone, so a failure stays with its request.
            for index, specs in parsed.items():
                try:
                    responses[index] = self._response(self._generate(specs))
                except Exception as exc:
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"generation failed: {type(exc).__name__}: {exc}"))
        return responses

    def _generate(self, specs: list[Any], request_ids: list[int] | None = None) -> dict[str, np.ndarray]:
        """The output tensors of these rows: IMAGE, and AUDIO for an audio run (the sampling loop runs
        its vocoder)."""
        result = self._sample_specs(self.runner, self.config, specs, tokenizer=self.tokenizer,
                                    batch_size=self.batch_size, request_ids=request_ids)
        if len(result.images) != len(specs):
            raise RuntimeError(f"sample_specs returned {len(result.images)} images for {len(specs)}")
        outputs = {"IMAGE": np.asarray(result.images, dtype=np.uint8)}
        if self.config.audio is not None:
            if result.audio is None or len(result.audio) != len(specs):
                raise RuntimeError("the sampling loop returned no waveform for this audio run")
            outputs["AUDIO"] = np.asarray(result.audio, dtype=np.float32)
        return outputs

    @staticmethod
    def _response(outputs: dict[str, np.ndarray]) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(array))
                                                          for name, array in outputs.items()])

    def finalize(self) -> None:
        close = getattr(getattr(self, "runner", None), "close", None)
        if callable(close):
            close()
