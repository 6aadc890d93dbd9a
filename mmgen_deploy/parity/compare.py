"""`mmgen parity`: a backend against PyTorch FP32, per component and end to end.

Both sides are driven through the same runner interface, on the same inputs, so the
numbers measure the runtime and the precision, not differences in plumbing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError, UsageError
from mmgen_deploy.numerics import compare_output, index_agreement, psnr, ssim, take_batch, tensor_diff
from mmgen_deploy.parity.report import Check, ParityReport
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.sampling.cache import parse_cache_policy
from mmgen_deploy.specs import (
    DENOISER_PARTS,
    PIPELINE_TOLERANCES,
    QUANTIZED_PRECISIONS,
    ComponentSpec,
    Tensors,
    component_specs,
    random_feeds,
)


@dataclass
class ToleranceOverrides:
    """User overrides: `rel_l2` and `max_abs` per output name (or "*" for all), and
    end-to-end thresholds. Unset values fall back to the component specs."""

    rel_l2: dict[str, float] = field(default_factory=dict)
    max_abs: dict[str, float] = field(default_factory=dict)
    min_psnr: float | None = None
    min_index_agreement: float | None = None

    def output_rel_l2(self, output: str, default: float) -> float:
        return self.rel_l2.get(output, self.rel_l2.get("*", default))

    def output_max_abs(self, output: str) -> float | None:
        return self.max_abs.get(output, self.max_abs.get("*"))


class UntrainedModelError(MMGenError):
    pass


# A denoiser whose output RMS is below this fraction of its noisy input's RMS is "negligible":
# it has hardly left adaLN-Zero, so any backend matches it within tolerance whatever it computes.
# Measured on the tiny preset (random inputs, batch 8): a fresh DiT 0, a DiT trained 2 steps (EMA)
# 0.0034, re-randomised weights (the tests' models) 0.23, trained 120 steps 1.09 (an epsilon
# predictor aims at the noise itself, RMS 1).
MIN_OUTPUT_SCALE = 0.05


@dataclass(frozen=True)
class OutputScale:
    """How large the denoiser's output is next to its input, on the inputs parity compares."""

    output_rms: float
    input_rms: float
    threshold: float = MIN_OUTPUT_SCALE

    @property
    def ratio(self) -> float:
        return self.output_rms / self.input_rms if self.input_rms > 0 else 0.0

    @property
    def meaningful(self) -> bool:
        return self.ratio >= self.threshold

    def describe(self) -> str:
        return (f"denoiser output RMS {self.output_rms:.3g} vs input x_t RMS {self.input_rms:.3g}: "
                f"ratio {self.ratio:.3g}, negligible below {self.threshold:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"output_rms": self.output_rms, "input_rms": self.input_rms, "ratio": self.ratio,
                "threshold": self.threshold, "meaningful": self.meaningful}


def denoiser_output_scale(reference: Any, config: ModelConfig, *, batch: int = 8, seed: int = 0,
                          threshold: float = MIN_OUTPUT_SCALE) -> OutputScale:
    """The RMS of the reference denoiser's output next to that of its noisy input x_t, on random
    inputs (a text model's conditions come from its own text encoder, as in the comparison)."""
    specs = component_specs(config)
    feeds = random_feeds(specs["denoiser"], specs, batch, np.random.default_rng(seed), reference.run)
    out = np.asarray(reference.run("denoiser", feeds)[Tensors.MODEL_OUTPUT], dtype=np.float64)
    x_t = np.asarray(feeds[Tensors.X_T], dtype=np.float64)
    return OutputScale(output_rms=float(np.sqrt(np.mean(out ** 2))), input_rms=float(np.sqrt(np.mean(x_t ** 2))),
                       threshold=threshold)


