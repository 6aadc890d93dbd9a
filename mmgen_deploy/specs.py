"""One declarative description per deployable component.

A `ComponentSpec` says everything the rest of the pipeline needs to know about a
component: tensor names, dtypes and shapes (only the batch axis is dynamic; spatial
sizes come from the model config), how to make realistic dummy inputs, the batch
profile (min/opt/max) for engines, parity tolerances per precision, and which parts
must stay FP32 in a mixed-precision graph. Export, engine building, runtime buffer
allocation and parity all read it; nothing else repeats these facts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmgen_deploy.config import DiTConfig, ModelConfig
from mmgen_deploy.text.tokenizer import BOS, EOS, PAD

BATCH = "batch"  # the symbolic name of the one dynamic axis
Dim = int | str

# -- the lists every other module derives from -------------------------------------------
# Every deployable component in pipeline order: the first stage's encoder -> quantizer -> decoder,
# the denoiser that works in its latent space, then the text encoder (text-to-image models only) and
# the vocoder (audio models only: the decoded spectrogram -> a waveform). A model has the subset its
# configuration says (`component_names`).
COMPONENTS: tuple[str, ...] = ("encoder", "quantizer", "decoder", "denoiser", "text_encoder", "vocoder")
TEXT_ONLY_COMPONENTS: tuple[str, ...] = ("text_encoder",)
AUDIO_ONLY_COMPONENTS: tuple[str, ...] = ("vocoder",)
# The first stage's components per kind (`ModelConfig.first_stage_kind`), in pipeline order:
# image -> encoder -> (quantizer) -> the latent the DiT denoises; the ones after the encoder turn
# a denoised latent back into an image (`decode_components`), each taking its predecessor's
# outputs by name. The one place that knows a KL autoencoder has no quantizer.
FIRST_STAGE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "vq": ("encoder", "quantizer", "decoder"),
    "kl": ("encoder", "decoder"),
}
# What the sampling loop runs for a VQ class model (see `sampling_components` for any model).
SAMPLING_COMPONENTS: tuple[str, ...] = ("denoiser", *FIRST_STAGE_COMPONENTS["vq"][1:])
# The precisions of the exported ONNX sets, in the order they are made (fp16 is cast from fp32).
# The 8-bit ones are explicit Q/DQ graphs (ModelOpt post-training quantization,
# `mmgen_deploy.export.quantize`); `mmgen export` makes them only when asked (`--precision int8,fp8`
# or `all`).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "fp8")
DEFAULT_EXPORT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
QUANTIZED_PRECISIONS: tuple[str, ...] = ("int8", "fp8")
# Precisions without an ONNX set of their own: the runtime lowers an exported set (bf16 = the FP32 set
# under OpenVINO's bf16 inference hint or torch autocast, on AMX / AVX-512 BF16 CPUs).
RUNTIME_PRECISIONS: dict[str, str] = {"bf16": "fp32"}  # precision -> the ONNX set it runs
# Every precision a backend can be asked for (--precision of generate, parity, bench, eval, serve).
RUN_PRECISIONS: tuple[str, ...] = (*PRECISIONS, *RUNTIME_PRECISIONS)
# Classifier-free guidance runs [cond; uncond] in one denoiser call: the denoiser's batch is doubled.
GUIDANCE_BATCH_MULTIPLIER = 2

# The denoiser in three parts, for step caching (`sampling.cache`): the head (embeddings and the
# first CACHE_HEAD_BLOCKS blocks) runs every step, the body (the middle blocks) only on the steps a
# cache policy recomputes, the tail (the last CACHE_TAIL_BLOCKS blocks and the final layer) every
# step, on the head's tokens plus the body's residual (body output - body input), fresh or cached.
# The whole denoiser stays a component of its own; the parts are extra graphs, exported when asked
# (`mmgen export --components denoiser_parts`), since they hold a second copy of the DiT's weights.
# No block in the head and none in the tail: every block is cached (FORA / TeaCache), so a reused
# step costs only the embeddings and the final layer. On the trained quickstart model this lost less
# accuracy than caching every block but the first (docs/design/cache-split.md), and it removes a
# block per step from what runs every step. The head also returns the body's first block's
# timestep-modulated input, the cheap indicator the adaptive policy watches (TeaCache's signal).
DENOISER_PARTS: tuple[str, ...] = ("denoiser_head", "denoiser_body", "denoiser_tail")
PARTS_WORD = "denoiser_parts"  # what `--components` takes for all three
CACHE_HEAD_BLOCKS = 0
CACHE_TAIL_BLOCKS = 0
# Every component a run may hold graphs of, in pipeline order (the parts follow the whole denoiser).
ALL_COMPONENTS: tuple[str, ...] = (*COMPONENTS[:COMPONENTS.index("denoiser") + 1], *DENOISER_PARTS,
                                   *COMPONENTS[COMPONENTS.index("denoiser") + 1:])


def expand_parts(names: Iterable[str]) -> tuple[str, ...]:
    """Component names as given, PARTS_WORD replaced by the three denoiser parts (repeats dropped)."""
    return tuple(dict.fromkeys(n for name in names for n in (DENOISER_PARTS if name == PARTS_WORD else (name,))))


def export_word(component: str) -> str:
    """What `--components` takes to re-export `component`: a denoiser part only with the other two
    (the three are cut at one split), any other component by its name."""
    return PARTS_WORD if component in DENOISER_PARTS else component


def has_denoiser_parts(dit: DiTConfig) -> bool:
    """Whether the DiT is deep enough to split: a body of at least one block left for a policy to reuse.
    A shallower one has no parts (`component_names`, `component_specs` and `build_components` leave them out)."""
    return dit.depth >= CACHE_HEAD_BLOCKS + CACHE_TAIL_BLOCKS + 1


def denoiser_split(dit: DiTConfig) -> dict[str, range]:
    """Which blocks each denoiser part runs (the head also embeds, the tail also runs the final layer)."""
    if not has_denoiser_parts(dit):
        raise ValueError(f"a DiT of depth {dit.depth} is too shallow to split into head, body and tail")
    body_stop = dit.depth - CACHE_TAIL_BLOCKS
    return {"denoiser_head": range(0, CACHE_HEAD_BLOCKS), "denoiser_body": range(CACHE_HEAD_BLOCKS, body_stop),
            "denoiser_tail": range(body_stop, dit.depth)}


def component_names(config: ModelConfig, *, parts: bool = False) -> tuple[str, ...]:
    """The deployable components of a model, in pipeline order: its first stage's (VQ: encoder,
    quantizer, decoder; KL: encoder, decoder), the denoiser, and the text encoder of a text model.
    `parts`: with the denoiser's parts after the denoiser (what a run can hold; not exported by default),
    when the DiT has them (`has_denoiser_parts`)."""
    with_parts = parts and has_denoiser_parts(config.dit)
    have = {*FIRST_STAGE_COMPONENTS[config.first_stage_kind], "denoiser",
            *(TEXT_ONLY_COMPONENTS if config.uses_text else ()), *(DENOISER_PARTS if with_parts else ()),
            *(AUDIO_ONLY_COMPONENTS if config.audio is not None else ())}
    return tuple(c for c in ALL_COMPONENTS if c in have)


def decode_components(config: ModelConfig) -> tuple[str, ...]:
    """What turns a denoised latent into an image, in order (VQ: quantizer, decoder; KL: decoder), and
    for an audio model the image into sound (the vocoder). The first takes the latent under
    `latent_name(config)`; each next one its predecessor's outputs."""
    audio = AUDIO_ONLY_COMPONENTS if config.audio is not None else ()
    return (*FIRST_STAGE_COMPONENTS[config.first_stage_kind][1:], *audio)


