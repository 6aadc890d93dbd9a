"""`tones`: a procedural, download-free audio dataset of one synthesised tone per clip.

Every clip is 1 s of mono audio at 16 kHz holding one tone: a sine, square or sawtooth wave whose
fundamental rises, falls or holds steady between 200 and 800 Hz, under a random attack/decay
envelope, with a little noise. The class is waveform x contour (9 classes, e.g. ``square rising``)
and the caption adds the loudness and, for a glide, its speed (``a loud square tone rising
quickly``). The square and sawtooth are built from their harmonics below the Nyquist frequency
(additive synthesis), so no harmonic folds back into the band as a tone that is not a harmonic.
Generation is a pure function of (seed, index range, split), so a run directory only has to store
the description to regenerate its validation clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmgen_deploy.data.dataset import AudioData

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)

WAVEFORMS: tuple[str, ...] = ("sine", "square", "sawtooth")
CONTOURS: tuple[str, ...] = ("rising", "falling", "steady")
CLASS_NAMES: tuple[str, ...] = tuple(f"{w} {c}" for w in WAVEFORMS for c in CONTOURS)

F0_MIN, F0_MAX = 200.0, 800.0
# A glide covers at least half an octave over the clip, at most (F0_MAX / F0_MIN = 2 octaves) this.
GLIDE_OCTAVES = (0.5, 1.5)
# Glides of at least this many octaves per second are captioned `quickly`.
QUICK_OCTAVES = 1.0
# A steady tone drifts by at most this fraction over the clip (half of the 2 % it may vary).
STEADY_DRIFT = 0.01
# Peak amplitude of the tone (full scale 1.0); `loud` from LOUD_PEAK up.
PEAK_RANGE = (0.3, 0.9)
LOUD_PEAK = 0.6
ATTACK_SECONDS = (0.005, 0.1)
DECAY_SECONDS = (0.05, 0.3)
# White noise, as a fraction of the tone's peak amplitude (about 40 dB below a full tone).
NOISE_FRACTION = 0.01
# Harmonics are added up to this fraction of the Nyquist frequency (a soft roll-off above it
# would need a filter; stopping short keeps every partial exactly harmonic).
_BAND_LIMIT = 0.95
# Validation clips come from a different random stream than training clips.
_VALIDATION_STREAM = 1_000_003


def class_id(waveform: str, contour: str) -> int:
    return WAVEFORMS.index(waveform) * len(CONTOURS) + CONTOURS.index(contour)


def class_parts(class_index: int) -> tuple[str, str]:
    """Class id -> (waveform, contour)."""
    return WAVEFORMS[class_index // len(CONTOURS)], CONTOURS[class_index % len(CONTOURS)]


@dataclass(frozen=True)
class ToneSpec:
    """One clip's settings: the tone (waveform, f0 at the start, octaves per second) and its shape in
    time (peak amplitude, attack and decay)."""

    waveform: str
    contour: str
    f0_start: float
    octaves_per_second: float
    peak: float
    attack: float
    decay: float

    @property
    def label(self) -> int:
        return class_id(self.waveform, self.contour)

    @property
    def caption(self) -> str:
        loudness = "loud" if self.peak >= LOUD_PEAK else "soft"
        if self.contour == "steady":
            return f"a {loudness} {self.waveform} tone holding steady"
        speed = "quickly" if abs(self.octaves_per_second) >= QUICK_OCTAVES else "slowly"
        return f"a {loudness} {self.waveform} tone {self.contour} {speed}"

    def f0(self, times: np.ndarray) -> np.ndarray:
        """The fundamental (Hz) at `times` (seconds)."""
        return self.f0_start * np.exp2(self.octaves_per_second * times)


def sample_specs(count: int, rng: np.random.Generator) -> list[ToneSpec]:
    """`count` random clip settings, classes uniform."""
    classes = rng.integers(0, len(CLASS_NAMES), size=count)
    glide = rng.uniform(*GLIDE_OCTAVES, size=count)
    drift = rng.uniform(-STEADY_DRIFT, STEADY_DRIFT, size=count)
    start_fraction = rng.uniform(0.0, 1.0, size=count)
    peaks = rng.uniform(*PEAK_RANGE, size=count)
    attacks = rng.uniform(*ATTACK_SECONDS, size=count)
    decays = rng.uniform(*DECAY_SECONDS, size=count)
    specs = []
    for k in range(count):
        waveform, contour = class_parts(int(classes[k]))
        octaves = {"rising": glide[k], "falling": -glide[k], "steady": float(np.log2(1.0 + drift[k]))}[contour]
        # The start is drawn so that the whole glide stays within [F0_MIN, F0_MAX].
        low = F0_MIN * 2.0 ** max(0.0, -octaves * CLIP_SECONDS)
        high = F0_MAX / 2.0 ** max(0.0, octaves * CLIP_SECONDS)
        start = float(np.exp(np.log(low) + start_fraction[k] * (np.log(high) - np.log(low))))
        specs.append(ToneSpec(waveform, contour, start, float(octaves), float(peaks[k]), float(attacks[k]),
                              float(decays[k])))
    return specs


def envelope(spec: ToneSpec, num_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """Linear attack from silence, hold, then a linear decay to silence at the clip's end."""
    times = np.arange(num_samples, dtype=np.float64) / SAMPLE_RATE
    end = num_samples / SAMPLE_RATE
    rise = np.clip(times / spec.attack, 0.0, 1.0)
    fall = np.clip((end - times) / spec.decay, 0.0, 1.0)
    return rise * fall


def render(spec: ToneSpec, num_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """The noiseless tone of `spec` as float32 in [-1, 1]: band-limited additive synthesis."""
    times = np.arange(num_samples, dtype=np.float64) / SAMPLE_RATE
    f0 = spec.f0(times)
    phase = 2.0 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    nyquist = _BAND_LIMIT * SAMPLE_RATE / 2
    if spec.waveform == "sine":
        wave = np.sin(phase)
    else:
        # sin(k x) by the recurrence sin((k+1) x) = 2 cos(x) sin(k x) - sin((k-1) x): one multiply-add
        # per harmonic instead of a sine.
        step = 2 if spec.waveform == "square" else 1
        wave = np.zeros(num_samples, dtype=np.float64)
        twice_cos = 2.0 * np.cos(phase)
        previous, current = np.zeros(num_samples), np.sin(phase)
        for harmonic in range(1, int(nyquist // F0_MIN) + 1):
            if harmonic % step == 1 % step:
                audible = harmonic * f0 < nyquist
                if not audible.any():
                    break
                wave += current * audible / harmonic
            previous, current = current, twice_cos * current - previous
        wave /= np.abs(wave).max()
    return (wave * envelope(spec, num_samples) * spec.peak).astype(np.float32)


def make_tones(count: int, *, seed: int = 0, split: str = "train") -> AudioData:
    """`count` clips of the `split` ("train" or "val") stream for `seed`; deterministic."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng([seed, _VALIDATION_STREAM if split == "val" else 0])
    specs = sample_specs(count, rng)
    noise = rng.standard_normal((count, CLIP_SAMPLES)).astype(np.float32) * NOISE_FRACTION
    clips = np.zeros((count, CLIP_SAMPLES), dtype=np.float32)
    for k, spec in enumerate(specs):
        clips[k] = render(spec) + noise[k] * spec.peak
    return AudioData(
        clips=np.clip(clips, -1.0, 1.0),
        labels=np.asarray([s.label for s in specs], dtype=np.int64),
        captions=[s.caption for s in specs],
        class_names=CLASS_NAMES,
        sample_rate=SAMPLE_RATE,
    )
