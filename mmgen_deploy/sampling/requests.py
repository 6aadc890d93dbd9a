"""Images described one by one, generated together: what `mmgen serve`, `mmgen client` and `mmgen batch` share.

An `ImageSpec` is one image: its condition (a class id or a prompt), its seed and index (the
image draws its noise from `default_rng([seed, index])`, so image k of `mmgen generate --seed S`
is `ImageSpec(seed=S, index=k, ...)`), and its sampler settings. `sample_specs` takes any
mix of specs of one model, encodes each distinct prompt once, groups the images by
(steps, cfg_scale, sampler, cache policy) and samples each group with `sample(..., seeds=, indices=)`: an
image depends on its own spec only, never on what it was generated with (under an adaptive cache policy,
whose decisions are taken per batch, on the images of its own request: `request_ids`).

`expand_conditions` turns `generate`'s words (`--class NAME|ID` repeated, prompts, `--n`) into
one condition per image, in generate's order; `specs_for` adds the seeds and indices.
Only numpy and mmgen_deploy: this also runs inside the Triton Python-backend stub.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.sampling.cache import parse_cache_policy
from mmgen_deploy.sampling.conditioning import Conditioning, class_conditioning, text_conditioning
from mmgen_deploy.sampling.loop import SampleResult, check_seed, sample, validate_sampling_args

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.runtime.base import Runner
    from mmgen_deploy.text.tokenizer import WordTokenizer


@dataclass(frozen=True)
class ImageSpec:
    """One image: class_id (class models) or prompt (text models), seed and index, sampler settings."""

    seed: int
    index: int = 0
    class_id: int | None = None
    prompt: str | None = None
    steps: int = SAMPLING.steps
    cfg_scale: float = SAMPLING.cfg_scale
    sampler: str = SAMPLING.sampler
    cache: str = SAMPLING.cache  # step-caching policy (sampling.cache)

    @property
    def settings(self) -> tuple[int, float, str, str]:
        return (self.steps, self.cfg_scale, self.sampler, self.cache)


@dataclass
class GeneratedImages:
    images: np.ndarray  # uint8 (N, H, W, C), in the order of the specs
    results: list[SampleResult] = field(default_factory=list)  # one per (steps, cfg_scale, sampler, cache) group
    text_encoder_seconds: float = 0.0
    audio: np.ndarray | None = None  # an audio model's float32 (N, samples) waveforms, in the order of the specs

    @property
    def seconds(self) -> float:
        return sum(r.total_seconds for r in self.results) + self.text_encoder_seconds


def expand_conditions(config: ModelConfig, classes: Sequence[str | int], prompts: Sequence[str],
                      n: int) -> tuple[list[int] | None, list[str] | None]:
    """`generate`'s conditions, one per image: each class (name or id) or prompt `n` times, in order.

    Returns (class ids, None) for a class model (every class when none is given) or
    (None, prompts) for a text model; a prompt for a class model, or a class for a text
    model, is refused in one line.
    """
    from mmgen_deploy.sampling.conditioning import resolve_class

    if n < 1:
        raise UsageError(f"{{n}} must be >= 1, got {n}", params=["n"])
    if config.uses_text:
        if classes:
            raise UsageError("this model is conditioned on text: it takes prompts, not {classes}",
                             'use {prompts} "a large blue triangle at the top" (or {prompts_file} FILE)',
                             params=["classes", "prompts", "prompts_file"])
        if not prompts:
            raise UsageError("this text-to-image model needs prompts",
                             'pass {prompts} "a large blue triangle at the top" (repeatable) or {prompts_file} FILE',
                             params=["prompts", "prompts_file"])
        return None, [str(p) for p in prompts for _ in range(n)]
    if prompts:
        raise UsageError("this model is class-conditioned: it takes {classes}, not prompts",
                         "see `mmgen info RUN_DIR` for the class names", params=["classes"])
    class_ids = [resolve_class(config, str(c)) for c in classes] if classes else list(range(config.dit.num_classes))
    return [c for c in class_ids for _ in range(n)], None


def specs_for(class_ids: Sequence[int] | None, prompts: Sequence[str] | None, *, seed: int, steps: int,
              cfg_scale: float, sampler: str, first_index: int = 0) -> list[ImageSpec]:
    """Image i gets (seed, first_index + i): the images `mmgen generate --seed SEED` writes."""
    common = {"seed": seed, "steps": steps, "cfg_scale": float(cfg_scale), "sampler": sampler}
    if class_ids is not None:
        return [ImageSpec(index=first_index + i, class_id=int(c), **common)  # type: ignore[arg-type]
                for i, c in enumerate(class_ids)]
    return [ImageSpec(index=first_index + i, prompt=str(p), **common)  # type: ignore[arg-type]
            for i, p in enumerate(prompts or [])]


def check_specs(config: ModelConfig, specs: Sequence[ImageSpec]) -> None:
    """Refuse specs this model cannot generate, naming the first problem."""
    if not specs:
        raise UsageError("no images to generate")
    for spec in specs:
        if (spec.class_id is None) == (spec.prompt is None):
            raise UsageError("an image needs a class or a prompt (not both)")
        if config.uses_text and spec.prompt is None:
            raise UsageError("this model is conditioned on text: it takes prompts, not classes")
        if not config.uses_text and spec.class_id is None:
            raise UsageError("this model is class-conditioned: it takes classes, not prompts")
        check_seed(spec.seed)
        check_seed(spec.index, "index")
        validate_sampling_args(config, None if spec.class_id is None else [spec.class_id], steps=spec.steps,
                               sampler=spec.sampler, cfg_scale=spec.cfg_scale, batch_size=1, eta=SAMPLING.eta)
        parse_cache_policy(spec.cache)


def _subset(condition: Conditioning, rows: list[int]) -> Conditioning:
    pick = np.asarray(rows)
    return Conditioning(feeds={name: np.ascontiguousarray(values[pick]) for name, values in condition.feeds.items()},
                        null_feeds=condition.null_feeds,
                        class_ids=[condition.class_ids[r] for r in rows] if condition.class_ids else [],
                        prompts=[condition.prompts[r] for r in rows] if condition.prompts else [])


def sample_specs(runner: Runner, config: ModelConfig, specs: Sequence[ImageSpec], *,
                 tokenizer: WordTokenizer | None = None, batch_size: int = SAMPLING.batch_size,
                 request_ids: Sequence[int] | None = None) -> GeneratedImages:
    """Images for `specs` (in their order): prompts encoded once each, one `sample()` per settings group.

    `request_ids` (one per spec) say which request each image came from, when several requests are
    served together: images under a policy that couples a batch (`CachePolicy.couples_batch`,
    adaptive caching) are then grouped with their own request's images only, so each request gets
    the images it would get alone.
    """
    check_specs(config, specs)
    if request_ids is not None and len(request_ids) != len(specs):
        raise UsageError(f"{len(request_ids)} request ids for {len(specs)} images", "give one per image")
    if config.uses_text:
        if tokenizer is None:
            raise UsageError("a text-to-image model needs its tokenizer to encode prompts")
        condition = text_conditioning(runner, config, tokenizer, [str(s.prompt) for s in specs], max_batch=batch_size)
    else:
        condition = class_conditioning(config, [int(s.class_id) for s in specs])  # type: ignore[arg-type]
    groups: dict[tuple[tuple[int, float, str, str], int | None], list[int]] = defaultdict(list)
    for row, spec in enumerate(specs):
        request = None
        if request_ids is not None and parse_cache_policy(spec.cache).couples_batch:
            request = int(request_ids[row])
        groups[spec.settings, request].append(row)
    images: np.ndarray | None = None
    audio: np.ndarray | None = None
    results = []
    for ((steps, cfg_scale, sampler, cache), _request), rows in groups.items():
        result = sample(runner, config, _subset(condition, rows), steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                        batch_size=batch_size, seeds=[specs[r].seed for r in rows],
                        image_indices=[specs[r].index for r in rows], cache=cache)
        if images is None:
            images = np.empty((len(specs), *result.images.shape[1:]), dtype=np.uint8)
        images[rows] = result.images
        if result.audio is not None:
            if audio is None:
                audio = np.empty((len(specs), *result.audio.shape[1:]), dtype=np.float32)
            audio[rows] = result.audio
        results.append(result)
    assert images is not None
    return GeneratedImages(images=images, results=results, text_encoder_seconds=condition.encode_seconds,
                           audio=audio)
