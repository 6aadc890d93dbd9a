"""Triton Python-backend model `mmgen_generate`, copied as `<repo>/mmgen_generate/1/model.py`.

Request semantics (one row of a request = one image; a request may carry several rows):
  CLASS_ID  INT32 [1]  class index in [0, num_classes)      (CLASS_ID or PROMPT per request)
  PROMPT    BYTES [1]  a class name from the run's class_names
  SEED      INT64 [1]  >= 0; the image equals `mmgen generate --seed SEED --n 1` (default 0)
  STEPS     INT32 [1]  sampling steps in [1, max_steps]        (default: parameter default_steps)
  GUIDANCE  FP32  [1]  classifier-free guidance scale in [0, max_guidance] (default_guidance)
  -> IMAGE  UINT8 [H, W, 3]

Triton's dynamic batcher hands `execute` several requests at once. Rows are grouped by
(steps, guidance) and each group is sampled in one call with one seed per image, so an image
depends only on its own (class, seed, steps, guidance), never on what it was batched with.
A malformed request gets its own error response; the others in the batch are still served.

This file runs inside the Triton Python-backend stub, not in mmgen's process: it only uses
numpy, triton_python_backend_utils and mmgen_deploy's runtime/sampling API.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# `mmgen serve` runs the stub on a source checkout: its path comes through this variable because
# the stub's embedded interpreter ignores PYTHONPATH.
for _entry in reversed(os.environ.get("MMGEN_PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend)


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
            run.load_models()
        self.num_classes = self.config.dit.num_classes
        self.class_index = {name.lower(): i for i, name in enumerate(self.config.class_names)}

        import inspect

        from mmgen_deploy.runtime import open_runner
        from mmgen_deploy.sampling import sample

        self.sampler = params.get("sampler", "ddim")
        self.default_steps = int(params.get("default_steps", "50"))
        self.default_guidance = float(params.get("default_guidance", "4.0"))
        self.max_steps = int(params.get("max_steps", "250"))
        self.max_guidance = float(params.get("max_guidance", "50"))
        self.batch_size = max(1, int(model_config.get("max_batch_size", 16)))
        precision = params.get("precision", "auto")
        threads = int(params.get("threads", "0"))
        self.runner: Any
        choice = None
        if use_bls:
            from mmgen_deploy.specs import component_specs

            self.runner = TritonComponentRunner(component_specs(self.config), params.get("component_prefix", "mmgen_"))
        else:
            self.runner, choice = open_runner(run_dir, params.get("backend", "auto"),
                                      None if precision == "auto" else precision, threads=threads or None)
        self._sample: Any = sample  # Any: `seeds=` is only passed where sample() accepts it
        # With per-image seeds, one call samples a whole group; without (an older sample()), each
        # image is sampled alone with its seed, which gives the same image, just unbatched.
        self._per_image_seeds = "seeds" in inspect.signature(sample).parameters
        described = choice.describe() if choice is not None else getattr(self.runner, "backend", "?")
        pb_utils.Logger.log_info(f"mmgen_generate: run {run_dir}; {described}; {self.num_classes} classes; "
                                 f"sampler {self.sampler}; batched seeds: {self._per_image_seeds}")

    # -- parsing ----------------------------------------------------------------------
    def _rows(self, request: Any) -> list[tuple[int, int, int, float]]:
        """(class_id, seed, steps, guidance) for every row of one request, validated."""
        class_ids = _optional(request, "CLASS_ID")
        prompts = _optional(request, "PROMPT")
        if (class_ids is None) == (prompts is None):
            raise RequestError("send exactly one of CLASS_ID (class index) or PROMPT (class name)")
        if class_ids is not None:
            classes = [int(c) for c in class_ids.reshape(-1)]
        else:
            assert prompts is not None
            classes = []
            for raw in prompts.reshape(-1):
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if name.lower() not in self.class_index:
                    known = ", ".join(self.config.class_names) or "none: this model has no class names"
                    raise RequestError(f"unknown class name {name!r} (known: {known})")
                classes.append(self.class_index[name.lower()])
        n = len(classes)
        if n == 0:
            raise RequestError("the request has no images (empty batch)")

        def column(name: str, default: float, cast: type) -> list[Any]:
            values = _optional(request, name)
            if values is None:
                return [cast(default)] * n
            flat = values.reshape(-1)
            if flat.size != n:
                raise RequestError(f"{name} has {flat.size} values for {n} images")
            return [cast(v) for v in flat]

        seeds = column("SEED", 0, int)
        steps = column("STEPS", self.default_steps, int)
        guidance = column("GUIDANCE", self.default_guidance, float)
        for c in classes:
            if not 0 <= c < self.num_classes:
                raise RequestError(f"class id {c} is out of range: this model has classes 0..{self.num_classes - 1}")
        for s in seeds:
            if s < 0:
                raise RequestError(f"seed {s} is negative: seeds must be >= 0")
        for s in steps:
            if not 1 <= s <= self.max_steps:
                raise RequestError(f"steps {s} is out of range: use 1..{self.max_steps}")
        for g in guidance:
            if not (math.isfinite(g) and 0.0 <= g <= self.max_guidance):
                raise RequestError(f"guidance {g} is out of range: use 0..{self.max_guidance:g}")
        return list(zip(classes, seeds, steps, guidance, strict=True))

    # -- serving ----------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: dict[int, list[np.ndarray | None]] = {}
        groups: dict[tuple[int, float], list[tuple[int, int, int, int]]] = defaultdict(list)
        for index, request in enumerate(requests):
            try:
                rows = self._rows(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            images[index] = [None] * len(rows)
            for row, (class_id, seed, steps, guidance) in enumerate(rows):
                groups[(steps, guidance)].append((index, row, class_id, seed))

        for (steps, guidance), members in groups.items():
            try:
                batch = self._generate([m[2] for m in members], [m[3] for m in members], steps, guidance)
                if len(batch) != len(members):
                    raise RuntimeError(f"sample() returned {len(batch)} images for {len(members)}")
            except Exception as exc:  # a failing group fails its own requests only
                for index, _row, _c, _s in members:
                    responses[index] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"generation failed: {type(exc).__name__}: {exc}"))
                    images.pop(index, None)
                continue
            for (index, row, _c, _s), image in zip(members, batch, strict=True):
                if index in images:
                    images[index][row] = image

        for index, done in images.items():
            if responses[index] is None and all(image is not None for image in done):
                stacked = np.ascontiguousarray(np.stack(done))  # type: ignore[arg-type]
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", stacked)])
        return responses

    def _generate(self, class_ids: list[int], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 images, image i from (class_ids[i], seeds[i]) exactly as `mmgen generate --seed` makes it."""
        common = {"steps": steps, "sampler": self.sampler, "cfg_scale": guidance, "batch_size": self.batch_size}
        if self._per_image_seeds:
            result = self._sample(self.runner, self.config, class_ids, seeds=seeds, **common)
            return np.asarray(result.images, dtype=np.uint8)
        return np.concatenate([np.asarray(self._sample(self.runner, self.config, [c], seed=s, **common).images,
                                          dtype=np.uint8) for c, s in zip(class_ids, seeds, strict=True)])

    def finalize(self) -> None:
        close = getattr(getattr(self, "runner", None), "close", None)
        if callable(close):
            close()
