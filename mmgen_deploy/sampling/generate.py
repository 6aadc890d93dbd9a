"""Generate images into a folder: the library behind `mmgen generate` and the quickstart's generate stage.

    request -> checked (numbers first, then against the run's config) -> open_runner ->
    make_conditioning -> sample -> PNGs + grid.png + samples.json, written atomically into
    RUN_DIR/samples/<backend>-<precision>-<sampler>-<steps>steps-seed<seed>/ (named after the
    backend that actually ran) or the requested folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.sampling.cache import parse_cache_policy
from mmgen_deploy.sampling.conditioning import Conditioning, make_conditioning
from mmgen_deploy.sampling.loop import (
    ProgressCallback,
    SampleResult,
    check_sampling_numbers,
    run_sampling_defaults,
    sample,
)
from mmgen_deploy.sampling.loop import validate_sampling_args as _validate

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.runtime.select import BackendChoice


@dataclass
class GenerateRequest:
    """What to generate and on which backend (the options of `mmgen generate`)."""

    classes: Sequence[str] = ()  # class models: names ("red circle") or ids ("3"); empty: every class
    prompts: Sequence[str] = ()  # text-to-image models
    n: int = 4  # images per class or prompt
    batch_size: int = SAMPLING.batch_size
    # None: the run's own (`run_sampling_defaults`: a distilled student's, otherwise `defaults.SAMPLING`).
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    eta: float = SAMPLING.eta
    cache: str = SAMPLING.cache  # step-caching policy (sampling.cache)
    seed: int = 0
    backend: str = "auto"
    precision: str | None = None
    device: str | None = None
    threads: int | None = None
    cuda_graph: bool = False
    out: Path | None = None  # None: a folder under RUN_DIR/samples named after the backend that ran

    def check(self) -> None:
        """The checks that need no run directory (messages name the fields: `MMGenError.params`)."""
        if not 1 <= self.n <= SAMPLING.max_generate_images:
            raise UsageError(f"{{n}} must be in 1..{SAMPLING.max_generate_images}, got {self.n}",
                             "generate keeps every image in memory; `mmgen batch` writes any number", params=["n"])
        check_sampling_numbers(steps=SAMPLING.steps if self.steps is None else self.steps,
                               sampler=self.sampler or SAMPLING.sampler,
                               cfg_scale=SAMPLING.cfg_scale if self.cfg_scale is None else self.cfg_scale,
                               batch_size=self.batch_size, eta=self.eta, seed=self.seed)
        parse_cache_policy(self.cache)
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"{{threads}} must be >= 1, got {self.threads}", params=["threads"])

    def for_run(self, config: ModelConfig) -> GenerateRequest:
        """This request with the settings left out filled in from the run (`run_sampling_defaults`)."""
        own = run_sampling_defaults(config)
        return dataclasses.replace(
            self, steps=int(own["steps"]) if self.steps is None else self.steps,
            sampler=str(own["sampler"]) if self.sampler is None else self.sampler,
            cfg_scale=float(own["cfg_scale"]) if self.cfg_scale is None else self.cfg_scale)


@dataclass
class Generated:
    out: Path
    sidecar: dict[str, Any]  # what samples.json holds
    result: SampleResult
    choice: BackendChoice
    conditioning: Conditioning


def check_image_count(class_ids: Sequence[int] | None, prompts: Sequence[str] | None, n: int) -> None:
    """Refuse more images than one generate (or client) holds in memory: n times the conditions."""
    count = len(class_ids or prompts or ())
    if count > SAMPLING.max_generate_images:
        raise UsageError(f"{count} images ({{n}} {n} for each of {count // n} "
                         f"{'prompts' if prompts else 'classes'}) is more than one generate makes "
                         f"({SAMPLING.max_generate_images})",
                         "lower {n}, or use `mmgen batch` (it writes images as they are made)", params=["n"])


def check_output_dir(target: Path, command: str = "mmgen generate") -> None:
    """Replace only folders that `generate` (or `client`, which writes the same) wrote; never swallow
    someone's other files, and never a link, a device or anything else that is not a folder."""
    from mmgen_deploy.io_utils import check_write_target

    if target.is_file() and not target.is_symlink():
        raise UsageError(f"{{out}} {target} is a file", "give a folder path", params=["out"])
    check_write_target(target, folder=True, param="out")
    if target.is_dir() and any(target.iterdir()) and not (target / "samples.json").is_file():
        raise UsageError(f"{{out}} {target} exists and was not written by `{command}`",
                         f"choose another {{out}} folder ({command} replaces only its own output folders)",
                         params=["out"])


