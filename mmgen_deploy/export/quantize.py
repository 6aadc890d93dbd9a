"""FP32 ONNX -> explicit Q/DQ INT8 or FP8 ONNX, calibrated along the sampling trajectory.

TensorRT's implicit INT8 calibrators are deprecated and TensorRT 11 / TensorRT-RTX build only
strongly typed networks, so an 8-bit precision has to be in the graph as QuantizeLinear /
DequantizeLinear pairs. NVIDIA ModelOpt's ONNX post-training quantization makes them
(`modelopt.onnx.quantization.quantize`), calibrating activation ranges in ONNX Runtime CPU.
Two steps per component:

1. ModelOpt quantizes the FP32 graph (`high_precision_dtype="fp32"`), with no Q/DQ on the spec's
   high-precision scopes (`fp32_scopes` + `quant_exclude_scopes`, op types likewise).
2. With `high_precision="fp16"` (the default, for TensorRT), ModelOpt AutoCast turns what is not
   quantized into FP16 with the same FP32 scopes as the FP16 set (timestep embedding, GroupNorm...).
   ModelOpt's own FP16 step takes only op types, so it would put the timestep embedding in FP16.
   `high_precision="fp32"` keeps the rest FP32 (ONNX Runtime CPU then fuses INT8 Q/DQ MatMuls into
   integer matmuls).

Calibration (`trajectory_calibration`): a DiT's activations change a lot across timesteps
(Q-DiT, PTQ4DiT), so the denoiser is calibrated on real latents of the run's data noised at
timesteps spread over the whole schedule, each once with its class (or caption) and once with
the null condition, as classifier-free guidance feeds it. A distilled student is calibrated at its
own K timesteps, conditional only, with guidance scales spread over its distilled range. Encoder and
decoder: real images and their codes. The quantizer is never quantized (its distances decide code indices): its graph
in an 8-bit set is the FP32 one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from mmgen_deploy import onnx_files
from mmgen_deploy.config import ModelConfig
from mmgen_deploy.errors import NotAvailableError, UsageError
from mmgen_deploy.export.onnx_export import check_model, save_model
from mmgen_deploy.specs import (
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    TEXT_OUTPUTS,
    ComponentSpec,
    Tensors,
    scope_regex,
)

if TYPE_CHECKING:
    from torch import nn

    from mmgen_deploy.export.calibration import CalibrationData, FirstStageCache
    from mmgen_deploy.text.tokenizer import WordTokenizer

CALIBRATION_METHODS = ("max", "entropy")
HIGH_PRECISIONS = ("fp16", "fp32")
# Ops whose inputs carry Q/DQ when quantized: what "quantized node" means in the manifest.
_COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class QuantSettings:
    """How the 8-bit sets are made (`mmgen export --calibration-size ...`)."""

    # Denoiser calibration samples: conditional and null halves together (guidance doubles the batch).
    calibration_size: int = 256
    # Noise levels spread over the training schedule (both ends included).
    timesteps: int = 8
    # Real images for the encoder / decoder (and the latent pool of the denoiser).
    images: int = 64
    method: str = "max"
    high_precision: str = "fp16"
    # Calibration batch: ONNX Runtime runs this many samples at a time (bounded memory).
    batch: int = 16
    # Per-component override of the spec's choice: component -> "fp32" | "fp16" | "quantize".
    component_precisions: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_size < 2 or self.timesteps < 1 or self.images < 1 or self.batch < 1:
            raise UsageError("calibration size, timesteps, images and batch must be positive "
                             f"(got size {self.calibration_size}, timesteps {self.timesteps}, "
                             f"images {self.images}, batch {self.batch})",
                             "e.g. {calibration_size} 256 {calibration_timesteps} 8",
                             params=["calibration_size", "calibration_timesteps"])
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"unknown calibration method {self.method!r}",
                             f"choose from {', '.join(CALIBRATION_METHODS)}")
        if self.high_precision not in HIGH_PRECISIONS:
            raise UsageError(f"unknown high precision {self.high_precision!r}",
                             f"choose from {', '.join(HIGH_PRECISIONS)}")
        bad = {c: p for c, p in self.component_precisions.items() if p not in ("fp32", "fp16", "quantize")}
        if bad:
            raise UsageError(f"{{component_precisions}}: unknown value(s) {bad}",
                             "give COMPONENT=fp32, COMPONENT=fp16 or COMPONENT=quantize",
                             params=["component_precisions"])

    def denoiser_timesteps(self, config: ModelConfig) -> tuple[np.ndarray, int]:
        """The timesteps the denoiser is calibrated at, and how many samples each latent gives at each: a
        teacher's `timesteps` spread over the training schedule, twice (the conditional and the null half
        guidance feeds); a distilled student's own K timesteps, once (its sampler visits only those, and
        takes the guidance scale as an input), whatever `timesteps` says."""
        if config.student is None:
            return calibration_timesteps(config.diffusion.num_train_timesteps, self.timesteps), 2
        return np.asarray(config.student.timesteps, dtype=np.int64), 1

    def check_for(self, config: ModelConfig) -> None:
        """Refuse a calibration size that cannot give every timestep the denoiser is calibrated at one
        sample per half (`denoiser_timesteps`), before any work."""
        timesteps, halves = self.denoiser_timesteps(config)
        least = halves * len(timesteps)
        if self.calibration_size >= least:
            return
        if config.student is None:
            raise UsageError(f"{{calibration_size}} {self.calibration_size} is too small for {len(timesteps)} "
                             "calibration timesteps", f"give at least {least}, one conditional and one null sample "
                             "per timestep, or fewer {calibration_timesteps}",
                             params=["calibration_size", "calibration_timesteps"])
        raise UsageError(f"{{calibration_size}} {self.calibration_size} is too small for the {len(timesteps)} "
                         "timesteps this distilled student calibrates at",
                         f"give at least {least}, one sample per timestep", params=["calibration_size"])

    def shipped_precision(self, spec: ComponentSpec, precision: str) -> str:
        """The spec's choice for `spec` in the `precision` set, unless the user overrode it.
        The quantizer stays FP32 whatever is asked."""
        if spec.keep_fp32:
            return "fp32"
        override = self.component_precisions.get(spec.name)
        if override == "quantize":
            return precision
        return override or spec.shipped_precision(precision)

    def recorded(self) -> dict[str, Any]:
        return {"calibration_size": self.calibration_size, "timesteps": self.timesteps, "images": self.images,
                "method": self.method, "high_precision": self.high_precision, "batch": self.batch,
                "component_precisions": dict(self.component_precisions), "seed": self.seed}


# --------------------------------------------------------------------------------------------
# Calibration data along the sampling trajectory
# --------------------------------------------------------------------------------------------


def calibration_timesteps(num_train_timesteps: int, count: int) -> np.ndarray:
    """`count` integer timesteps spread evenly over [0, T-1], both ends included."""
    if count == 1:
        return np.asarray([num_train_timesteps // 2], dtype=np.int64)
    return np.unique(np.round(np.linspace(0, num_train_timesteps - 1, count)).astype(np.int64))


def spread_over_classes(labels: np.ndarray | None, count: int) -> np.ndarray:
    """Indices of `count` samples taken round-robin over the classes present (every class early),
    so that a calibration set smaller than the dataset still holds every class."""
    n = 0 if labels is None else len(labels)
    if labels is None or n == 0:
        return np.arange(count)
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order: list[int] = []
    while len(order) < min(count, n):
        for members in by_class:
            if members:
                order.append(int(members.pop(0)))
    return np.asarray(order[:count], dtype=np.int64)


def _text_conditions(modules: dict[str, nn.Module], config: ModelConfig, tokenizer: WordTokenizer,
                     prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Token ids of `prompts` and the text encoder's outputs for them (the denoiser's conditions)."""
    import torch

    from mmgen_deploy.specs import text_condition_names

    ids = tokenizer.encode(prompts).input_ids
    with torch.no_grad():
        outputs = dict(zip(TEXT_OUTPUTS, modules["text_encoder"](torch.from_numpy(ids)), strict=True))
    return ids, {n: outputs[n].numpy().astype(np.float32) for n in text_condition_names(config.dit)}