def latent_name(config: ModelConfig) -> str:
    """The tensor name of the latent between encoder and denoiser (VQ: h, KL: latent)."""
    return Tensors.LATENT if config.first_stage_kind == "kl" else Tensors.H


def sampling_components(config: ModelConfig | None) -> tuple[str, ...]:
    """What `sample` runs for a model with this config: the denoiser, its first stage's decode
    chain, and the text encoder of a text-to-image model (an ONNX set without it cannot encode
    prompts). None (an unreadable run): the VQ class set."""
    if config is None:
        return SAMPLING_COMPONENTS
    names = ("denoiser", *decode_components(config))
    return (*names, *TEXT_ONLY_COMPONENTS) if config.uses_text else names


class Tensors:
    """The tensor names of the component graphs (inputs and outputs), as the specs below use them."""

    IMAGE = "image"  # encoder input, decoder output, vocoder input (an audio model's spectrogram)
    AUDIO = "audio"  # vocoder output: (B, samples) waveforms, 1.0 = full scale
    H = "h"  # encoder output, quantizer input: the pre-quantization latent
    Z_Q = "z_q"  # quantizer output, decoder input
    INDICES = "indices"  # quantizer output: code indices
    LATENT = "latent"  # KL encoder output, KL decoder input: the scaled latent (no quantizer)
    X_T = "x_t"  # denoiser inputs: noisy latent, timestep, class label
    T = "t"
    CLASS_IDS = "class_ids"
    MODEL_OUTPUT = "model_output"  # denoiser output: epsilon (and variance channels with learned sigma)
    HIDDEN = "hidden"  # denoiser parts: the tokens (B, N, D) after the head's blocks
    # denoiser head output: the body's first block's attention input, LayerNorm(hidden) shifted and
    # scaled by the embedding (B, N, D); the adaptive cache policy's signal, read by no other part
    MODULATED_INPUT = "modulated_input"
    EMBEDDING = "embedding"  # denoiser parts: the adaLN input (B, D), timestep + condition embedding
    BODY_RESIDUAL = "body_residual"  # denoiser body output: its blocks' output minus their input tokens
    INPUT_IDS = "input_ids"  # text encoder input: token ids
    TEXT_EMBEDDINGS = "text_embeddings"  # text encoder outputs = text denoiser inputs
    TEXT_MASK = "text_mask"
    TEXT_POOLED = "text_pooled"
    GUIDANCE_SCALE = "guidance_scale"  # a guidance-distilled student's input: the guidance scale per sample


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int32"
    shape: tuple[Dim, ...]  # BATCH marks the dynamic axis

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("float")

    def to_dict(self) -> dict[str, Any]:
        """The record manifests keep of a tensor (export and engine manifests alike)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    """Pass when relative L2 error <= rel_l2 (float outputs) or, for integer outputs,
    when the fraction of exactly equal elements >= min_agreement."""

    rel_l2: float = 1e-5
    min_agreement: float = 1.0
    # The limit on random inputs when it differs (8-bit graphs: their activation ranges are
    # calibrated on real data, and random inputs such as uniform-noise images leave them).
    random_rel_l2: float | None = None

    def limit(self, kind: str) -> float:
        """The relative-L2 limit for inputs of this kind ("random", "real", "dummy")."""
        return self.random_rel_l2 if kind == "random" and self.random_rel_l2 is not None else self.rel_l2


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")

    def scaled(self, factor: int) -> BatchProfile:
        return BatchProfile(self.min * factor, self.opt * factor, self.max * factor)


InputMaker = Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def scope_regex(scope: str) -> str:
    """Module path `dit.t_embedder` -> regex for the exported node names `/dit/t_embedder/...`
    (a scope that already is a regex, starting with ^, is returned as given)."""
    if scope.startswith("^"):
        return scope
    return "^/" + "/".join(part for part in scope.split(".")) + "/"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_inputs: InputMaker = field(repr=False)
    # Per-sample batch profile; `batch_multiplier` > 1 for the denoiser, whose batch is
    # doubled by classifier-free guidance (cond + uncond in one call).
    profile: BatchProfile = BatchProfile(1, 8, 16)
    batch_multiplier: int = 1
    tolerances: dict[str, dict[str, Tolerance]] = field(default_factory=dict)
    # Mixed precision: True keeps the whole graph FP32 at every precision (the quantizer: FP16
    # and BF16 distances flip code indices). Otherwise `fp32_scopes` lists module paths (as in the PyTorch
    # module tree, e.g. "dit.t_embedder") whose nodes stay FP32: in the FP16 and 8-bit sets, and in
    # OpenVINO under its bf16 / f16 hint (`runtime.openvino_graphs`; its matmuls excepted).
    keep_fp32: bool = False
    fp32_scopes: tuple[str, ...] = ()
    fp32_op_types: tuple[str, ...] = ()
    # The component whose outputs feed this one's same-named inputs (a text denoiser's conditions
    # are the text encoder's outputs): random inputs for it are that component's outputs on its
    # own random inputs (see `random_feeds`).
    upstream: str | None = None
    # Quantized sets (int8 / fp8): module scopes and op types that get no Q/DQ (they run in the
    # high precision, FP16 with the FP32 scopes above), and the precision this component ships at
    # instead when quantizing it does not pay or is not safe (None: it is quantized). The quantizer
    # (`keep_fp32`) is never quantized: its distances decide code indices.
    quant_exclude_scopes: tuple[str, ...] = ()
    quant_exclude_op_types: tuple[str, ...] = ()
    quant_fallback: dict[str, str] = field(default_factory=dict)
    # A denoiser part: the DiT blocks its graph runs, [start, stop) (`denoiser_split`). Recorded by the
    # export, so a graph cut at another split is refused rather than composed with the others.
    blocks: tuple[int, int] | None = None
    # False for a graph that runs for milliseconds between the calls of a heavy one in the same loop (the
    # denoiser's head and tail under step caching): a backend whose idle worker threads spin-wait after a
    # call (ONNX Runtime) must not let them, or they take the cores the heavy graph needs next (the DiT-B/2
    # body ran 12 % slower on 2 ONNX Runtime threads beside a spinning head and tail).
    idle_spin: bool = True

    def shipped_precision(self, precision: str) -> str:
        """The precision of this component's graph in the `precision` set: the FP16 and 8-bit sets
        hold the FP32 quantizer, and an 8-bit set holds the fallback precision of components the
        spec keeps out of quantization."""
        if self.keep_fp32:
            return "fp32"
        return self.quant_fallback.get(precision, precision) if precision in QUANTIZED_PRECISIONS else precision

    @property
    def has_group_norms(self) -> bool:
        """Whether the graph holds GroupNorms (exported as InstanceNormalization): the first stage's
        encoder and decoder, which ONNX Runtime's CPU provider gets rewritten (`ort_graphs`)."""
        return any(op in GROUP_NORM_OP_TYPES for op in self.fp32_op_types)

    @property
    def engine_profile(self) -> BatchProfile:
        """The batch range an engine must accept (per-sample profile x multiplier)."""
        return self.profile.scaled(self.batch_multiplier)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tolerance(self, precision: str, output: str) -> Tolerance:
        return self.tolerances.get(precision, {}).get(output, Tolerance())

    def interface_record(self) -> dict[str, Any]:
        """What the export manifest records of the graph's interface (and a runner compares with the
        spec before loading it, `stale_interface`): tensors, the engine batch profile, a part's blocks."""
        profile = self.engine_profile
        record: dict[str, Any] = {"inputs": [t.to_dict() for t in self.inputs],
                                  "outputs": [t.to_dict() for t in self.outputs],
                                  "engine_profile": {"min": profile.min, "opt": profile.opt, "max": profile.max}}
        if self.blocks is not None:
            record["blocks"] = list(self.blocks)
        return record

    def tensor_mismatch(self, inputs: Sequence[Collection[str]], outputs: Sequence[Collection[str]]) -> str | None:
        """How a graph's inputs and outputs, each given as the names of one port (a backend may give a
        port several), differ from this spec's, in words (None when they do not)."""
        for key, ports, expected in (("inputs", inputs, self.input_names), ("outputs", outputs, self.output_names)):
            names = [next((n for n in sorted(port) if n in expected), min(port, default="?")) for port in ports]
            if sorted(names) != sorted(expected):
                return f"has {key} {names}, expected {expected}"
        return None

    def stale_interface(self, recorded: dict[str, Any]) -> str | None:
        """How a graph's manifest entry (`interface_record` as an export wrote it) differs from this
        spec's interface, in words (None when it does not): other tensor names, or other blocks."""
        def ports(key: str) -> list[set[str]]:
            return [{str(t.get("name"))} for t in recorded.get(key, []) if isinstance(t, dict)]

        mismatch = self.tensor_mismatch(ports("inputs"), ports("outputs"))
        if mismatch is not None:
            return mismatch
        if self.blocks is not None and recorded.get("blocks") != list(self.blocks):
            found = recorded.get("blocks")
            found_words = _blocks_words(found) if isinstance(found, list) and len(found) == 2 \
                else "DiT blocks its manifest entry does not name"
            return f"runs {found_words}, expected {_blocks_words(list(self.blocks))}"
        return None

    def io(self, name: str) -> TensorSpec:
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise KeyError(f"{self.name} has no tensor named {name!r}")


