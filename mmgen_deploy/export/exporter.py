"""Export all components of a model to validated ONNX graphs (FP32 and mixed FP16).

`export_models` works on in-memory models and a target folder; `export_run` wraps it for
a run directory: it exports into a temporary folder, validates everything and only then
swaps the folder into place as `RUN_DIR/onnx/`, so a failure leaves the previous export
exactly as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgen_deploy import onnx_files
from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.export.calibration import (
    CALIBRATION_SAMPLES,
    CalibrationData,
    CalibrationSource,
    FirstStageCache,
    component_inputs,
    dataset_calibration,
    denoiser_part_inputs,
    load_calibration,
)
from mmgen_deploy.export.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    read_manifest,
    relative_onnx_path,
    tool_versions,
)
from mmgen_deploy.export.onnx_export import (
    DEFAULT_OPSET,
    EXPORTER_NAME,
    check_opset,
    export_fp32,
    file_opset,
)
from mmgen_deploy.export.quantize_export import QuantSettings, export_quantized, quant_plan, quantization_data
from mmgen_deploy.export.validate import (
    random_input_sets,
    real_input_sets,
    summarize,
    validate_graph,
    validation_batches,
    with_references,
)
from mmgen_deploy.io_utils import atomic_dir, write_json
from mmgen_deploy.models import AutoencoderKL, DiT, TextEncoder, VQModel, build_components
from mmgen_deploy.models.load import check_weights_match_config, load_deployable
from mmgen_deploy.rundir import RunDir, RunLike, writes_run
from mmgen_deploy.specs import (
    ALL_COMPONENTS,
    DEFAULT_EXPORT_PRECISIONS,
    DENOISER_PARTS,
    FIRST_STAGE_COMPONENTS,
    PARTS_WORD,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    TEXT_ONLY_COMPONENTS,
    ComponentSpec,
    component_names,
    component_specs,
    expand_parts,
)

if TYPE_CHECKING:
    from mmgen_deploy.text.tokenizer import WordTokenizer

# progress(message, completed_steps, total_steps)
ProgressCallback = Callable[[str, int, int], None]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run PyTorch with `count` threads, then restore. Small models on a shared 2-core
    machine run 10-100x faster on one thread than with spinning thread pools."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def normalize_selection(precisions: Iterable[str], components: Iterable[str] | None,
                        available: Sequence[str], default: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Check and order the requested precisions and components; `available` is what may be asked for
    (`component_names(config, parts=True)`: with the denoiser's parts), `default` what None means
    (every one of `available` when not given). PARTS_WORD stands for the three denoiser parts."""
    chosen_precisions = list(dict.fromkeys(precisions))
    bad = [p for p in chosen_precisions if p not in PRECISIONS]
    if bad or not chosen_precisions:
        raise UsageError(f"unknown precision(s) {', '.join(bad) or '(none)'}", f"choose from {', '.join(PRECISIONS)}")
    if components is None:
        chosen = list(default if default is not None else available)
    else:
        chosen = list(expand_parts(components))
    bad = [c for c in chosen if c not in available]
    if bad or not chosen:
        why = (" (a class-conditioned model has no text encoder)" if "text_encoder" in bad
               else " (this model's first stage has no quantizer)" if "quantizer" in bad
               else " (this model's DiT has too few blocks to split into parts)" if set(bad) & set(DENOISER_PARTS)
               else "")
        listed = [c for c in available if c not in DENOISER_PARTS]
        if any(c in DENOISER_PARTS for c in available):
            listed.append(f"{PARTS_WORD} (or one of {', '.join(DENOISER_PARTS)})")
        raise UsageError(f"unknown component(s) {', '.join(bad) or '(none)'}{why}",
                         f"choose from {', '.join(listed)}")
    # Always in pipeline order, whatever order the user typed.
    return [p for p in PRECISIONS if p in chosen_precisions], [c for c in available if c in chosen]


