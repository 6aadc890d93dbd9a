"""Typed, validated model configurations and presets.

Every config is a frozen dataclass that round-trips through JSON (`to_dict` /
`from_dict`); `validate()` raises `ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import ConfigError

T = TypeVar("T", bound="_JsonConfig")


# What a config.json value must be, by the field's declared type: (test, how messages say it).
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _JsonConfig:
    # How config.json files and messages name this section ("dit", "text", ...).
    SECTION = ""
    # Upper bounds of the size fields: far above any real model of this kind, low enough that
    # nothing built from a config within them can exhaust the memory before its weights are checked.
    _MAX: ClassVar[dict[str, float]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.SECTION} must be a JSON object, got {_shown(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.SECTION}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kwargs[name] = cls._typed(name, str(fields[name].type), value)
        try:
            obj = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None
        obj.validate()  # type: ignore[attr-defined]
        return obj

    @classmethod
    def _typed(cls, name: str, annotation: str, value: Any) -> Any:
        """`value` checked against the field's declared type (JSON lists become the declared tuples)."""
        where = f"{cls.SECTION}.{name}"
        if annotation.startswith("tuple[") and annotation.endswith(", ...]"):
            test, kind = _FIELD_TYPES[annotation[len("tuple["):-len(", ...]")]]
            if not isinstance(value, list | tuple) or not all(test(item) for item in value):
                raise ConfigError(f"{where} must be a list of {kind.removeprefix('an ').removeprefix('a ')}s, "
                                  f"got {_shown(value)}", "fix the value in the config file")
            return tuple(value)
        optional = annotation.endswith(" | None")
        if optional and value is None:
            return value
        check = _FIELD_TYPES.get(annotation.removesuffix(" | None"))
        if check is not None and not check[0](value):
            raise ConfigError(f"{where} must be {check[1]}, got {_shown(value)} ({type(value).__name__})",
                              "fix the value in the config file")
        return value

    def _check_bounds(self) -> None:
        for name, limit in self._MAX.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            _require(all(v <= limit for v in values),
                     f"{self.SECTION}.{name} {_shown(value)} is larger than any model this tool runs "
                     f"(at most {limit:g})")

    def replace(self: T, **changes: Any) -> T:
        obj = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        obj.validate()  # type: ignore[attr-defined]
        return obj


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