def _blocks_words(blocks: list[int]) -> str:
    """[start, stop) of DiT blocks in words: `no DiT block`, `DiT block 0`, `DiT blocks 1-3`."""
    start, stop = blocks
    if stop <= start:
        return "no DiT block"
    return f"DiT block {start}" if stop == start + 1 else f"DiT blocks {start}-{stop - 1}"


# GroupNorm exports as InstanceNormalization (see the export notes); its mean/variance
# reductions over a whole group overflow or lose precision in FP16 (FP16 VAE decoders give
# NaN / black images), so the VQ encoder and decoder keep them FP32.
GROUP_NORM_OP_TYPES = ("InstanceNormalization",)


# The relative-L2 tolerance of every float output against PyTorch FP32, per precision. The 8-bit
# ones are set from measurement on the trained quickstart models (benchmarks/RESULTS.md), with
# headroom; random inputs lie outside an 8-bit graph's calibrated activation ranges and get
# RANDOM_REL_L2_8BIT instead.
#
# BF16 (OpenVINO's bf16 hint on the FP32 graph, torch autocast) keeps 8 mantissa bits (unit roundoff
# 2**-9 = 2e-3), rounding weights and activations of every matmul and convolution; errors add up over
# a component's depth. Set from measurement with ~2x headroom: worst relative L2 over batches 1 and 3
# on random and real inputs, OpenVINO 2026.4 bf16 (torch 2.13 autocast is within these too), AMX CPU,
# re-randomised tiny class and text runs: encoder 1.9e-2, decoder 3.4e-2 (real codes), denoiser 8.0e-3,
# text encoder 6.8e-3; the trained quickstart model: encoder 6.7e-3, decoder 3.3e-3, denoiser 5.7e-3.
# Encoder and decoder get more below.
DEFAULT_REL_L2: dict[str, float] = {"fp32": 1e-5, "fp16": 1e-2, "int8": 5e-2, "fp8": 8e-2, "bf16": 2e-2}
RANDOM_REL_L2_8BIT = 0.25