def ensure_trained(reference: Any, config: ModelConfig) -> OutputScale:
    """Refuse a denoiser whose output is zero or negligible next to its input: a freshly
    initialised or barely trained DiT (adaLN-Zero) matches any backend trivially, which proves
    nothing. Returns the scale it measured (for the report)."""
    scale = denoiser_output_scale(reference, config)
    if scale.output_rms == 0.0:
        raise UntrainedModelError(
            "the denoiser outputs exactly zero (a freshly initialised DiT): parity on it proves nothing",
            "train the model first, or pass {allow_untrained}", params=["allow_untrained"])
    if not scale.meaningful:
        raise UntrainedModelError(
            f"the denoiser's output is negligible next to its input ({scale.describe()}): a barely trained "
            "DiT matches any backend trivially, so parity on it proves nothing",
            "train the model longer, or pass {allow_untrained} to compare anyway; the report is then marked "
            "NOT MEANINGFUL", params=["allow_untrained"])
    return scale


def compare_component(report: ParityReport, spec: ComponentSpec, reference: Any, backend: Any,
                      feeds: dict[str, np.ndarray], label: str, precision: str,
                      overrides: ToleranceOverrides, codebook: np.ndarray | None) -> None:
    """`precision` is the precision of this component's graph (in an 8-bit set the quantizer is
    FP32, and a component the spec keeps out of quantization FP16): its tolerances apply."""
    ref_out = reference.run(spec.name, feeds)
    test_out = backend.run(spec.name, feeds)
    kind = label.split(",")[0]
    for tensor in spec.outputs:
        tol = spec.tolerance(precision, tensor.name)
        latents = feeds.get(spec.input_names[0])  # what an index output was computed from
        c = compare_output(ref_out[tensor.name], test_out[tensor.name], is_float=tensor.is_float,
                           rel_l2=overrides.output_rel_l2(tensor.name, tol.limit(kind)),
                           min_agreement=overrides.min_index_agreement if overrides.min_index_agreement is not None
                           else tol.min_agreement, latents=latents, codebook=codebook)
        report.add(Check(spec.name, f"{tensor.name} {c.metric} ({label})", c.value, c.limit, c.direction, c.details))
        max_abs = overrides.output_max_abs(tensor.name) if tensor.is_float else None
        if max_abs is not None:
            report.add(Check(spec.name, f"{tensor.name} max_abs ({label})", c.max_abs, max_abs, "<=", c.details))


def component_parity(report: ParityReport, config: ModelConfig, reference: Any, backend: Any, precision: str,
                     *, batches: Sequence[int], seed: int, real: dict[str, dict[str, np.ndarray]] | None,
                     overrides: ToleranceOverrides, codebook: np.ndarray | None,
                     components: Sequence[str] | None = None,
                     component_precisions: dict[str, str] | None = None, parts: bool = False) -> None:
    """`component_precisions` maps a component to the precision its graph has in the set (from the
    export manifest, `shipped_precisions`); missing ones are taken to be `precision`. `parts`: the
    denoiser's parts too (what a cached run samples with)."""
    specs = component_specs(config, parts=parts)
    rng = np.random.default_rng(seed)
    shipped = component_precisions or {}
    for name, spec in specs.items():
        if components and name not in components and name not in DENOISER_PARTS:
            continue
        own = shipped.get(name, spec.shipped_precision(precision))
        for batch in batches:
            feeds = random_feeds(spec, specs, batch, rng, reference.run)
            compare_component(report, spec, reference, backend, feeds, f"random, batch {batch}", own,
                              overrides, codebook)
            if real is not None and name in real:
                compare_component(report, spec, reference, backend, take_batch(real[name], batch),
                                  f"real, batch {batch}", own, overrides, codebook)


def quantized_graph_checks(report: ParityReport, run: RunDir, precision: str, shipped: dict[str, str],
                           components: Sequence[str] | None) -> None:
    """For each 8-bit graph of an 8-bit set: every DequantizeLinear undoes its QuantizeLinear with the same
    scale. A wrong scale inside a DiT block moves a trained model's output by no more than INT8's own
    error does (docs/design/int8-block-scale.md), so the comparisons above cannot be relied on for it."""
    from mmgen_deploy.export.quantize import mismatched_dequantize_scales

    if precision not in QUANTIZED_PRECISIONS:
        return
    for name, own in shipped.items():
        path = run.onnx_path(precision, name)
        if own not in QUANTIZED_PRECISIONS or (components and name not in components) or not path.is_file():
            continue
        mismatched = mismatched_dequantize_scales(path)
        report.add(Check(name, "dequantize scales equal their quantize scales (graph)", len(mismatched), 0, "<=",
                         {"mismatched": mismatched[:20]}))