class _FirstStageTrunk:
    """What a VQ model and a KL autoencoder share: the taming / LDM encoder-decoder trunk. Its
    subclasses are dataclasses with `kind`, `image_size`, `channel_mult` and the positive-integer
    fields `_POSITIVE`."""

    kind: str
    image_size: int
    channel_mult: tuple[int, ...]
    _POSITIVE: tuple[str, ...] = ("in_channels", "base_channels", "num_res_blocks", "z_channels", "embed_dim",
                                  "norm_groups")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    def _validate_trunk(self) -> None:
        self._check_bounds()  # type: ignore[attr-defined]
        _require(len(self.channel_mult) in range(1, 9), f"{self.kind}.channel_mult must have 1 to 8 levels")
        _require(all(m > 0 for m in self.channel_mult), f"{self.kind}.channel_mult entries must be positive")
        _require(self.image_size > 0 and self.image_size % self.downsample_factor == 0,
                 f"{self.kind}.image_size {self.image_size} must be divisible by the downsampling factor "
                 f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))")
        for name in self._POSITIVE:
            _require(getattr(self, name) > 0, f"{self.kind}.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class VQConfig(_FirstStageTrunk, _JsonConfig):
    """taming/LDM-style VQ autoencoder."""

    kind = "vq"  # class attribute (not a field): which first stage this configures
    SECTION = "vq"
    _MAX: ClassVar[dict[str, float]] = {
        "image_size": 16384, "in_channels": 64, "base_channels": 4096, "channel_mult": 64,
        "num_res_blocks": 64, "z_channels": 1024, "embed_dim": 1024, "n_embed": 1 << 20, "norm_groups": 4096}

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 256
    norm_groups: int = 32
    dropout: float = 0.0
    beta: float = 0.25
    use_ema: bool = True
    ema_decay: float = 0.99

    _POSITIVE = (*_FirstStageTrunk._POSITIVE, "n_embed")

    def validate(self) -> None:
        self._validate_trunk()
        _require(0.0 < self.ema_decay < 1.0, "vq.ema_decay must be in (0, 1)")
        _require(self.beta >= 0, "vq.beta must be >= 0")


@dataclass(frozen=True)
class KLConfig(_FirstStageTrunk, _JsonConfig):
    """LDM / diffusers `AutoencoderKL`: the VQ model's encoder and decoder, continuous latents.

    The encoder outputs mean and log-variance (2 x z_channels, `quant_conv` maps them to 2 x
    embed_dim); the DiT works on `(mean - shift_factor) * scaling_factor` (Stable Diffusion's VAE:
    0.18215, no shift) and the decoder undoes the scaling first. There is no quantizer.
    """

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True

    kind = "kl"  # class attribute (not a field): which first stage this configures
    SECTION = "kl"
    _MAX: ClassVar[dict[str, float]] = {
        "image_size": 16384, "in_channels": 64, "base_channels": 4096, "channel_mult": 64,
        "num_res_blocks": 64, "z_channels": 1024, "embed_dim": 1024, "norm_groups": 4096}

    def validate(self) -> None:
        self._validate_trunk()
        _require(self.scaling_factor > 0, f"kl.scaling_factor must be positive, got {self.scaling_factor}")
        if not self.use_quant_conv or not self.use_post_quant_conv:
            _require(self.embed_dim == self.z_channels,
                     "kl.embed_dim must equal kl.z_channels without quant_conv / post_quant_conv")


FirstStageConfig = VQConfig | KLConfig
# The first-stage kinds, by the name run.json and the specs use for them.
FIRST_STAGE_KINDS = ("vq", "kl")


@dataclass(frozen=True)
class DiTConfig(_JsonConfig):
    """facebookresearch/DiT, with flags for the diffusers numerical variant."""

    SECTION = "dit"
    _MAX: ClassVar[dict[str, float]] = {
        "input_size": 1024, "in_channels": 1024, "patch_size": 64, "hidden_size": 16384, "depth": 512,
        "num_heads": 1024, "mlp_ratio": 16.0, "num_classes": 1 << 20, "text_dim": 16384,
        "text_length": 4096}

    input_size: int = 8
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 18
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    # diffusers variant: timestep frequencies exp(-ln(1e4) i / (half - shift)) with shift 1,
    # and the LayerNorm before the MLP with eps 1e-5. Official DiT: shift 0, eps 1e-6.
    timestep_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    # What the DiT is conditioned on: "class" (a label table, as in the paper), or text
    # from the text encoder: "pooled" (the pooled prompt embedding added to the adaLN
    # conditioning), "cross_attention" (every block attends to the prompt's token
    # embeddings, as in PixArt-alpha) or "pooled+cross_attention" (both).
    conditioning: str = "class"
    text_dim: int = 0  # width of the text encoder's embeddings (text conditioning only)
    text_length: int = 0  # tokens per prompt (text conditioning only)
    # A guidance-distilled student takes the guidance scale as an input (its embedding is added to
    # the timestep embedding, as in Meng et al.), so one evaluation replaces the [cond; uncond] pair.
    guidance_embed: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.guidance_embed:  # only students carry the flag: a teacher's config file stays as it was
            del data["guidance_embed"]
        return data

    @property
    def uses_text(self) -> bool:
        return self.conditioning != "class"

    @property
    def uses_pooled_text(self) -> bool:
        return self.conditioning in ("pooled", "pooled+cross_attention")

    @property
    def uses_cross_attention(self) -> bool:
        return self.conditioning in ("cross_attention", "pooled+cross_attention")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        self._check_bounds()
        _require(self.num_heads > 0 and self.mlp_ratio > 0, "dit.num_heads and dit.mlp_ratio must be positive")
        _require(self.patch_size > 0 and self.input_size % self.patch_size == 0,
                 f"dit.input_size {self.input_size} (the latent size) must be divisible by "
                 f"dit.patch_size {self.patch_size}")
        grid = self.input_size // self.patch_size
        _require(grid > 0, "dit.input_size must be >= patch_size")
        _require(self.hidden_size % self.num_heads == 0,
                 f"dit.hidden_size {self.hidden_size} must be divisible by dit.num_heads {self.num_heads}")
        # The fixed 2-D sin-cos table splits the width in four.
        _require(self.hidden_size % 4 == 0, "dit.hidden_size must be divisible by 4")
        _require(self.depth > 0 and self.num_classes > 0, "dit.depth and dit.num_classes must be positive")
        _require(0.0 <= self.class_dropout_prob < 1.0, "dit.class_dropout_prob must be in [0, 1)")
        _require(self.conditioning in DIT_CONDITIONINGS,
                 f"dit.conditioning {self.conditioning!r} is not one of {', '.join(DIT_CONDITIONINGS)}")
        if self.uses_text:
            _require(self.text_dim > 0 and self.text_length > 0,
                     "text conditioning needs dit.text_dim and dit.text_length > 0")


DIT_CONDITIONINGS = ("class", "pooled", "cross_attention", "pooled+cross_attention")


@dataclass(frozen=True)
class TextConfig(_JsonConfig):
    """A small transformer text encoder over a word-level tokenizer (see mmgen_deploy.text)."""

    SECTION = "text"
    _MAX: ClassVar[dict[str, float]] = {
        "vocab_size": 1 << 20, "max_length": 4096, "hidden_size": 16384, "depth": 512, "num_heads": 1024,
        "mlp_ratio": 16.0}

    vocab_size: int = 64
    max_length: int = 16  # tokens per prompt, [BOS] and [EOS] included; longer prompts are truncated
    hidden_size: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    caption_dropout_prob: float = 0.1  # training: replace the caption by "" (the unconditional prompt)

    def validate(self) -> None:
        self._check_bounds()
        _require(self.num_heads > 0 and self.mlp_ratio > 0, "text.num_heads and text.mlp_ratio must be positive")
        _require(self.vocab_size >= 5, "text.vocab_size must be >= 5 (4 special tokens and a word)")
        _require(self.max_length >= 3, "text.max_length must be >= 3 ([BOS], a word, [EOS])")
        _require(self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
                 f"text.hidden_size {self.hidden_size} must be divisible by text.num_heads {self.num_heads}")
        _require(self.depth >= 1, "text.depth must be >= 1")
        _require(0.0 <= self.caption_dropout_prob < 1.0, "text.caption_dropout_prob must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig(_JsonConfig):
    """Training noise schedule (DiT: 1000 linear betas 1e-4..0.02, epsilon prediction)."""

    SECTION = "diffusion"
    _MAX: ClassVar[dict[str, float]] = {
        "num_train_timesteps": 100_000}

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    # How samplers pick their timesteps and step between them. "respaced" is DiT's convention
    # (t_i = round(i (T-1)/(N-1)), each step goes to the next visited timestep, the last to the
    # clean sample). "linspace" / "leading" / "trailing" follow the diffusers scheduler that an
    # imported pipeline came with, with its `steps_offset`, `set_alpha_to_one` (DDIM),
    # `final_sigmas_type` (DPM-Solver++), `clip_sample` and `variance_type` (DDPM). See
    # `mmgen_deploy.sampling.schedulers.sampler_schedule`.
    timestep_spacing: str = "respaced"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    final_sigmas_type: str = "zero"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # DDPM: "learned_range" uses a learned-sigma DiT's variance channels (as DiT samples);
    # "fixed_small" (diffusers' DDPMScheduler default) / "fixed_large" ignore them.
    variance_type: str = "learned_range"

    def validate(self) -> None:
        self._check_bounds()
        _require(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps must be >= 2")
        _require(0 < self.beta_start < self.beta_end < 1, "need 0 < beta_start < beta_end < 1")
        _require(self.beta_schedule in BETA_SCHEDULES, f"unsupported beta_schedule {self.beta_schedule!r} "
                                                       f"(supported: {', '.join(BETA_SCHEDULES)})")
        _require(self.prediction_type in ("epsilon",),
                 f"unsupported prediction_type {self.prediction_type!r}")
        _require(self.timestep_spacing in TIMESTEP_SPACINGS,
                 f"unsupported timestep_spacing {self.timestep_spacing!r} (supported: {', '.join(TIMESTEP_SPACINGS)})")
        _require(0 <= self.steps_offset < self.num_train_timesteps,
                 f"diffusion.steps_offset must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")
        _require(self.final_sigmas_type in ("zero", "sigma_min"),
                 f"unsupported final_sigmas_type {self.final_sigmas_type!r} (supported: zero, sigma_min)")
        _require(self.clip_sample_range > 0, "diffusion.clip_sample_range must be positive")
        _require(self.variance_type in VARIANCE_TYPES,
                 f"unsupported variance_type {self.variance_type!r} (supported: {', '.join(VARIANCE_TYPES)})")


BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("respaced", "linspace", "leading", "trailing")
VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


@dataclass(frozen=True)
class AudioConfig(_JsonConfig):
    """How an audio run's clips become the one-channel images its first stage and DiT work on, and
    how the vocoder turns them back into sound (`data.spectrogram`, `models.vocoder`).

    A clip of `clip_samples` at `sample_rate` -> STFT (periodic Hann window of `n_fft`, every `hop`
    samples) -> magnitudes resampled to `image_size` bands from 0 to `f_max` Hz (`freq_scale`:
    "linear" or "mel") x `image_size` columns -> dB in [-`db_range`, 0] mapped to [-1, 1]. The
    vocoder inverts the resampling and runs `griffin_lim_iters` iterations of fast Griffin-Lim
    (momentum `griffin_lim_momentum`) from a fixed random phase (`phase_seed`)."""

    SECTION = "audio"
    _MAX: ClassVar[dict[str, float]] = {
        "sample_rate": 384_000, "clip_samples": 1 << 22, "image_size": 4096, "n_fft": 16384, "hop": 16384,
        "griffin_lim_iters": 4096}

    sample_rate: int = 16000
    clip_samples: int = 16000
    image_size: int = 64
    n_fft: int = 400
    hop: int = 100
    freq_scale: str = "linear"
    f_max: float = 2560.0
    db_range: float = 80.0
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99
    phase_seed: int = 0

    def validate(self) -> None:
        self._check_bounds()
        for name in ("sample_rate", "clip_samples", "image_size", "n_fft", "hop", "griffin_lim_iters"):
            _require(getattr(self, name) > 0, f"audio.{name} must be positive, got {getattr(self, name)}")
        _require(self.image_size >= 2, "audio.image_size must be >= 2")
        _require(self.freq_scale in AUDIO_FREQ_SCALES,
                 f"audio.freq_scale {self.freq_scale!r} is not one of {', '.join(AUDIO_FREQ_SCALES)}")
        _require(0 < self.f_max <= self.sample_rate / 2,
                 f"audio.f_max {self.f_max} must be in (0, sample_rate / 2 = {self.sample_rate / 2:g}]")
        _require(self.hop <= self.n_fft, "audio.hop must be at most audio.n_fft (frames must overlap or touch)")
        _require(self.db_range > 0, "audio.db_range must be positive")
        _require(0.0 <= self.griffin_lim_momentum < 1.0, "audio.griffin_lim_momentum must be in [0, 1)")

    @property
    def seconds(self) -> float:
        return self.clip_samples / self.sample_rate


AUDIO_FREQ_SCALES = ("linear", "mel")


# The sampler a distilled student steps with: deterministic DDIM, whose steps are linear in the predicted
# noise (what `training.distill` solves its targets with).
DISTILLED_SAMPLER = "ddim"


@dataclass(frozen=True)
class StudentConfig(_JsonConfig):
    """What a distilled student was trained for (`mmgen distill`): its own few-step schedule and the
    guidance scales its guidance input covers. Sampling refuses anything else."""

    SECTION = "student"

    method: str = "trajectory"
    steps: int = 4
    # The timesteps the student visits, largest first; its last step lands on the clean sample.
    timesteps: tuple[int, ...] = (999, 749, 500, 250)
    sampler: str = DISTILLED_SAMPLER
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    default_cfg_scale: float = SAMPLING.cfg_scale
    teacher_steps: int = 48  # the teacher's DDIM steps whose end points the student learned

    def validate(self) -> None:
        _require(self.steps == len(self.timesteps) and self.steps >= 1,
                 f"student.steps {self.steps} does not match its {len(self.timesteps)} timesteps")
        _require(all(a > b for a, b in zip(self.timesteps, self.timesteps[1:], strict=False)),
                 "student.timesteps must be strictly decreasing")
        _require(0 <= self.guidance_min <= self.default_cfg_scale <= self.guidance_max,
                 "student guidance range must hold its default scale")

    def accepts_cfg_scale(self, cfg_scale: float) -> bool:
        return self.guidance_min - 1e-9 <= cfg_scale <= self.guidance_max + 1e-9


@dataclass(frozen=True)
class ModelConfig(_JsonConfig):
    """The whole latent model: first stage (VQ or KL autoencoder) + DiT + noise schedule + label
    names, and the text encoder when the DiT is conditioned on text.

    `first_stage` is the autoencoder of either kind (`first_stage_kind`). As a dict (`to_dict`, the
    Triton repository's metadata, `mmgen import --json`) its settings sit under the key "vq" and its
    kind under "first_stage", the form every reader of these dicts knows; `from_dict` also accepts
    the settings under "first_stage" with their kind in "first_stage_kind"."""

    first_stage: FirstStageConfig = field(default_factory=VQConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    class_names: tuple[str, ...] = ()
    text: TextConfig | None = None
    student: StudentConfig | None = None  # set on runs made by `mmgen distill`
    # Set on audio runs: the first stage and the DiT work on spectrogram images, a vocoder makes sound.
    audio: AudioConfig | None = None

    @property
    def uses_text(self) -> bool:
        return self.dit.uses_text

    @property
    def modality(self) -> str:
        """"audio" (spectrogram images, a vocoder after the decoder) or "image": the one place that says
        which a run is."""
        return "audio" if self.audio is not None else "image"

    @property
    def first_stage_kind(self) -> str:
        """"vq" (encoder, quantizer, decoder) or "kl" (encoder, decoder): what the specs build on."""
        return self.first_stage.kind

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        settings = data.pop("first_stage")
        if data["student"] is None:  # only distilled runs carry the section: teachers' dicts stay as they were
            del data["student"]
        if data["audio"] is None:  # only audio runs carry the section
            del data["audio"]
        return {"vq": settings, **data, "first_stage": self.first_stage_kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - {"vq", "dit", "diffusion", "class_names", "text", "first_stage",
                                      "first_stage_kind", "student", "audio"})
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
        if isinstance(data.get("first_stage"), dict):  # settings under "first_stage", kind beside them
            kind, settings = data.get("first_stage_kind", "vq"), data["first_stage"]
        else:  # the form `to_dict` writes
            kind, settings = data.get("first_stage", "vq"), data.get("vq", {})
        if kind not in FIRST_STAGE_KINDS:
            raise ConfigError(f"ModelConfig: first_stage {kind!r} is not one of {', '.join(FIRST_STAGE_KINDS)}")
        stage_cls: type[VQConfig] | type[KLConfig] = KLConfig if kind == "kl" else VQConfig
        obj = cls(
            first_stage=stage_cls.from_dict(settings),
            dit=DiTConfig.from_dict(data.get("dit", {})),
            diffusion=DiffusionConfig.from_dict(data.get("diffusion", {})),
            class_names=tuple(data.get("class_names", ())),
            text=TextConfig.from_dict(data["text"]) if data.get("text") is not None else None,
            student=StudentConfig.from_dict(data["student"]) if data.get("student") is not None else None,
            audio=AudioConfig.from_dict(data["audio"]) if data.get("audio") is not None else None,
        )
        obj.validate()
        return obj

    def validate(self) -> None:
        self.first_stage.validate()
        self.dit.validate()
        self.diffusion.validate()
        _require((self.student is not None) == self.dit.guidance_embed,
                 "dit.guidance_embed and the student section go together (a distilled student has both)")
        if self.student is not None:
            self.student.validate()
        if self.audio is not None:
            self.audio.validate()
            _require(self.first_stage.image_size == self.audio.image_size and self.first_stage.in_channels == 1,
                     f"an audio run's first stage takes one-channel {self.audio.image_size}x{self.audio.image_size} "
                     f"spectrograms (audio.image_size), not {self.first_stage.in_channels}-channel "
                     f"{self.first_stage.image_size}x{self.first_stage.image_size} images")
        if self.dit.uses_text:
            _require(self.text is not None,
                     f"dit.conditioning {self.dit.conditioning!r} needs a text encoder configuration")
            assert self.text is not None
            self.text.validate()
            _require(self.dit.text_dim == self.text.hidden_size,
                     f"dit.text_dim {self.dit.text_dim} must equal text.hidden_size {self.text.hidden_size}")
            _require(self.dit.text_length == self.text.max_length,
                     f"dit.text_length {self.dit.text_length} must equal text.max_length {self.text.max_length}")
        else:
            _require(self.text is None, "a text encoder configuration needs a text-conditioned DiT "
                                        "(dit.conditioning other than 'class')")
        stage = self.first_stage_kind
        _require(self.dit.input_size == self.first_stage.latent_size,
                 f"dit.input_size {self.dit.input_size} must equal the {stage.upper()} latent size "
                 f"{self.first_stage.latent_size} (image_size / downsampling factor)")
        _require(self.dit.in_channels == self.first_stage.embed_dim,
                 f"dit.in_channels {self.dit.in_channels} must equal {stage}.embed_dim "
                 f"{self.first_stage.embed_dim}")
        _require(all(isinstance(name, str) for name in self.class_names), "class_names must be a list of strings")
        if self.class_names:
            _require(len(self.class_names) == self.dit.num_classes,
                     f"{len(self.class_names)} class names for dit.num_classes={self.dit.num_classes}")


# DiT widths from the paper (mlp ratio 4): name -> (depth, hidden, heads).
_DIT_SIZES = {"tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
              "XL": (28, 1152, 16)}


def with_text(config: ModelConfig, *, conditioning: str = "pooled+cross_attention", vocab_size: int = 64,
              max_length: int = 16, hidden_size: int | None = None) -> ModelConfig:
    """`config` turned into a text-to-image model: a text encoder as wide as the DiT
    (unless `hidden_size` says otherwise) and a DiT conditioned on its output."""
    width = hidden_size or min(config.dit.hidden_size, 256)
    heads = next(h for h in (4, 2, 1) if width % h == 0)
    text = TextConfig(vocab_size=vocab_size, max_length=max_length, hidden_size=width, num_heads=heads)
    dit = config.dit.replace(conditioning=conditioning, text_dim=width, text_length=max_length)
    out = ModelConfig(first_stage=config.first_stage, dit=dit, diffusion=config.diffusion,
                      class_names=config.class_names, text=text, audio=config.audio)
    out.validate()
    return out


def preset(name: str, *, image_size: int = 32, num_classes: int = 18) -> ModelConfig:
    """Named model presets: `tiny` (trains on 2 CPU cores in minutes), `S/2`, `B/2`, ...

    The VQ part is the same small f4 autoencoder for all presets unless the image is
    large; the DiT part follows the paper's sizes. `with_text` turns any of them into a
    text-conditioned model.
    """
    if name == "tiny":
        depth, hidden, heads = _DIT_SIZES["tiny"]
        patch = 2
    else:
        size, _, patch_text = name.partition("/")
        if size not in _DIT_SIZES or patch_text not in ("2", "4", "8"):
            valid = ", ".join(preset_names())
            raise ConfigError(f"unknown preset {name!r}; valid presets: {valid}")
        depth, hidden, heads = _DIT_SIZES[size]
        patch = int(patch_text)
    # f4 for small images, f8 from 128 px up (LDM's VQ-f4/f8 choice).
    mult = (1, 2, 2) if image_size < 128 else (1, 2, 2, 4)
    if name == "tiny":
        # Sized so that `mmgen quickstart` trains to >= 26 dB PSNR on `shapes` in ~2.5 CPU minutes.
        vq = VQConfig(image_size=image_size, channel_mult=mult, base_channels=16, norm_groups=8)
    else:
        vq = VQConfig(image_size=image_size, channel_mult=mult, base_channels=64)
    dit = DiTConfig(input_size=vq.latent_size, in_channels=vq.embed_dim, patch_size=patch,
                    hidden_size=hidden, depth=depth, num_heads=heads, num_classes=num_classes)
    cfg = ModelConfig(first_stage=vq, dit=dit)
    cfg.validate()
    return cfg


# The image side of new runs: pictures, and the spectrograms of audio data.
DEFAULT_IMAGE_SIZE = 32
DEFAULT_SPECTROGRAM_SIZE = 32
# The spectrogram layout of audio runs, by the image side (measured: docs/design/audio-first-stage.md).
_AUDIO_LAYOUTS = {
    64: AudioConfig(image_size=64, n_fft=400, hop=100, freq_scale="linear", f_max=2520.0),
    32: AudioConfig(image_size=32, n_fft=400, hop=100, freq_scale="mel", f_max=4000.0),
}


def audio_layout(image_size: int) -> AudioConfig:
    """The spectrogram transform for `image_size` x `image_size` images."""
    if image_size not in _AUDIO_LAYOUTS:
        raise ConfigError(f"no spectrogram layout for {image_size}x{image_size} images",
                          f"use an image size of {' or '.join(str(k) for k in sorted(_AUDIO_LAYOUTS))} for audio")
    return _AUDIO_LAYOUTS[image_size]


def with_audio(config: ModelConfig, audio: AudioConfig) -> ModelConfig:
    """`config` turned into an audio model: its first stage takes one-channel `audio.image_size`
    spectrograms, its DiT the latents of those, and a vocoder follows the decoder."""
    stage = config.first_stage.replace(image_size=audio.image_size, in_channels=1)
    dit = config.dit.replace(input_size=stage.latent_size)
    out = ModelConfig(first_stage=stage, dit=dit, diffusion=config.diffusion, class_names=config.class_names,
                      text=config.text, student=config.student, audio=audio)
    out.validate()
    return out


def preset_names() -> list[str]:
    return ["tiny"] + [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