def trajectory_calibration(data: CalibrationData, config: ModelConfig, modules: dict[str, nn.Module],
                           settings: QuantSettings, *, tokenizer: WordTokenizer | None = None,
                           progress: Callable[[str], None] | None = None, cache: FirstStageCache | None = None,
                           ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Per-component calibration inputs and a description of them for the manifest.

    Denoiser: `settings.calibration_size` samples = timesteps x latents x {conditional, null}. At
    timestep t_k, latent h_j of a real image becomes x_t = sqrt(a_k) h_j + sqrt(1 - a_k) eps and
    appears twice, with its class id (or caption) and with the null label (or empty prompt): the
    doubled batch classifier-free guidance runs. Latents are taken round-robin over the classes,
    and each timestep gets the next ones, so every class is seen. A distilled student (one
    evaluation per image, the guidance scale an input): its own timesteps, each latent once with its
    class (or caption), and guidance scales from the bottom to the top of its distilled range.
    Encoder: the images; decoder: their codes z_q; text encoder: their captions' token ids, plus the
    empty prompt."""
    from mmgen_deploy.sampling.schedulers import training_alphas_cumprod

    settings.check_for(config)
    rng = np.random.default_rng(settings.seed)
    order = spread_over_classes(data.labels, min(settings.images, len(data.images)))
    images = np.ascontiguousarray(data.images[order])
    labels = None if data.labels is None else np.asarray(data.labels)[order].astype(np.int32)
    captions = None if data.captions is None else [data.captions[i] for i in order]
    from mmgen_deploy.export.calibration import first_stage_inputs
    from mmgen_deploy.specs import component_specs

    # The first stage's components in order, each on its predecessor's outputs (VQ: image -> h ->
    # z_q; KL: image -> latent); h_np is the latent the DiT denoises.
    inputs, h_np = first_stage_inputs(images, config, component_specs(config), modules, progress=progress,
                                      cache=cache)
    student = config.student
    # A teacher: the conditional half, then the null half on the same noisy latents. A student: one
    # conditional evaluation per image at each of its own timesteps, never the null condition.
    timesteps, halves = settings.denoiser_timesteps(config)
    per_step = max(1, settings.calibration_size // (halves * len(timesteps)))
    alphas = training_alphas_cumprod(config.diffusion)
    picks = (np.arange(len(timesteps) * per_step) % len(h_np)).reshape(len(timesteps), per_step)
    x_parts, t_parts, which = [], [], []
    for k, t in enumerate(timesteps):
        lat = h_np[picks[k]]
        a = float(alphas[t])
        x_t = (math.sqrt(a) * lat + math.sqrt(1.0 - a) * rng.standard_normal(lat.shape)).astype(np.float32)
        x_parts += [x_t] * halves
        t_parts += [np.full(halves * per_step, t, dtype=np.float32)]
        which += [picks[k]] * halves
    idx = np.concatenate(which)
    cond_rows = np.concatenate([np.r_[np.ones(per_step, bool), np.zeros((halves - 1) * per_step, bool)]]
                               * len(timesteps))
    denoiser: dict[str, np.ndarray] = {"x_t": np.concatenate(x_parts), "t": np.concatenate(t_parts)}
    description: dict[str, Any] = {
        "denoiser": {
            "samples": len(idx), "timesteps": [int(t) for t in timesteps], "per_timestep": halves * per_step,
            "halves": {"conditional": int(cond_rows.sum()), "null": int((~cond_rows).sum())},
            "noised": "x_t = sqrt(a_t) h + sqrt(1 - a_t) eps, h = encoder latents of real images",
        },
        "encoder": {"samples": len(images), "inputs": "real images"},
        "decoder": {"samples": len(images), "inputs": "codes z_q of the real images" if "quantizer" in inputs
                    else "the encoder's latents of the real images"},
    }
    if "quantizer" in inputs:
        description["quantizer"] = {"samples": 0, "inputs": "not quantized (FP32: distances decide code indices)"}
    if not config.uses_text:
        num_classes = config.dit.num_classes
        own = labels if labels is not None else (np.arange(len(h_np)) % num_classes).astype(np.int32)
        denoiser["class_ids"] = np.where(cond_rows, own[idx], num_classes).astype(np.int32)
        description["denoiser"]["classes"] = sorted({int(c) for c in own[idx]})
        if student is None:  # a student is never fed the null label
            description["denoiser"]["null_label"] = num_classes
    else:
        if tokenizer is None or "text_encoder" not in modules:
            raise ValueError("calibrating a text model needs its tokenizer and text encoder")
        from mmgen_deploy.export.calibration import vocabulary_prompts

        prompts = [c for c in (captions or []) if c.strip()] or vocabulary_prompts(tokenizer, len(h_np))
        pool = [prompts[i % len(prompts)] for i in range(len(h_np))]
        ids, cond = _text_conditions(modules, config, tokenizer, pool)
        _, null = _text_conditions(modules, config, tokenizer, [""])
        for name in cond:
            null_rows = np.repeat(null[name], len(idx), axis=0)
            rows = cond_rows.reshape(-1, *([1] * (cond[name].ndim - 1)))
            denoiser[name] = np.where(rows, cond[name][idx % len(pool)], null_rows).astype(np.float32)
        empty_ids, _ = _text_conditions(modules, config, tokenizer, [""] * max(1, len(pool) // 4))
        inputs["text_encoder"] = {"input_ids": np.concatenate([ids, empty_ids]).astype(np.int32)}
        description["denoiser"]["prompts"] = len(set(pool))
        if student is None:
            description["denoiser"]["null_condition"] = "the empty prompt"
        description["text_encoder"] = {"samples": len(inputs["text_encoder"]["input_ids"]),
                                       "inputs": "token ids of the images' captions and of the empty prompt"}
    if student is not None:
        # Both ends of the distilled range at every timestep: max calibration keeps the extremes.
        scales = np.linspace(student.guidance_min, student.guidance_max, per_step)
        denoiser[Tensors.GUIDANCE_SCALE] = np.tile(scales, len(timesteps)).astype(np.float32)
        description["denoiser"]["guidance_scales"] = [student.guidance_min, student.guidance_max]
    inputs["denoiser"] = denoiser
    return inputs, {"source": data.source, **description}


# --------------------------------------------------------------------------------------------
# Quantization of one component
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    names = ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast", "onnx_graphsurgeon", "")
    loggers = [logging.getLogger(n) for n in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        # CRITICAL: ModelOpt logs "Failed to get GPU count" as an ERROR on every CPU-only machine;
        # its real failures are exceptions.
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)


def _modelopt_quantize() -> Any:
    try:
        import modelopt.onnx.trt_utils as trt_utils
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise NotAvailableError(f"INT8/FP8 export needs NVIDIA ModelOpt ({exc})",
                                "pip install 'mmgen-deploy[fp16]', or export with {precision} fp32,fp16",
                                params=["precision"]) from None
    # `tensorrt-stubs` (a dev dependency) leaves an importable, empty `tensorrt` namespace package;
    # ModelOpt then takes TensorRT for installed and calls trt.Logger, which does not exist.
    if trt_utils.TRT_PYTHON_AVAILABLE and not hasattr(trt_utils.trt, "Logger"):
        trt_utils.TRT_PYTHON_AVAILABLE = False
    return quantize


def quantizer_version() -> str:
    try:
        import modelopt

        return str(modelopt.__version__)
    except ImportError:
        return "not installed"


def high_precision_scopes(spec: ComponentSpec) -> tuple[list[str], list[str]]:
    """(node-name regexes, op types) that get no Q/DQ: the FP32 scopes and the quantization exclusions."""
    scopes = list(dict.fromkeys((*spec.fp32_scopes, *spec.quant_exclude_scopes)))
    ops = list(dict.fromkeys((*spec.fp32_op_types, *spec.quant_exclude_op_types)))
    # A module path ("dit.final_layer"), or a regex over node names when it starts with "^"
    # (e.g. every block's adaLN: r"^/dit/blocks\.\d+/adaLN_modulation/").
    return [scope_regex(s) for s in scopes], ops


def quantizer_arguments(spec: ComponentSpec, mode: str, settings: QuantSettings) -> dict[str, Any]:
    nodes, ops = high_precision_scopes(spec)
    return {"quantize_mode": mode, "calibration_method": settings.method, "calibration_eps": ["cpu"],
            "high_precision_dtype": "fp32", "nodes_to_exclude": nodes, "op_types_to_exclude": ops}


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Which compute nodes read dequantized inputs (quantized) and which do not (high precision)."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    quantized: list[str] = []
    high: list[str] = []
    for node in model.graph.node:
        if node.op_type not in _COMPUTE_OPS:
            continue
        fed = [produced_by.get(i) for i in node.input[:2]]
        (quantized if any(n is not None and n.op_type == "DequantizeLinear" for n in fed) else high).append(node.name)
    q_types = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer
                      if i.name.endswith("zero_point")})
    return {"qdq_pairs": sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear"),
            "quantized_nodes": len(quantized), "high_precision_compute_nodes": sorted(high),
            "quantized_types": q_types}


def mismatched_dequantize_scales(path: Path) -> list[str]:
    """The DequantizeLinear nodes of an ONNX file that undo a QuantizeLinear with another scale or zero
    point than it used. A Q/DQ pair rounds one tensor (a weight, an activation) to 8 bits and back, so
    both halves must use one scale: a DQ with twice the scale doubles that tensor and leaves a valid
    graph. Numerical parity misses such a scale inside a trained DiT's block at the 8-bit tolerances
    (docs/design/int8-block-scale.md); this reads only the graph and its small constants."""
    model = onnx.load(str(path), load_external_data=False)
    constants: dict[str, onnx.TensorProto] = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    produced_by = {out: node for node in model.graph.node for out in node.output}

    def value(name: str) -> np.ndarray | None:
        tensor = constants.get(name) if name else None
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return onnx.numpy_helper.to_array(tensor)

    mismatched = []
    for node in model.graph.node:
        quantize = produced_by.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        for slot in (1, 2):  # scale, zero point (absent: zero)
            ours = node.input[slot] if len(node.input) > slot else ""
            theirs = quantize.input[slot] if len(quantize.input) > slot else ""
            if ours == theirs:
                continue
            a, b = value(ours), value(theirs)
            if (ours and a is None) or (theirs and b is None):
                continue  # not a constant here (stored externally): nothing to compare
            first = np.zeros(1) if a is None else a.astype(np.float64)
            second = np.zeros(1) if b is None else b.astype(np.float64)
            try:
                same = bool(np.all(first == second))  # broadcast: a scalar against a per-channel value
            except ValueError:
                same = False
            if not same:
                mismatched.append(node.name or node.output[0])
                break
    return mismatched


def quantize_component(fp32_path: Path, spec: ComponentSpec, out_path: Path, mode: str,
                       calibration: dict[str, np.ndarray], settings: QuantSettings, *,
                       batch_limit: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Write the `mode` ("int8" / "fp8") Q/DQ graph of one component; return its manifest record.

    The quantizer (spec.keep_fp32) is copied as its FP32 graph, never quantized. `batch_limit` caps
    the calibration batch for components whose activations are large (the exporter passes
    `budget.calibration_batch`: one 256 px image for a VQ-f8 encoder, where ModelOpt's default
    batch of 16 and AutoCast's reference run over it were OOM-killed at 23.4 GB)."""
    if mode not in QUANTIZED_PRECISIONS:
        raise ValueError(f"mode must be one of {QUANTIZED_PRECISIONS}, got {mode!r}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if spec.keep_fp32:
        onnx_files.copy_onnx(fp32_path, out_path)
        return {"name": "none (component kept FP32: spec.keep_fp32, distances decide code indices)",
                "version": None, "arguments": {}, "qdq_pairs": 0, "quantized_nodes": 0}
    quantize = _modelopt_quantize()
    arguments = quantizer_arguments(spec, mode, settings)
    n = int(calibration[spec.input_names[0]].shape[0])
    batch = min(settings.batch, n, batch_limit or n)
    usable = n - n % batch  # ModelOpt splits the arrays into n / batch equal runs
    arrays = {name: np.ascontiguousarray(calibration[name][:usable]) for name in spec.input_names}
    shapes = ",".join(f"{t.name}:{'x'.join(str(d) for d in t.concrete_shape(batch))}" for t in spec.inputs)
    with tempfile.TemporaryDirectory(prefix=f"mmgen-{mode}-{spec.name}-") as work:
        # ModelOpt writes intermediate files beside its input: give it a private copy.
        src = Path(work) / f"{spec.name}.onnx"
        onnx_files.copy_onnx(fp32_path, src)
        external = bool(onnx_files.data_files(fp32_path))
        qdq = Path(work) / f"{spec.name}.qdq.onnx"
        with _quiet():
            quantize(str(src), calibration_data=arrays, calibration_shapes=shapes, output_path=str(qdq),
                     log_level="CRITICAL", use_external_data_format=external, **arguments)
        if not qdq.is_file():
            raise NotAvailableError(f"ModelOpt wrote no quantized graph for {spec.name}",
                                    "rerun with {debug} and report it", params=["debug"])
        model = onnx.load(str(qdq))
        converter: dict[str, Any] | None = None
        if settings.high_precision == "fp16":
            model, converter = _to_fp16(qdq, spec, arrays, Path(work), settings.batch, range_batch=batch,
                                        threads=threads)
    model.producer_name = "mmgen-deploy"
    model.doc_string = (f"mmgen-deploy {spec.name}, {mode.upper()} Q/DQ (ModelOpt PTQ, {settings.method} "
                        f"calibration), high precision {settings.high_precision}")
    save_model(model, out_path)
    check_model(out_path)
    summary = qdq_summary(onnx.load(str(out_path)))
    return {"name": "modelopt.onnx.quantization.quantize", "version": quantizer_version(),
            "arguments": {**arguments, "calibration_samples": usable, "calibration_batch": batch},
            "high_precision": settings.high_precision, "fp16_converter": converter, **summary}


def _to_fp16(qdq: Path, spec: ComponentSpec, arrays: dict[str, np.ndarray], work: Path,
             batch: int, *, range_batch: int, threads: int = 1) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """AutoCast the non-quantized part of a Q/DQ graph to FP16, keeping the spec's FP32 scopes, on
    the ranges of its first `batch` calibration samples measured `range_batch` at a time (the FP16
    export's bounded range analysis; AutoCast's own reference run holds every tensor at once)."""
    from mmgen_deploy.export.fp16 import convert_fp16

    first = {k: v[:batch] for k, v in arrays.items()}
    target = work / "high-precision-fp16" / qdq.name
    converter = convert_fp16(qdq, spec, target, first, batch_size=range_batch, threads=threads)
    converter.pop("kept_fp32_nodes", None)
    converter.pop("fp16_nodes", None)
    return onnx.load(str(target)), converter


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}", f"choose from {', '.join(PRECISIONS)}")