def shipped_precisions(run: Any, precision: str) -> dict[str, str]:
    """Per component, the precision of its graph in the `precision` ONNX set, as the export
    manifest records it (an 8-bit set may hold FP16 / FP32 components); empty without a manifest."""
    from mmgen_deploy.io_utils import read_json

    try:
        files = read_json(run.onnx_manifest_path)["files"][precision]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: str(entry.get("component_precision", precision)) for name, entry in files.items()
            if isinstance(entry, dict)}


def _audio_checks(report: ParityReport, config: ModelConfig, ref: np.ndarray, test: np.ndarray,
                  class_ids: list[int], precision: str) -> None:
    """An audio model's waveforms: their error, and (for the `tones` classes) whether the waveform
    judge hears each clip the same way on both sides."""
    from mmgen_deploy.data.tones import CLASS_NAMES
    from mmgen_deploy.evaluation.tone_judge import judge_clip
    from mmgen_deploy.specs import AUDIO_PIPELINE_TOLERANCES

    assert config.audio is not None
    limits = AUDIO_PIPELINE_TOLERANCES[precision]
    diff = tensor_diff(ref, test)
    report.add(Check("end-to-end", "waveform rel_l2", diff.rel_l2, limits["audio_rel_l2"], "<=", diff.to_dict()))
    if tuple(config.class_names) == CLASS_NAMES:
        rate = config.audio.sample_rate
        verdicts = [(judge_clip(r.astype(np.float64), rate), judge_clip(t.astype(np.float64), rate))
                    for r, t in zip(ref, test, strict=True)]
        same = [(a.waveform, a.contour) == (b.waveform, b.contour) for a, b in verdicts]
        report.add(Check("end-to-end", "judge agreement (waveform and contour)", sum(same) / max(len(same), 1),
                         limits["min_judge_agreement"], ">=",
                         {"torch": [f"{a.waveform} {a.contour}" for a, _ in verdicts],
                          "backend": [f"{b.waveform} {b.contour}" for _, b in verdicts]}))


