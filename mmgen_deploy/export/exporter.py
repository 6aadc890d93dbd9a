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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.export.calibration import (
    CalibrationData,
    CalibrationSource,
    component_inputs,
    dataset_calibration,
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
    file_size,
)
from mmgen_deploy.export.quantize_export import QuantSettings, export_quantized, quant_plan, quantization_data
from mmgen_deploy.export.validate import random_input_sets, real_input_sets, summarize, validate_graph
from mmgen_deploy.io_utils import atomic_dir, sha256_file, write_json
from mmgen_deploy.models import DiT, TextEncoder, VQModel, build_components
from mmgen_deploy.rundir import RunDir, RunLike, writes_run
from mmgen_deploy.specs import (
    COMPONENTS,
    DEFAULT_EXPORT_PRECISIONS,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    ComponentSpec,
    component_names,
    component_specs,
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


def _io_record(spec: ComponentSpec) -> dict[str, Any]:
    profile = spec.engine_profile
    return {
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "engine_profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
    }


def normalize_selection(precisions: Iterable[str], components: Iterable[str] | None,
                        available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Check and order the requested precisions and components; `available` is the
    model's components (`component_names(config)`: five for a text model)."""
    chosen_precisions = list(dict.fromkeys(precisions))
    bad = [p for p in chosen_precisions if p not in PRECISIONS]
    if bad or not chosen_precisions:
        raise UsageError(f"unknown precision(s) {', '.join(bad) or '(none)'}", f"choose from {', '.join(PRECISIONS)}")
    chosen = list(dict.fromkeys(components)) if components is not None else list(available)
    bad = [c for c in chosen if c not in available]
    if bad or not chosen:
        why = " (a class-conditioned model has no text encoder)" if "text_encoder" in bad else ""
        raise UsageError(f"unknown component(s) {', '.join(bad) or '(none)'}{why}",
                         f"choose from {', '.join(available)}")
    # Always in pipeline order, whatever order the user typed.
    return [p for p in PRECISIONS if p in chosen_precisions], [c for c in available if c in chosen]


def export_models(config: ModelConfig, vq: VQModel, dit: DiT, out_dir: str | os.PathLike[str], *,
                  precisions: Sequence[str] = DEFAULT_EXPORT_PRECISIONS, components: Sequence[str] | None = None,
                  opset: int = DEFAULT_OPSET, calibration: CalibrationSource = None,
                  progress: ProgressCallback | None = None, why_no_calibration: str = "no images given",
                  text_encoder: TextEncoder | None = None, tokenizer: WordTokenizer | None = None,
                  quantization: QuantSettings | None = None, quant_data: CalibrationData | None = None,
                  ) -> dict[str, Any]:
    """Export, convert and validate into `out_dir/{fp32,fp16}/<component>.onnx`.

    A text-to-image model needs its `text_encoder` (a fifth component) and `tokenizer`
    (which turns the calibration captions into the text encoder's real inputs).

    INT8 / FP8 sets (`precisions` with "int8" / "fp8") are calibrated on `quant_data` (default: the
    `calibration` images) along the sampling trajectory, as `quantization` says (see
    `mmgen_deploy.export.quantize`).

    Returns the manifest's `files` and `calibration` parts. Raises
    `ExportValidationError` when any graph misses its tolerance (files already written
    to `out_dir` stay there: callers export into a temporary folder).
    """
    with torch_threads(1):
        return _export_models(config, vq, dit, Path(out_dir), precisions=precisions, components=components,
                              opset=opset, calibration=calibration, progress=progress,
                              why_no_calibration=why_no_calibration, text_encoder=text_encoder,
                              tokenizer=tokenizer, quantization=quantization, quant_data=quant_data)


def _export_models(config: ModelConfig, vq: VQModel, dit: DiT, out: Path, *, precisions: Sequence[str],
                   components: Sequence[str] | None, opset: int, calibration: CalibrationSource,
                   progress: ProgressCallback | None, why_no_calibration: str, text_encoder: TextEncoder | None,
                   tokenizer: WordTokenizer | None, quantization: QuantSettings | None = None,
                   quant_data: CalibrationData | None = None) -> dict[str, Any]:
    check_opset(opset)
    if config.uses_text and (text_encoder is None or tokenizer is None):
        raise ValueError("exporting a text-to-image model needs its text encoder and tokenizer")
    chosen_precisions, chosen = normalize_selection(precisions, components, component_names(config))
    specs = component_specs(config)
    modules = build_components(vq.eval(), dit.eval(), None if text_encoder is None else text_encoder.eval())
    data = load_calibration(calibration, config)
    real_inputs, real_source = component_inputs(data, config, specs, modules, why_no_data=why_no_calibration,
                                                tokenizer=tokenizer)
    real_kind = "real" if data is not None else "dummy"
    quantized = [p for p in chosen_precisions if p in QUANTIZED_PRECISIONS]
    quant = quant_plan(quantized, quantization, quant_data or data, config, modules, tokenizer, why_no_calibration)
    steps_per = 2 + (2 if "fp16" in chosen_precisions else 0) + 2 * len(quantized)
    total, done = steps_per * len(chosen), 0

    def step(message: str) -> None:
        nonlocal done
        if progress is not None:
            progress(message, done, total)
        done += 1

    files: dict[str, dict[str, Any]] = {p: {} for p in chosen_precisions}
    # FP32 graphs are the FP16 converter's input, so they are made even for an fp16-only export.
    scratch = out / ".fp32-work" if "fp32" not in chosen_precisions else out / "fp32"
    for name in chosen:
        spec, module = specs[name], modules[name]
        input_sets = random_input_sets(spec, specs, modules) + real_input_sets(spec, real_inputs[name], real_kind)
        fp32_file = scratch / f"{name}.onnx"
        step(f"{name}: exporting FP32")
        started = time.perf_counter()
        export_fp32(module, spec, fp32_file, opset=opset)
        export_seconds = time.perf_counter() - started
        step(f"{name}: validating FP32 in ONNX Runtime")
        checks = validate_graph(fp32_file, module, spec, "fp32", input_sets)
        if "fp32" in chosen_precisions:
            files["fp32"][name] = {
                "path": relative_onnx_path("fp32", name), "sha256": sha256_file(fp32_file),
                "bytes": file_size(fp32_file), "precision": "fp32", "opset": file_opset(fp32_file), **_io_record(spec),
                "export_seconds": round(export_seconds, 3), "validation": summarize(checks),
            }
        if "fp16" in chosen_precisions:
            from mmgen_deploy.export.fp16 import convert_fp16

            fp16_file = out / "fp16" / f"{name}.onnx"
            step(f"{name}: converting to mixed FP16" if not spec.keep_fp32 else f"{name}: kept FP32 (spec)")
            started = time.perf_counter()
            converter = convert_fp16(fp32_file, spec, fp16_file, real_inputs[name])
            convert_seconds = time.perf_counter() - started
            step(f"{name}: validating FP16 against PyTorch FP32")
            checks16 = validate_graph(fp16_file, module, spec, "fp16", input_sets)
            kept = converter.pop("kept_fp32_nodes")
            fp16_nodes = converter.pop("fp16_nodes")
            files["fp16"][name] = {
                "path": relative_onnx_path("fp16", name), "sha256": sha256_file(fp16_file),
                "bytes": file_size(fp16_file), "precision": "fp16", "opset": file_opset(fp16_file), **_io_record(spec),
                "keep_fp32": spec.keep_fp32, "converter": converter, "convert_seconds": round(convert_seconds, 3),
                "fp16_nodes": fp16_nodes, "kept_fp32_nodes": kept, "validation": summarize(checks16),
            }
        for precision in quantized:
            assert quant is not None
            files[precision][name] = export_quantized(quant, precision, spec, module, fp32_file, out, input_sets,
                                                      real_inputs[name], step, fp32_checks=checks)
    if scratch.name == ".fp32-work":
        shutil.rmtree(scratch, ignore_errors=True)
    if progress is not None:
        progress("done", total, total)
    calibration_record: dict[str, Any] = {"source": real_source, "used_for": "FP16 ranges and real-data validation"}
    if quant is not None:
        calibration_record["quantization"] = quant.record()
    return {"files": files, "calibration": calibration_record}


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
                          "pass --overwrite to replace it") from None
    if manifest.get("source_weights_sha256") != weights_sha:
        if overwrite:
            return None
        raise RunDirError(
            f"{onnx_root} holds an export of a different checkpoint "
            f"(weights {str(manifest.get('source_weights_sha256'))[:12]}, this run's are {weights_sha[:12]})",
            "pass --overwrite to replace it")
    return None if overwrite else manifest


@writes_run("export")
def export_run(run_dir: RunLike, *, precisions: Sequence[str] = DEFAULT_EXPORT_PRECISIONS,
               components: Sequence[str] | None = None, opset: int = DEFAULT_OPSET, overwrite: bool = False,
               calibration: CalibrationSource = None, progress: ProgressCallback | None = None,
               quantization: QuantSettings | None = None) -> dict[str, Any]:
    """Export a run's components to `RUN_DIR/onnx/` atomically; returns the manifest.

    Exporting a subset (`components`, `precisions`) of a run that already has an export of
    the same checkpoint keeps the other files and their manifest entries.
    """
    run = RunDir.of(run_dir)
    check_opset(opset)
    parts = run.load_deployable()
    config, vq, dit, text_encoder, tokenizer = parts.config, parts.vq, parts.dit, parts.text_encoder, parts.tokenizer
    chosen_precisions, chosen = normalize_selection(precisions, components, component_names(config))
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
                    source = run.onnx_dir / entry["path"]
                    if source.is_file() and sha256_file(source) == entry["sha256"]:
                        target = tmp / entry["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source, target)
                        data_file = source.with_name(source.name + ".data")
                        if data_file.exists():
                            shutil.copy2(data_file, target.with_name(data_file.name))
                        files.setdefault(precision, {})[component] = entry
        result = export_models(config, vq, dit, tmp, precisions=chosen_precisions, components=chosen,
                               opset=opset, calibration=calibration, progress=progress,
                               why_no_calibration=why_no_calibration, text_encoder=text_encoder,
                               tokenizer=tokenizer, quantization=quantization, quant_data=quant_data)
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
            "components": list(component_names(config)),
            "files": {p: {c: files[p][c] for c in COMPONENTS if c in files[p]}
                      for p in PRECISIONS if files[p]},
            "calibration": result["calibration"],
            "last_export": {"precisions": chosen_precisions, "components": chosen,
                            "seconds": round(time.perf_counter() - started, 2)},
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