def _tol(names: tuple[str, ...], **limits: float) -> dict[str, dict[str, Tolerance]]:
    """Tolerances of `names` per precision: DEFAULT_REL_L2 unless `limits` says otherwise (int8=0.03)."""
    def one(p: str) -> Tolerance:
        return Tolerance(rel_l2=limits.get(p, DEFAULT_REL_L2[p]),
                         random_rel_l2=RANDOM_REL_L2_8BIT if p in QUANTIZED_PRECISIONS else None)
    return {p: {n: one(p) for n in names} for p in RUN_PRECISIONS}


# End-to-end parity thresholds per precision (whole sampling runs, same seed, against PyTorch
# FP32): errors compound over steps, so latents get looser limits than single calls.
PIPELINE_TOLERANCES: dict[str, dict[str, float]] = {
    # `latent_rel_l2` is over all the images together, `median_latent_rel_l2` the median of each
    # image's own. Guided sampling amplifies a small per-step difference at an image that sits near a
    # boundary between two outcomes: that image ends on a nearby, different sample (a per-image
    # latent rel. L2 of 0.1-1.3, measured under BF16) while the others stay close. One such image
    # decides the aggregate and leaves the median alone. Where the median was not measured apart
    # (fp32, fp16, 8-bit) its limit is the aggregate's.
    "fp32": {"latent_rel_l2": 1e-3, "median_latent_rel_l2": 1e-3, "min_index_agreement": 0.99,
             "min_psnr": 40.0, "min_ssim": 0.99},
    "fp16": {"latent_rel_l2": 5e-2, "median_latent_rel_l2": 5e-2, "min_index_agreement": 0.90,
             "min_psnr": 30.0, "min_ssim": 0.95},
    # BF16 has 3 mantissa bits fewer than FP16 (8x the rounding), and the denoiser's rounding compounds
    # over the steps. Measured on a trained quickstart model (20 DDIM steps, 8 images, guidance 4,
    # seeds 0-3), OpenVINO bf16 / torch autocast: final latent rel. L2 0.016-0.23 / 0.008-0.056,
    # median image 0.016-0.047 / 0.008-0.015; the largest single images 0.44 and 1.29 / 0.14; another
    # trained model gave agreement 0.62-0.77, PSNR 23.4-26.4 dB, SSIM 0.906-0.943. Single denoiser
    # calls are 1.25-1.46x further from FP32 under OpenVINO than under torch (OpenVINO keeps the
    # residual stream and the normalisations' tensors in BF16). So the aggregate limits bound gross
    # failures, as for the 8-bit sets; the median image is held to ~3x the worst measured; the
    # component checks catch a 1.08x scaled patch embedding; whether the content stays the same is
    # `mmgen eval`'s accuracy.
    "bf16": {"latent_rel_l2": 0.5, "median_latent_rel_l2": 0.15, "min_index_agreement": 0.50,
             "min_psnr": 20.0, "min_ssim": 0.85},
    # 8-bit sets, from measurement on the trained quickstart model (ONNX Runtime CPU, 8 images, DDIM 20,
    # guidance 4): INT8 latent rel. L2 0.71, indices 18% equal, 17.2 dB, SSIM 0.77; FP8 0.27, 45%,
    # 23.2 dB, 0.90. A few per cent of error per denoiser call (the component checks) makes the
    # guided trajectory end on a nearby but different image, so same-seed pixels only bound gross
    # failures here (NaN, a wrong scale, noise); whether the images still show what was asked is
    # `mmgen eval`'s accuracy (docs/quantization.md: within 5 points of FP32).
    "int8": {"latent_rel_l2": 1.0, "median_latent_rel_l2": 1.0, "min_index_agreement": 0.10,
             "min_psnr": 14.0, "min_ssim": 0.65},
    "fp8": {"latent_rel_l2": 0.5, "median_latent_rel_l2": 0.5, "min_index_agreement": 0.30,
            "min_psnr": 18.0, "min_ssim": 0.80},
}