@dataclass
class _Models:
    """The torch models of one export, held in one place so the exporter can drop each as soon as
    its last graph is exported and its reference outputs are computed (one live copy of the weights
    per stage; a DiT-XL/2 is 2.7 GB)."""

    first_stage: VQModel | AutoencoderKL | None
    dit: DiT | None
    text_encoder: TextEncoder | None = None


def export_models(config: ModelConfig, vq: VQModel | AutoencoderKL, dit: DiT, out_dir: str | os.PathLike[str], *,
                  precisions: Sequence[str] = DEFAULT_EXPORT_PRECISIONS, components: Sequence[str] | None = None,
                  opset: int = DEFAULT_OPSET, calibration: CalibrationSource = None,
                  progress: ProgressCallback | None = None, why_no_calibration: str = "no images given",
                  text_encoder: TextEncoder | None = None, tokenizer: WordTokenizer | None = None,
                  quantization: QuantSettings | None = None, quant_data: CalibrationData | None = None,
                  external_data: bool | None = None, calibration_images: int | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Export, convert and validate into `out_dir/{fp32,fp16}/<component>.onnx`.

    A text-to-image model needs its `text_encoder` (a fifth component) and `tokenizer`
    (which turns the calibration captions into the text encoder's real inputs).
    `external_data`: True writes every graph's weights to `<name>.onnx.data` (what graphs over
    2 GB need), None decides by size. `calibration_images`: at most this many calibration
    samples (default CALIBRATION_SAMPLES; expensive components use fewer, see budget.py). `threads`:
    the CPU threads of PyTorch and ONNX Runtime for every component (default: `budget.threads_for`
    each, one for small components, up to eight for large ones).

    INT8 / FP8 sets (`precisions` with "int8" / "fp8") are calibrated on `quant_data` (default: the
    `calibration` images) along the sampling trajectory, as `quantization` says (see
    `mmgen_deploy.export.quantize`).

    Returns the manifest's `files`, `calibration` and `stages` parts. Raises
    `ExportValidationError` when any graph misses its tolerance (files already written
    to `out_dir` stay there: callers export into a temporary folder).
    """
    return _export_models(config, _Models(vq, dit, text_encoder), Path(out_dir), precisions=precisions,
                          components=components, opset=opset, calibration=calibration, progress=progress,
                          why_no_calibration=why_no_calibration, tokenizer=tokenizer, external_data=external_data,
                          calibration_images=calibration_images, quantization=quantization, quant_data=quant_data,
                          threads=threads)


def _check_memory(stage: str, need_bytes: int, name: str) -> None:
    """`budget.check_memory` for a stage of component `name`, with how to make it fit."""
    from mmgen_deploy.export import budget

    budget.check_memory(stage, need_bytes, f"export fewer components at a time ({{components}} {name}), use "
                        "fewer calibration images ({calibration_images} 4), or a machine with more memory",
                        params=["components", "calibration_images"])


def _export_models(config: ModelConfig, models: _Models, out: Path, *, precisions: Sequence[str],
                   components: Sequence[str] | None, opset: int, calibration: CalibrationSource,
                   progress: ProgressCallback | None, why_no_calibration: str, tokenizer: WordTokenizer | None,
                   external_data: bool | None = None, calibration_images: int | None = None,
                   quantization: QuantSettings | None = None, quant_data: CalibrationData | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    import gc

    from mmgen_deploy.export import budget

    if threads is not None and threads < 1:
        raise UsageError(f"{{threads}} must be >= 1, got {threads}", params=["threads"])

    def threads_for(cost: budget.ComponentCost) -> int:
        return budget.threads_for(cost) if threads is None else threads

    check_opset(opset)
    if config.uses_text and (models.text_encoder is None or tokenizer is None):
        raise ValueError("exporting a text-to-image model needs its text encoder and tokenizer")
    chosen_precisions, chosen = normalize_selection(precisions, components, component_names(config, parts=True),
                                                    component_names(config))
    specs = component_specs(config, parts=True)
    costs = budget.component_costs(config)
    assert models.first_stage is not None and models.dit is not None
    modules = build_components(models.first_stage.eval(), models.dit.eval(),
                               None if models.text_encoder is None else models.text_encoder.eval(), parts=True,
                               audio=config.audio)
    limit = min(CALIBRATION_SAMPLES, calibration_images or CALIBRATION_SAMPLES)
    quantized = [p for p in chosen_precisions if p in QUANTIZED_PRECISIONS]
    steps_per = 3 + (2 if "fp16" in chosen_precisions else 0) + 2 * len(quantized)
    total, done = steps_per * len(chosen) + 1, 0
    stages: list[dict[str, Any]] = []
    stage_start = time.perf_counter()

    def step(message: str) -> None:
        """Start a stage (the previous one ends): progress gets the message and the step count."""
        nonlocal done, stage_start
        now = time.perf_counter()
        if stages:
            stages[-1]["seconds"] = round(now - stage_start, 2)
            stages[-1]["peak_rss_gb"] = round(_peak_rss() / 1e9, 2)
        stages.append({"stage": message})
        stage_start = now
        if progress is not None:
            progress(message, done, total)
        done += 1

    def detail(message: str) -> None:
        """Progress within the current stage (calibration batches, validation sets)."""
        if progress is not None:
            progress(f"{stages[-1]['stage']}: {message}", done - 1, total)

    step("calibration inputs")
    data = load_calibration(calibration, config, limit=limit)
    first_stage = FirstStageCache()  # validation and 8-bit calibration share images: encode each once
    with torch_threads(threads_for(costs["encoder"])):
        real_inputs, real_source = component_inputs(data, config, specs, modules, why_no_data=why_no_calibration,
                                                    tokenizer=tokenizer, samples=limit,
                                                    progress=lambda line: detail(f"validation {line}"),
                                                    cache=first_stage)
    real_kind = "real" if data is not None else "dummy"
    # The 8-bit calibration's PyTorch passes run at torch's default unless threads are given.
    with torch_threads(threads) if threads is not None else contextlib.nullcontext():
        quant = quant_plan(quantized, quantization, quant_data or data, config, modules, tokenizer,
                           why_no_calibration, progress=lambda line: detail(f"8-bit calibration {line}"),
                           cache=first_stage)
    if any(c in DENOISER_PARTS for c in chosen):  # the parts see what the whole denoiser's inputs make of them
        with torch_threads(threads_for(costs["denoiser"])):
            real_inputs.update(denoiser_part_inputs(real_inputs["denoiser"], specs, modules))
            if quant is not None:
                quant.inputs.update(denoiser_part_inputs(quant.inputs["denoiser"], specs, modules))
    del first_stage
    del data
    files: dict[str, dict[str, Any]] = {p: {} for p in chosen_precisions}
    # FP32 graphs are the FP16 converter's input, so they are made even for an fp16-only export.
    scratch = out / ".fp32-work" if "fp32" not in chosen_precisions else out / "fp32"
    for name in chosen:
        spec, cost = specs[name], costs[name]
        module = modules[name]
        component_threads = threads_for(cost)
        batches = validation_batches(spec, cost.cost_gflop)
        step(f"{name}: exporting FP32")
        _check_memory(f"exporting the {name}", budget.BASE_BYTES + int(budget.EXPORT_WEIGHT_FACTOR
                                                                       * cost.weight_bytes), name)
        with torch_threads(component_threads):
            input_sets = (random_input_sets(spec, specs, modules, batches=batches["random"])
                          + real_input_sets(spec, real_inputs[name], real_kind, batches=batches["real"]))
            fp32_file = scratch / f"{name}.onnx"
            started = time.perf_counter()
            external = export_fp32(module, spec, fp32_file, opset=opset, external_data=external_data)
            export_seconds = time.perf_counter() - started
            step(f"{name}: PyTorch reference outputs")
            input_sets = with_references(module, spec, input_sets)
        if not quantized:  # 8-bit calibration still needs the torch module; else free it now
            del module
            _release(models, modules, specs, chosen[chosen.index(name) + 1:])
        step(f"{name}: validating FP32 in ONNX Runtime")
        _check_memory(f"validating the {name} in ONNX Runtime",
                      budget.BASE_BYTES + int(budget.SESSION_WEIGHT_FACTOR * cost.weight_bytes), name)
        checks = validate_graph(fp32_file, None, spec, "fp32", input_sets, threads=component_threads,
                                progress=detail)
        if "fp32" in chosen_precisions:
            files["fp32"][name] = {
                "path": relative_onnx_path("fp32", name), **_file_record(fp32_file, scratch.parent),
                "precision": "fp32", "opset": file_opset(fp32_file), **spec.interface_record(),
                "export_seconds": round(export_seconds, 3), "validation": summarize(checks),
            }
        if "fp16" in chosen_precisions:
            from mmgen_deploy.export.fp16 import convert_fp16

            fp16_file = out / "fp16" / f"{name}.onnx"
            step(f"{name}: converting to mixed FP16" if not spec.keep_fp32 else f"{name}: kept FP32 (spec)")
            _check_memory(f"converting the {name} to FP16",
                          budget.BASE_BYTES + int(budget.AUTOCAST_WEIGHT_FACTOR * cost.weight_bytes), name)
            samples = budget.calibration_samples(cost, next(iter(real_inputs[name].values())).shape[0])
            calib = {k: v[:samples] for k, v in real_inputs[name].items()}
            started = time.perf_counter()
            # An FP32 graph with external data gets an FP16 one with external data too (same layout).
            converter = convert_fp16(fp32_file, spec, fp16_file, calib,
                                     external_data=True if (external_data or external) else external_data,
                                     batch_size=budget.calibration_batch(cost, spec.profile.max),
                                     threads=component_threads, progress=detail)
            convert_seconds = time.perf_counter() - started
            del calib
            gc.collect()
            step(f"{name}: validating FP16 against PyTorch FP32")
            checks16 = validate_graph(fp16_file, None, spec, "fp16", input_sets, threads=component_threads,
                                      progress=detail)
            kept = converter.pop("kept_fp32_nodes")
            fp16_nodes = converter.pop("fp16_nodes")
            files["fp16"][name] = {
                "path": relative_onnx_path("fp16", name), **_file_record(fp16_file, out),
                "precision": "fp16", "opset": file_opset(fp16_file), **spec.interface_record(),
                "keep_fp32": spec.keep_fp32, "converter": converter, "convert_seconds": round(convert_seconds, 3),
                "fp16_nodes": fp16_nodes, "kept_fp32_nodes": kept, "validation": summarize(checks16),
            }
        for precision in quantized:
            assert quant is not None
            files[precision][name] = export_quantized(
                quant, precision, spec, modules[name], fp32_file, out, input_sets, real_inputs[name], step,
                fp32_checks=checks, batch_limit=budget.calibration_batch(cost, quant.settings.batch),
                threads=component_threads)
        if quantized:
            _release(models, modules, specs, chosen[chosen.index(name) + 1:])
        del input_sets
        gc.collect()
    if scratch.name == ".fp32-work":
        shutil.rmtree(scratch, ignore_errors=True)
    step("done")
    stages.pop()
    calibration_record: dict[str, Any] = {"source": real_source, "used_for": "FP16 ranges and real-data validation"}
    if quant is not None:
        calibration_record["quantization"] = quant.record()
    return {"files": files, "stages": stages, "calibration": calibration_record}


# Every component that belongs to a first stage, of any kind.
FIRST_STAGE_NAMES = frozenset(c for names in FIRST_STAGE_COMPONENTS.values() for c in names)


def _release(models: _Models, modules: dict[str, Any], specs: dict[str, ComponentSpec],
             remaining: Sequence[str]) -> None:
    """Drop the torch modules and models that no remaining component needs (their weights are
    freed before ONNX Runtime loads the graph)."""
    import gc

    upstream = {specs[c].upstream for c in remaining if specs[c].upstream}
    for name in list(modules):
        if name not in remaining and name not in upstream:
            modules.pop(name)
    if not any(c in FIRST_STAGE_NAMES for c in remaining):  # no first-stage component (VQ or KL) left
        models.first_stage = None
    if not any(c == "denoiser" or c in DENOISER_PARTS for c in remaining):
        models.dit = None
    if "text_encoder" not in remaining and "text_encoder" not in upstream:
        models.text_encoder = None
    gc.collect()


def _peak_rss() -> int:
    """This process's peak resident set size so far (bytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _file_record(path: Path, root: Path) -> dict[str, Any]:
    """Hash and size of a graph file set; names the external data file when there is one."""
    record: dict[str, Any] = {"sha256": onnx_files.onnx_sha256(path), "bytes": onnx_files.onnx_bytes(path)}
    extra = onnx_files.data_files(path)
    if extra:
        record["external_data"] = [{"path": f.relative_to(root).as_posix(), "bytes": f.stat().st_size}
                                   for f in extra]
    return record


def _unchanged(source: Path, digest: str) -> bool:
    try:
        return source.is_file() and onnx_files.onnx_sha256(source) == digest
    except (OSError, ValueError):  # a data file gone, or an unreadable graph: re-export it
        return False


def _check_memory_for_models(config: ModelConfig, chosen: Sequence[str]) -> None:
    """Refuse before loading anything when the largest stage cannot fit (one line, with the estimate)."""
    from mmgen_deploy.export import budget

    costs = budget.component_costs(config)
    # One component per model holds its weights: the first stage's encoder, the denoiser, the text encoder.
    per_model = {FIRST_STAGE_COMPONENTS[config.first_stage_kind][0], "denoiser", *TEXT_ONLY_COMPONENTS}
    models = sum(c.weight_bytes for n, c in costs.items() if n in per_model)
    for name in chosen:
        cost = costs[name]
        # The run's models stay loaded until their last component is exported.
        need = budget.BASE_BYTES + models + int((budget.EXPORT_WEIGHT_FACTOR - 1) * cost.weight_bytes)
        _check_memory(f"exporting the {name} (with the run's models loaded)", need, name)


def _check_existing(run: RunDir, weights_sha: str, overwrite: bool) -> dict[str, Any] | None:
    """The previous manifest when it may be extended; refuse foreign exports unless overwrite."""
    onnx_root = run.onnx_dir
    if not onnx_root.exists() or not any(onnx_root.iterdir()):
        return None
    try:
        manifest = read_manifest(run)
    except RunDirError:
        if overwrite:
            return None
        raise RunDirError(f"{onnx_root} exists but holds no readable export manifest",
                          "pass {overwrite} to replace it", params=["overwrite"]) from None
    if manifest.get("source_weights_sha256") != weights_sha:
        if overwrite:
            return None
        raise RunDirError(
            f"{onnx_root} holds an export of a different checkpoint "
            f"(weights {str(manifest.get('source_weights_sha256'))[:12]}, this run's are {weights_sha[:12]})",
            "pass {overwrite} to replace it", params=["overwrite"])
    return None if overwrite else manifest


@writes_run("export")
def export_run(run_dir: RunLike, *, precisions: Sequence[str] = DEFAULT_EXPORT_PRECISIONS,
               components: Sequence[str] | None = None, opset: int = DEFAULT_OPSET, overwrite: bool = False,
               calibration: CalibrationSource = None, progress: ProgressCallback | None = None,
               quantization: QuantSettings | None = None, external_data: bool | None = None,
               calibration_images: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Export a run's components to `RUN_DIR/onnx/` atomically; returns the manifest.

    Exporting a subset (`components`, `precisions`) of a run that already has an export of
    the same checkpoint keeps the other files and their manifest entries. `external_data` and
    `calibration_images` and `threads`: see `export_models`. The run's torch models are dropped as soon as
    the export no longer needs them (their memory goes to ONNX Runtime and the FP16 converter).
    """
    run = RunDir.of(run_dir)
    check_opset(opset)
    if calibration_images is not None and calibration_images < 1:
        raise UsageError(f"{{calibration_images}} {calibration_images}: need at least 1", "give 1 or more",
                         params=["calibration_images"])
    config = run.load_config()
    chosen_precisions, chosen = normalize_selection(precisions, components, component_names(config, parts=True),
                                                    component_names(config))
    if any(p in QUANTIZED_PRECISIONS for p in chosen_precisions):
        (quantization or QuantSettings()).check_for(config)
    check_weights_match_config(run, config)  # the estimate below trusts the config's sizes
    _check_memory_for_models(config, chosen)
    if progress is not None:
        progress("loading the PyTorch models", 0, 0)
    parts = load_deployable(run)
    models = _Models(parts.first_stage, parts.dit, parts.text_encoder)
    tokenizer = parts.tokenizer
    del parts  # the models live in `models` only, so the exporter can free them
    weights_sha = run.weights_sha256()
    why_no_calibration = "no images given"
    quant_data = None
    if any(p in QUANTIZED_PRECISIONS for p in chosen_precisions):
        # More images than the FP16 range check needs: every class, a pool of latents to noise.
        quant_data = quantization_data(calibration, run.read_meta(), config, quantization or QuantSettings())
    if calibration is None:
        # Real data by default: the first validation images of the dataset the run was trained on.
        calibration, why_no_calibration = dataset_calibration(run.read_meta())
    previous = _check_existing(run, weights_sha, overwrite)
    started = time.perf_counter()
    with atomic_dir(run.onnx_dir) as tmp:
        files: dict[str, dict[str, Any]] = {p: {} for p in PRECISIONS}
        if previous is not None:
            # Carry over what this call does not re-export (same checkpoint, so still valid).
            for precision, entries in previous.get("files", {}).items():
                for component, entry in entries.items():
                    if precision in chosen_precisions and component in chosen:
                        continue
                    source = run.onnx_entry_path(entry["path"])
                    if _unchanged(source, entry["sha256"]):
                        onnx_files.copy_onnx(source, tmp / entry["path"], link=True)
                        files.setdefault(precision, {})[component] = entry
        result = _export_models(config, models, tmp, precisions=chosen_precisions, components=chosen,
                                opset=opset, calibration=calibration, progress=progress,
                                why_no_calibration=why_no_calibration, tokenizer=tokenizer,
                                external_data=external_data, calibration_images=calibration_images,
                                quantization=quantization, quant_data=quant_data, threads=threads)
        for precision, entries in result["files"].items():
            files[precision].update(entries)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_weights_sha256": weights_sha,
            "exporter": EXPORTER_NAME,
            "tools": tool_versions(),
            "default_opset": opset,
            "dtypes": "timesteps float32, class ids int32, code indices int32, token ids int32 "
                      "(TensorRT has no useful int64)",
            "first_stage": config.first_stage_kind,  # vq or kl: which components there are
            "components": list(component_names(config)),
            "files": {p: {c: files[p][c] for c in ALL_COMPONENTS if c in files[p]}
                      for p in PRECISIONS if files[p]},
            "calibration": result["calibration"],
            "last_export": {"precisions": chosen_precisions, "components": chosen,
                            "seconds": round(time.perf_counter() - started, 2), "stages": result["stages"],
                            "peak_rss_gb": round(_peak_rss() / 1e9, 2)},
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