def end_to_end_parity(report: ParityReport, config: ModelConfig, reference: Any, backend: Any, precision: str,
                      *, class_ids: Sequence[int] = (), steps: int, sampler: str, cfg_scale: float, seed: int,
                      batch_size: int, overrides: ToleranceOverrides, codebook: np.ndarray | None,
                      prompts: Sequence[str] | None = None, tokenizer: Any = None,
                      cache: str = SAMPLING.cache) -> dict[str, Any]:
    """Sample the same images on both sides and compare them. A text model samples
    `prompts`, each side encoding them with its own text encoder (so the comparison covers
    the whole deployed path: tokenizer -> text encoder -> denoising loop -> decoder).
    With a `cache` policy both sides sample with it, and the steps each recomputed must agree
    (an adaptive decision that differs is a failed check, not averaged away)."""
    from mmgen_deploy.sampling import make_conditioning, sample

    kwargs: dict[str, Any] = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed,
                                  batch_size=batch_size, return_trajectory=True, cache=cache)
    if config.uses_text and (not prompts or tokenizer is None):
        raise ValueError("end-to-end parity of a text model needs prompts and the run's tokenizer")
    ref, test = (sample(runner, config, make_conditioning(runner, config, class_ids=list(class_ids),
                                                          prompts=list(prompts or ()), tokenizer=tokenizer), **kwargs)
                 for runner in (reference, backend))
    limits = PIPELINE_TOLERANCES[precision]
    if ref.cache.policy != "none":
        differing = sum(len(set(r) ^ set(t))
                        for r, t in zip(ref.cache.recompute_steps, test.cache.recompute_steps, strict=True))
        report.add(Check("end-to-end", f"steps recomputed differently ({ref.cache.policy})", differing, 0, "<=",
                         {"torch": ref.cache.recompute_steps, "backend": test.cache.recompute_steps}))
    latent = tensor_diff(ref.latents, test.latents)
    report.add(Check("end-to-end", "final latent rel_l2", latent.rel_l2, limits["latent_rel_l2"], "<=",
                     latent.to_dict()))
    # The aggregate above is dominated by any image whose trajectory tipped to a nearby sample; the
    # median image is not, so it can be held tighter (see PIPELINE_TOLERANCES).
    per_image = [tensor_diff(r, t).rel_l2 for r, t in zip(ref.latents, test.latents, strict=True)]
    report.add(Check("end-to-end", "median image latent rel_l2", float(np.median(per_image)),
                     limits["median_latent_rel_l2"], "<=", {"per_image": per_image}))
    if ref.indices is not None and test.indices is not None:  # a first stage with a quantizer
        agree = index_agreement(ref.indices, test.indices, ref.latents, codebook)
        report.add(Check("end-to-end", "code index agreement", agree.agreement,
                         overrides.min_index_agreement if overrides.min_index_agreement is not None
                         else limits["min_index_agreement"], ">=", agree.to_dict()))
    image_psnr = psnr(ref.images, test.images)
    report.add(Check("end-to-end", "image PSNR (dB)", image_psnr,
                     overrides.min_psnr if overrides.min_psnr is not None else limits["min_psnr"], ">="))
    image_ssim = ssim(ref.images, test.images)
    report.add(Check("end-to-end", "image SSIM", image_ssim, limits["min_ssim"], ">="))
    if ref.audio is not None and test.audio is not None and config.audio is not None:
        _audio_checks(report, config, ref.audio, test.audio, list(class_ids), precision)
    drift: list[dict[str, Any]] = []
    if ref.trajectory is not None and test.trajectory is not None:
        n = len(ref.trajectory)
        shown = sorted({0, 1, 2, n - 3, n - 2, n - 1} & set(range(n)))
        for i in shown:
            d = tensor_diff(ref.trajectory[i], test.trajectory[i])
            drift.append({"step": i, "rel_l2": d.rel_l2, "max_abs": d.max_abs})
    result: dict[str, Any] = {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale,
                              "drift": drift, "psnr": image_psnr, "ssim": image_ssim,
                              "cache": {"torch": ref.cache.to_dict(), "backend": test.cache.to_dict()}}
    if config.uses_text:
        result["prompts"] = list(prompts or ())
    return result


@dataclass
class ParityOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    batches: Sequence[int] = (1, 3)
    # None: the run's own (a distilled student's steps, sampler and guidance; otherwise PARITY_STEPS and
    # `defaults.SAMPLING`).
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    num_images: int = 8
    seed: int = 0
    rel_l2: dict[str, float] = field(default_factory=dict)
    max_abs: dict[str, float] = field(default_factory=dict)
    min_psnr: float | None = None
    end_to_end: bool = True
    allow_untrained: bool = False
    components: Sequence[str] | None = None
    # Text models: the end-to-end prompts (None: `default_prompts`, from the run's own data).
    prompts: Sequence[str] | None = None
    # PyTorch threads of the reference side (None: torch's default). One thread is what the
    # exporter uses too: tiny models on a shared 2-core machine run ~7x faster than on two
    # spinning threads (measured: 2.3 s vs 16 s for a tiny text run's parity).
    torch_threads: int | None = 1
    # CPU threads of the backend under test (None: the backend's default).
    threads: int | None = None
    # Step-caching policy of the end-to-end check (both sides); any but none also compares the parts.
    cache: str = SAMPLING.cache

    def settings(self) -> dict[str, Any]:
        """What the verdict depends on besides the backend and precision (not the thread count)."""
        return {"batches": list(self.batches), "steps": self.steps, "sampler": self.sampler,
                "cfg_scale": self.cfg_scale, "num_images": self.num_images, "seed": self.seed,
                "rel_l2": dict(self.rel_l2), "max_abs": dict(self.max_abs), "min_psnr": self.min_psnr,
                "end_to_end": self.end_to_end, "allow_untrained": self.allow_untrained,
                "components": None if self.components is None else list(self.components),
                "prompts": None if self.prompts is None else list(self.prompts),
                "cache": parse_cache_policy(self.cache).spec}