# End-to-end checks of an audio model's waveforms (the vocoder's output) on top of the image checks:
# the relative L2 of all the clips together, and the fraction of clips the waveform judge
# (`evaluation.tone_judge`) hears the same way on both sides (waveform and contour; `tones` runs).
# The waveform follows the spectrogram the decoder made, so it is held to that image's precision.
# Measured on two trained `tones` models (8 clips, DDIM 20, guidance 4): waveform rel. L2 2.5e-4 (ONNX
# Runtime FP32), 5.3e-2 and 0.16 (FP16), 0.56 (OpenVINO BF16: Griffin-Lim from the same start phase lands
# on other phases when the spectrogram moves a little; the judge heard 8 of 8 the same), judge agreement
# 1.0 on each. BF16's limit only bounds gross failures (uncorrelated clips give ~1.4); the judge's
# agreement is what says the clips still sound the same.
# 8-bit sets, measured on a trained `tones` model (ONNX Runtime CPU, 8 clips, DDIM 20, guidance 4, seeds
# 0-3): INT8 waveform rel. L2 1.04-1.24, judge agreement 7/8 on two seeds and 8/8 on two; FP8 0.80-0.88,
# 8/8 on each. The 8-bit denoiser moves the spectrograms (PSNR 20.6-26.9 dB INT8, 31.2-33.0 dB FP8) and
# Griffin-Lim turns that into other phases, so INT8 clips are about as far apart sample by sample as
# unrelated clips of the same loudness (~1.41): the waveform limits bound only gross failures (NaN, a
# larger wrong scale), and the judge's agreement, held to three clips in four as for BF16, is the check
# that says the clips still sound the same.
AUDIO_PIPELINE_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"audio_rel_l2": 1e-2, "min_judge_agreement": 1.0},
    "fp16": {"audio_rel_l2": 0.5, "min_judge_agreement": 0.9},
    "bf16": {"audio_rel_l2": 1.0, "min_judge_agreement": 0.75},
    "int8": {"audio_rel_l2": 1.5, "min_judge_agreement": 0.75},
    "fp8": {"audio_rel_l2": 1.2, "min_judge_agreement": 0.75},
}


# The text encoder's outputs, named as the text denoiser's inputs: the sampling loop
# forwards them without knowing what they are.
TEXT_OUTPUTS = (Tensors.TEXT_EMBEDDINGS, Tensors.TEXT_MASK, Tensors.TEXT_POOLED)


def denoiser_condition_names(dit: DiTConfig) -> tuple[str, ...]:
    """The denoiser's inputs after x_t and t, which depend on how the DiT is conditioned."""
    guidance = (Tensors.GUIDANCE_SCALE,) if dit.guidance_embed else ()
    if not dit.uses_text:
        return (Tensors.CLASS_IDS, *guidance)
    names = (Tensors.TEXT_EMBEDDINGS, Tensors.TEXT_MASK) if dit.uses_cross_attention else ()
    return (*names, Tensors.TEXT_POOLED, *guidance) if dit.uses_pooled_text else (*names, *guidance)


def text_condition_names(dit: DiTConfig) -> tuple[str, ...]:
    """The denoiser's conditions that come from the text encoder (a distilled student's guidance
    scale does not)."""
    return tuple(name for name in denoiser_condition_names(dit) if name in TEXT_OUTPUTS)