def generate_to_folder(run_dir: RunLike, request: GenerateRequest, *, progress: ProgressCallback | None = None,
                    on_backend: Callable[[BackendChoice], None] | None = None,
                    on_conditioning: Callable[[Conditioning], None] | None = None) -> Generated:
    """Sample `request.n` images per class or prompt and write them (atomically) into a folder.

    `on_backend` hears which backend was opened (before sampling), `on_conditioning` what the
    conditioning recorded (unknown words, cut prompts), `progress` the denoising steps. Samples
    written inside the run directory (the default) hold its writer lock (`RunDir.writing`).
    """
    run = RunDir.of(run_dir)
    with run.writing_into(request.out, "write samples"):
        return _generate_images(run, request, progress=progress, on_backend=on_backend,
                                on_conditioning=on_conditioning)


def _generate_images(run_dir: RunLike, request: GenerateRequest, *, progress: ProgressCallback | None,
                     on_backend: Callable[[BackendChoice], None] | None,
                     on_conditioning: Callable[[Conditioning], None] | None) -> Generated:
    from mmgen_deploy.io_utils import atomic_dir, write_json
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.files import write_samples
    from mmgen_deploy.sampling.requests import expand_conditions

    request.check()
    run = RunDir.of(run_dir)
    config = run.load_config()
    request = request.for_run(config)
    assert request.steps is not None and request.sampler is not None and request.cfg_scale is not None
    class_ids, prompt_rows = expand_conditions(config, request.classes, request.prompts, request.n)
    check_image_count(class_ids, prompt_rows, request.n)
    per_image: list[int] = class_ids or []
    per_prompt: list[str] = prompt_rows or []
    tokenizer = run.load_tokenizer() if config.uses_text else None
    _validate(config, per_image if not config.uses_text else None, steps=request.steps, sampler=request.sampler,
              cfg_scale=request.cfg_scale, batch_size=request.batch_size, eta=request.eta)
    if request.out is not None:
        check_output_dir(request.out)

    runner, choice = open_runner(run, request.backend, request.precision, device=request.device,
                                 threads=request.threads, **({"cuda_graph": True} if request.cuda_graph else {}))
    try:
        # Named after the backend that actually runs (with auto, a TensorRT load failure falls back).
        policy = parse_cache_policy(request.cache)
        cached = f"-cache-{policy.spec.replace(':', '')}" if policy.enabled else ""
        target = request.out or run.samples_dir / (f"{choice.backend}-{choice.precision}-{request.sampler}-"
                                                   f"{request.steps}steps-seed{request.seed}{cached}")
        check_output_dir(target)
        if on_backend is not None:
            on_backend(choice)
        condition = make_conditioning(runner, config, class_ids=per_image, prompts=per_prompt, tokenizer=tokenizer)
        if on_conditioning is not None:
            on_conditioning(condition)
        result = sample(runner, config, condition, steps=request.steps, sampler=request.sampler,
                        cfg_scale=request.cfg_scale, seed=request.seed, batch_size=request.batch_size,
                        eta=request.eta, progress=progress, cache=policy)
    finally:
        runner.close()

    with atomic_dir(target) as tmp:
        sidecar = write_samples(result, config, tmp, images_per_class=request.n,
                                extra={"run_dir": str(run.root), "backend_choice": choice.describe(),
                                       "skipped_backends": choice.skipped})
        sidecar["backend"]["threads"] = request.threads  # None: the backend's default
        write_json(tmp / "samples.json", sidecar)
    sidecar["out"] = str(target)
    return Generated(out=target, sidecar=sidecar, result=result, choice=choice, conditioning=condition)