# How the settings read in a report's file name (see `RunDir.report_path`).
_NAME_WORDS = {"batches": "batches", "steps": "steps", "sampler": "sampler", "cfg_scale": "cfg",
               "num_images": "images", "seed": "seed", "rel_l2": "rel-l2", "max_abs": "max-abs",
               "min_psnr": "psnr", "end_to_end": "end-to-end", "allow_untrained": "allow-untrained",
               "components": "components", "prompts": "prompts", "cache": "cache"}


# Steps of the end-to-end check of a run that is not a distilled student: enough for the per-step
# differences to compound as they do in real sampling, few enough for a quick check.
PARITY_STEPS = 20


def end_to_end_sampling(config: ModelConfig, options: ParityOptions) -> tuple[int, str, float]:
    """(steps, sampler, guidance scale) of the end-to-end check: the options', or the run's own."""
    from mmgen_deploy.sampling.loop import run_sampling_defaults

    own = run_sampling_defaults(config)
    steps = options.steps if options.steps is not None else (
        int(own["steps"]) if config.student is not None else PARITY_STEPS)
    sampler = options.sampler if options.sampler is not None else str(own["sampler"])
    cfg_scale = options.cfg_scale if options.cfg_scale is not None else float(own["cfg_scale"])
    return steps, sampler, cfg_scale


def parity_report_path(run: RunDir, options: ParityOptions) -> Path:
    """RUN_DIR/reports/parity-<backend>-<precision>[-<settings that differ from the defaults>].json: a quick
    check (fewer steps or images) never replaces the verdict of a check with the defaults."""
    defaults = ParityOptions().settings()
    changed = {_NAME_WORDS[key]: value for key, value in options.settings().items() if value != defaults[key]}
    if "cache" in changed:  # a policy such as fora:3 reads -cache-fora3
        changed["cache"] = "cache-" + str(changed["cache"]).replace(":", "")
    return run.report_path("parity", options.backend, options.precision, **changed)


def real_inputs(run: RunDir, config: ModelConfig, vq: Any, dit: Any, seed: int, *, text_encoder: Any = None,
                tokenizer: Any = None, parts: bool = False) -> dict[str, dict[str, np.ndarray]] | None:
    """Inputs drawn from the run's validation images (their latents, codes and noised latents;
    for a text model their tokenized captions and the text encoder's outputs for them),
    built exactly as the export's calibration builds them; None when the run has no dataset."""
    from mmgen_deploy.export.calibration import (
        component_inputs,
        dataset_calibration,
        denoiser_part_inputs,
        load_calibration,
    )
    from mmgen_deploy.models import build_components

    data, _why = dataset_calibration(run.read_meta())
    if data is None:
        return None  # e.g. an imported model: random inputs still run
    modules = build_components(vq, dit, text_encoder, parts=parts, audio=config.audio)
    inputs, _source = component_inputs(load_calibration(data, config), config, component_specs(config),
                                       modules, seed=seed, tokenizer=tokenizer)
    if parts:  # the parts see what the whole denoiser's inputs make of them, as at export
        inputs.update(denoiser_part_inputs(inputs["denoiser"], component_specs(config, parts=True), modules))
    return inputs


def default_prompts(run: RunDir, tokenizer: Any, count: int) -> list[str]:
    """`count` prompts for a text model's end-to-end check: the distinct captions of the run's
    validation images, or (no dataset here) prompts made of the tokenizer's vocabulary."""
    from mmgen_deploy.export.calibration import dataset_calibration, vocabulary_prompts

    data, _why = dataset_calibration(run.read_meta())
    captions = list(dict.fromkeys(c for c in (data.captions or ()) if c.strip())) if data is not None else []
    if not captions:
        return vocabulary_prompts(tokenizer, count)
    return [captions[i % len(captions)] for i in range(count)]


def run_parity(run_dir: RunLike, options: ParityOptions, progress: Any = None) -> ParityReport:
    """The whole `mmgen parity`: load, check the model is trained, compare, save the report."""
    import contextlib

    from mmgen_deploy.export.exporter import torch_threads

    with torch_threads(options.torch_threads) if options.torch_threads else contextlib.nullcontext():
        return _run_parity(run_dir, options, progress)