def _text_masks(b: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(b, length) 1/0 masks of prompts with 2..length tokens ([BOS] + words + [EOS])."""
    lengths = rng.integers(2, length + 1, (b,))
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)


# Runs a component (by name) on named feeds and returns its named outputs.
ComponentRunner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def random_feeds(spec: ComponentSpec, specs: dict[str, ComponentSpec], batch: int, rng: np.random.Generator,
                 run_upstream: ComponentRunner | None = None) -> dict[str, np.ndarray]:
    """Random inputs of `spec` at `batch`, for export validation and parity.

    Inputs that another component produces (`spec.upstream`) are that component's outputs on its
    own random inputs when `run_upstream` can run it. A text denoiser thus sees what its text
    encoder makes of random prompts, not the spec's standard-normal stand-ins: those are fine for an
    untrained model, but a trained encoder's outputs are ~3.5x smaller (std 0.28 on `shapes`), and a
    trained text DiT fed the stand-ins leaves its training range and its activations blow up, so
    rounding differences grow with them. Measured on a text quickstart model: denoiser rel. L2
    1.8e-5 (FP32) and 3.9e-2 (FP16) on the stand-ins, 4.0e-7 and 3.1e-4 on encoded random prompts."""
    feeds = spec.make_inputs(batch, rng)
    if spec.upstream is None or run_upstream is None:
        return feeds
    outputs = run_upstream(spec.upstream, specs[spec.upstream].make_inputs(batch, rng))
    return {name: (np.ascontiguousarray(outputs[name], dtype=np.float32) if name in outputs else value)
            for name, value in feeds.items()}


Shape = tuple[Dim, ...]


def _vq_specs(img: Shape, lat: Shape, idx: Shape, image_inputs: InputMaker,
              latent_inputs: Callable[[str], InputMaker]) -> dict[str, ComponentSpec]:
    """VQ first stage: encoder (image -> h), quantizer (h -> z_q, indices), decoder (z_q -> image)."""
    N = Tensors
    return {
        "encoder": ComponentSpec(
            name="encoder",
            inputs=(TensorSpec(N.IMAGE, "float32", img),),
            outputs=(TensorSpec(N.H, "float32", lat),),
            make_inputs=image_inputs,
            tolerances=_tol((N.H,), bf16=4e-2, int8=0.1, fp8=0.1),
            fp32_op_types=GROUP_NORM_OP_TYPES,
        ),
        "quantizer": ComponentSpec(
            name="quantizer",
            inputs=(TensorSpec(N.H, "float32", lat),),
            outputs=(TensorSpec(N.Z_Q, "float32", lat), TensorSpec(N.INDICES, "int32", idx)),
            make_inputs=latent_inputs(N.H),
            # z_q holds codebook vectors: exact whenever the indices agree, at every precision (the
            # quantizer runs FP32 at every runtime precision too: keep_fp32).
            tolerances={p: {N.Z_Q: Tolerance(rel_l2=DEFAULT_REL_L2["fp32"]), N.INDICES: Tolerance(min_agreement=1.0)}
                        for p in RUN_PRECISIONS},
            keep_fp32=True,
        ),
        "decoder": ComponentSpec(
            name="decoder",
            inputs=(TensorSpec(N.Z_Q, "float32", lat),),
            outputs=(TensorSpec(N.IMAGE, "float32", img),),
            make_inputs=latent_inputs(N.Z_Q),
            tolerances=_tol((N.IMAGE,), bf16=7e-2, int8=0.1, fp8=0.1),
            fp32_op_types=GROUP_NORM_OP_TYPES,
        ),
    }


def _kl_specs(img: Shape, lat: Shape, idx: Shape, image_inputs: InputMaker,
              latent_inputs: Callable[[str], InputMaker]) -> dict[str, ComponentSpec]:
    """KL first stage: encoder (image -> scaled latent mean), decoder (scaled latent -> image).

    FP16: the GroupNorms stay FP32 as in the VQ model; beyond that, AutoCast keeps FP32 every node
    whose calibration values exceed data_max. Stable Diffusion's VAE decoder is the textbook case
    (activations beyond FP16's 65504 in its mid/up blocks: NaN/black images in plain FP16); the
    export manifest lists every kept node with the reason (`converter.fp32_reasons`)."""
    N = Tensors
    return {
        "encoder": ComponentSpec(
            name="encoder",
            inputs=(TensorSpec(N.IMAGE, "float32", img),),
            outputs=(TensorSpec(N.LATENT, "float32", lat),),
            make_inputs=image_inputs,
            tolerances=_tol((N.LATENT,), bf16=4e-2),
            fp32_op_types=GROUP_NORM_OP_TYPES,
        ),
        "decoder": ComponentSpec(
            name="decoder",
            inputs=(TensorSpec(N.LATENT, "float32", lat),),
            outputs=(TensorSpec(N.IMAGE, "float32", img),),
            make_inputs=latent_inputs(N.LATENT),
            tolerances=_tol((N.IMAGE,), bf16=7e-2),
            fp32_op_types=GROUP_NORM_OP_TYPES,
        ),
    }


def component_specs(config: ModelConfig, *, parts: bool = False) -> dict[str, ComponentSpec]:
    """The specs of the components of a model with this configuration, in pipeline order
    (`component_names`: they follow its first stage, and a text model adds its text encoder);
    `parts`: the denoiser's parts too (`DENOISER_PARTS`)."""
    vq, dit = config.first_stage, config.dit
    N = Tensors
    img = (BATCH, vq.in_channels, vq.image_size, vq.image_size)
    lat = (BATCH, vq.embed_dim, vq.latent_size, vq.latent_size)
    idx = (BATCH, vq.latent_size, vq.latent_size)
    out = (BATCH, dit.out_channels, dit.input_size, dit.input_size)
    num_classes = dit.num_classes

    # Dummy inputs of realistic magnitude: images in [-1, 1], latents ~ N(0, 1)
    # (a trained encoder's output scale is close to that), timesteps over the whole
    # training range, class ids including the null label used by guidance.
    def image_inputs(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {N.IMAGE: rng.uniform(-1, 1, (b, *img[1:])).astype(np.float32)}

    def latent_inputs(name: str) -> InputMaker:
        def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {name: rng.standard_normal((b, *lat[1:])).astype(np.float32)}
        return make

    condition_specs: dict[str, TensorSpec] = {N.CLASS_IDS: TensorSpec(N.CLASS_IDS, "int32", (BATCH,))}
    if dit.uses_text:
        length, width = dit.text_length, dit.text_dim
        condition_specs = {
            N.TEXT_EMBEDDINGS: TensorSpec(N.TEXT_EMBEDDINGS, "float32", (BATCH, length, width)),
            N.TEXT_MASK: TensorSpec(N.TEXT_MASK, "float32", (BATCH, length)),
            N.TEXT_POOLED: TensorSpec(N.TEXT_POOLED, "float32", (BATCH, width)),
        }
    condition_specs[N.GUIDANCE_SCALE] = TensorSpec(N.GUIDANCE_SCALE, "float32", (BATCH,))
    student = config.student
    conditions = tuple(condition_specs[n] for n in denoiser_condition_names(dit))

    def denoiser_inputs(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {
            N.X_T: rng.standard_normal((b, *lat[1:])).astype(np.float32),
            N.T: rng.uniform(0, config.diffusion.num_train_timesteps - 1, (b,)).astype(np.float32),
        }
        for tensor in conditions:
            if tensor.name == N.CLASS_IDS:
                feeds[N.CLASS_IDS] = rng.integers(0, num_classes + 1, (b,)).astype(np.int32)
            elif tensor.name == N.TEXT_MASK:
                feeds[N.TEXT_MASK] = _text_masks(b, dit.text_length, rng)
            elif tensor.name == N.GUIDANCE_SCALE and student is not None:  # the scales it was distilled for
                feeds[N.GUIDANCE_SCALE] = rng.uniform(student.guidance_min, student.guidance_max,
                                                      (b,)).astype(np.float32)
            else:  # text encoder outputs end in a LayerNorm: unit-scale values
                feeds[tensor.name] = rng.standard_normal(tensor.concrete_shape(b)).astype(np.float32)
        return feeds

    first_stage = {"vq": _vq_specs, "kl": _kl_specs}[config.first_stage_kind]
    specs = {
        **first_stage(img, lat, idx, image_inputs, latent_inputs),
        "denoiser": ComponentSpec(
            name="denoiser",
            inputs=(TensorSpec(N.X_T, "float32", lat), TensorSpec(N.T, "float32", (BATCH,)), *conditions),
            outputs=(TensorSpec(N.MODEL_OUTPUT, "float32", out),),
            make_inputs=denoiser_inputs,
            # A guidance-distilled student runs one evaluation per image: no [cond; uncond] pair.
            batch_multiplier=1 if dit.guidance_embed else GUIDANCE_BATCH_MULTIPLIER,
            # 8-bit: per-tensor activation ranges calibrated over all timesteps are coarse at some of
            # them; measured on the trained quickstart DiT (ONNX Runtime CPU, real inputs, worst batch):
            # INT8 up to 0.11 (batch 32), 0.045 (batches 1, 3). Whether that matters is what the
            # end-to-end check and `mmgen eval` measure.
            tolerances=_tol((N.MODEL_OUTPUT,), int8=0.2, fp8=0.2),
            fp32_scopes=("dit.t_embedder", "dit.g_embedder") if dit.guidance_embed else ("dit.t_embedder",),
            # No Q/DQ on the final layer (its adaLN and the projection to epsilon: an error there lands
            # in the output unattenuated) nor on the blocks' adaLN modulation (it scales every
            # activation of its block; small GEMMs at batch x width, so keeping them costs little).
            # Measured on a trained tiny DiT (benchmarks/quant_sensitivity.py, docs/design/quantization-scopes.md):
            # real-input rel. L2 INT8 3.75e-2 -> 3.16e-2, FP8 2.98e-2 -> 1.71e-2.
            quant_exclude_scopes=("dit.final_layer", r"^/dit/blocks\.\d+/adaLN_modulation/"),
            upstream="text_encoder" if dit.uses_text else None,
        ),
    }
    text = config.text
    if text is not None:
        ids = (BATCH, text.max_length)

        def text_inputs(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
            # Real-looking prompts: [BOS] words [EOS] [PAD]..., with random lengths and words.
            mask = _text_masks(b, text.max_length, rng)
            ids_ = np.where(mask > 0, rng.integers(4, text.vocab_size, mask.shape), PAD).astype(np.int32)
            lengths = mask.sum(axis=1).astype(np.int64)
            ids_[:, 0] = BOS
            ids_[np.arange(b), lengths - 1] = EOS
            return {N.INPUT_IDS: ids_}

        specs["text_encoder"] = ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec(N.INPUT_IDS, "int32", ids),),
            outputs=(TensorSpec(N.TEXT_EMBEDDINGS, "float32", (BATCH, text.max_length, text.hidden_size)),
                     TensorSpec(N.TEXT_MASK, "float32", (BATCH, text.max_length)),
                     TensorSpec(N.TEXT_POOLED, "float32", (BATCH, text.hidden_size))),
            make_inputs=text_inputs,
            # Prompts are encoded once each, plus the empty prompt: small batches.
            profile=BatchProfile(1, 4, 16),
            tolerances=_tol((N.TEXT_EMBEDDINGS, N.TEXT_MASK, N.TEXT_POOLED)),
            # FP16: the matmuls go FP16; the LayerNorms (mean/variance statistics) and the attention
            # softmax stay FP32. The softmax's logits carry the -1e4 padding bias: finite in FP16, but
            # beyond AutoCast's data_max, so whether AutoCast keeps it FP32 would depend on the
            # calibration prompts having padding; naming the op type makes it deterministic. Both are
            # 5 small nodes in a component that runs once per prompt. The pooled mean (a sum of <= L
            # unit-scale values) is safe in FP16: keeping it FP32 changed nothing measurable
            # (rel L2 5.5e-4 either way on shapes captions; weight rounding dominates).
            fp32_op_types=("LayerNormalization", "Softmax"),
            # 8-bit sets ship it FP16: it runs once per distinct prompt (not per denoising step), so
            # quantizing it wins nothing, and its outputs condition every step (FP8 on a re-randomised
            # text encoder: rel. L2 0.11 on real captions, over the 8-bit tolerance).
            quant_fallback={"int8": "fp16", "fp8": "fp16"},
        )
    if config.audio is not None:
        specs["vocoder"] = _vocoder_spec(img, config.audio.clip_samples, image_inputs)
    if parts and has_denoiser_parts(config.dit):
        specs.update(_denoiser_part_specs(config, specs["denoiser"], conditions))
        specs = {name: specs[name] for name in ALL_COMPONENTS if name in specs}
    assert tuple(specs) == component_names(config, parts=parts), "component_specs must follow ALL_COMPONENTS"
    return specs


# The vocoder against PyTorch FP32: its Griffin-Lim iterations repeat an STFT and an inverse STFT, and
# a phase is its coefficient divided by its magnitude, so rounding in quiet bins turns their phase
# freely and the iterations carry it on. Measured on ONNX Runtime CPU: 2-3e-6 on random images with 8
# iterations, 3.5e-4 on real `tones` spectrograms with the layouts' 32; the limit leaves ~6x headroom.
VOCODER_REL_L2: dict[str, float] = {"fp32": 2e-3}


def _vocoder_spec(img: Shape, samples: int, image_inputs: InputMaker) -> ComponentSpec:
    """Spectrogram image -> waveform (`models.vocoder`). It has no weights, only fixed DFT bases, and
    runs FP32 in every set: its magnitudes span the spectrogram's 80 dB, and the phase it iterates on
    is a ratio of small coefficients wherever a bin is quiet."""
    N = Tensors
    return ComponentSpec(
        name="vocoder",
        inputs=(TensorSpec(N.IMAGE, "float32", img),),
        outputs=(TensorSpec(N.AUDIO, "float32", (BATCH, samples)),),
        make_inputs=image_inputs,
        tolerances={p: {N.AUDIO: Tolerance(rel_l2=VOCODER_REL_L2["fp32"])} for p in RUN_PRECISIONS},
        keep_fp32=True,
    )


def _denoiser_part_specs(config: ModelConfig, denoiser: ComponentSpec,
                         conditions: tuple[TensorSpec, ...]) -> dict[str, ComponentSpec]:
    """Head, body and tail (see DENOISER_PARTS): the head takes the denoiser's inputs; the body and the
    tail take the head's tokens and embedding, and a cross-attention DiT's prompt tokens and mask.
    Tolerances, batch profile and what stays out of 8-bit are the whole denoiser's; the timestep
    embedding (the FP32 scope) is in the head."""
    dit, N = config.dit, Tensors
    tokens = (dit.input_size // dit.patch_size) ** 2
    hidden = TensorSpec(N.HIDDEN, "float32", (BATCH, tokens, dit.hidden_size))
    embedding = TensorSpec(N.EMBEDDING, "float32", (BATCH, dit.hidden_size))
    residual = TensorSpec(N.BODY_RESIDUAL, "float32", (BATCH, tokens, dit.hidden_size))
    context = tuple(t for t in conditions if t.name in (N.TEXT_EMBEDDINGS, N.TEXT_MASK)) \
        if dit.uses_cross_attention else ()

    def token_inputs(*names: str) -> InputMaker:
        def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
            # Unit-scale stand-ins; validation and parity feed the head's real outputs (`upstream`).
            feeds = {name: rng.standard_normal((b, tokens, dit.hidden_size)).astype(np.float32) for name in names}
            feeds[N.EMBEDDING] = rng.standard_normal((b, dit.hidden_size)).astype(np.float32)
            made = denoiser.make_inputs(b, rng)
            feeds.update({t.name: made[t.name] for t in context})
            return feeds
        return make

    split = denoiser_split(dit)

    def part(name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], make: InputMaker,
             upstream: str | None, fp32_scopes: tuple[str, ...] = ()) -> ComponentSpec:
        return ComponentSpec(name=name, inputs=inputs, outputs=outputs, make_inputs=make,
                             blocks=(split[name].start, split[name].stop), idle_spin=name == "denoiser_body",
                             batch_multiplier=denoiser.batch_multiplier,
                             tolerances={p: {t.name: limits[N.MODEL_OUTPUT] for t in outputs}
                                         for p, limits in denoiser.tolerances.items()},
                             fp32_scopes=fp32_scopes, quant_exclude_scopes=denoiser.quant_exclude_scopes,
                             upstream=upstream)

    return {
        "denoiser_head": part("denoiser_head", denoiser.inputs,
                              (hidden, embedding, TensorSpec(N.MODULATED_INPUT, "float32", hidden.shape)),
                              denoiser.make_inputs,
                              denoiser.upstream, denoiser.fp32_scopes),
        "denoiser_body": part("denoiser_body", (hidden, embedding, *context), (residual,),
                              token_inputs(N.HIDDEN), "denoiser_head"),
        "denoiser_tail": part("denoiser_tail", (hidden, residual, embedding, *context),
                              (TensorSpec(N.MODEL_OUTPUT, "float32", denoiser.outputs[0].shape),),
                              token_inputs(N.HIDDEN, N.BODY_RESIDUAL), "denoiser_head"),
    }