def _run_parity(run_dir: RunLike, options: ParityOptions, progress: Any = None) -> ParityReport:
    from mmgen_deploy.io_utils import write_json
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.runtime.torch_runner import TorchRunner

    say = progress or (lambda _msg: None)
    run = RunDir.of(run_dir)
    run.check_entries()  # the report goes into reports/: refuse a linked one before the work, not after
    from mmgen_deploy.models.load import load_deployable

    parts = load_deployable(run)
    config, vq, dit = parts.config, parts.first_stage, parts.dit
    text_encoder, tokenizer = parts.text_encoder, parts.tokenizer
    if options.prompts and not config.uses_text:
        raise UsageError("{prompts}: this run is class-conditioned; its end-to-end check samples classes",
                         "leave out {prompts}", params=["prompts"])
    reference = TorchRunner(vq, dit, config=config, text_encoder=text_encoder)
    scale = denoiser_output_scale(reference, config) if options.allow_untrained else ensure_trained(reference,
                                                                                                     config)
    policy = parse_cache_policy(options.cache)
    backend, _choice = open_runner(run, options.backend, options.precision, threads=options.threads)
    cached = f", cache {policy.spec}" if policy.enabled else ""
    report = ParityReport(f"parity: {options.backend} {options.precision} vs torch fp32{cached} ({run.root})")
    report.info = {"run_dir": str(run.root), "backend": options.backend, "precision": options.precision,
                   "device": getattr(backend, "device", ""), "seed": options.seed,
                   "denoiser_output_scale": scale.to_dict(), "cache": policy.spec,
                   "settings": options.settings()}
    report.notes.append(f"compared at {scale.describe()}")
    if not scale.meaningful:
        report.meaningful = False
        report.notes.append("NOT MEANINGFUL: the denoiser's output is negligible next to its input (an untrained "
                            "model, compared because untrained models were allowed); any backend would match it")
    overrides = ToleranceOverrides(rel_l2=dict(options.rel_l2), max_abs=dict(options.max_abs),
                                   min_psnr=options.min_psnr)
    from mmgen_deploy.models import VQModel

    # A VQ first stage's codebook explains index disagreements (near ties); a KL one has none.
    codebook = vq.quantize.embedding.weight.detach().numpy().copy() if isinstance(vq, VQModel) else None
    try:
        real = real_inputs(run, config, vq, dit, options.seed, text_encoder=text_encoder, tokenizer=tokenizer,
                           parts=policy.enabled)
        report.info["real_inputs"] = real is not None
        say("comparing components" + (" on random and real inputs" if real is not None else " on random inputs"))
        shipped = shipped_precisions(run, options.precision)
        if shipped:
            report.info["component_precisions"] = shipped
        component_parity(report, config, reference, backend, options.precision, batches=options.batches,
                         seed=options.seed, real=real, overrides=overrides, codebook=codebook,
                         components=options.components, component_precisions=shipped, parts=policy.enabled)
        quantized_graph_checks(report, run, options.precision, shipped, options.components)
        if options.end_to_end:
            steps, sampler, cfg_scale = end_to_end_sampling(config, options)
            say(f"sampling {options.num_images} images on both sides ({sampler}, {steps} steps)")
            class_ids = [i % config.dit.num_classes for i in range(options.num_images)]
            prompts: list[str] | None = None
            if tokenizer is not None:
                given = list(options.prompts or ())
                prompts = ([given[i % len(given)] for i in range(options.num_images)] if given
                           else default_prompts(run, tokenizer, options.num_images))
            report.info["end_to_end"] = end_to_end_parity(
                report, config, reference, backend, options.precision,
                class_ids=[] if prompts is not None else class_ids, steps=steps,
                sampler=sampler, cfg_scale=cfg_scale, seed=options.seed,
                batch_size=options.num_images, overrides=overrides, codebook=codebook, prompts=prompts,
                tokenizer=tokenizer, cache=policy.spec)
    finally:
        backend.close()
    write_json(parity_report_path(run, options), report.to_dict())
    return report
