"""A judge for `tones` clips that reads the waveform only (no model involved).

The clip is cut into frames; frames quieter than a fraction of the loudest one (the attack and decay
tails, silence) are left out.

Contour: each frame's fundamental comes from its normalised autocorrelation: among the lags of
periods from 150 to 1000 Hz, the shortest local maximum within `_OCTAVE_MARGIN` of the highest one
(a tone is as similar to itself two periods later as one period later: the shortest such lag is the
period), refined by a parabola through the peak. A straight line fitted to log2(f0) over time
(Theil-Sen: the median of the pairwise slopes, so a few octave errors do not tilt it) gives
octaves per second; glides cover at least half an octave per second and steady tones drift by at
most 2 % over the clip, so the split sits at `_GLIDE_SPLIT` octaves per second.

Waveform: in each frame's spectrum, the energy in a band around each harmonic k x f0 (k = 1..5,
half-width `_BAND` x f0, wide enough to hold a harmonic smeared by the glide within the frame) is
compared with the fundamental's. A sine has no harmonics; a square only odd ones (1/k amplitudes:
the third at 1/9 of the fundamental's energy); a sawtooth all of them (the second at 1/4). The
medians over the frames decide: even harmonics present -> sawtooth, else odd ones present ->
square, else sine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 1024
HOP = 512
_FFT = 4096
_F0_RANGE = (150.0, 1000.0)
# Frames quieter (RMS) than this fraction of the loudest frame are not judged.
_VOICED_FRACTION = 0.3
# Autocorrelation peaks this close to the highest one count as candidates for the period.
_OCTAVE_MARGIN = 0.85
_GLIDE_SPLIT = 0.25  # octaves per second
_BAND = 0.35  # half-width of a harmonic's band, in units of f0
_HARMONICS = 5
# Energy ratios to the fundamental's: an ideal sawtooth has 0.25 at the second harmonic, an ideal
# square 0.11 at the third; noise and reconstruction artefacts stay below these splits.
_EVEN_SPLIT = 0.03
_ODD_SPLIT = 0.02


@dataclass(frozen=True)
class ToneVerdict:
    waveform: str | None
    contour: str | None
    octaves_per_second: float | None = None
    even_ratio: float | None = None  # energy of harmonics 2 and 4 over the fundamental's (median)
    odd_ratio: float | None = None  # energy of harmonics 3 and 5 over the fundamental's (median)

    def matches(self, waveform: str, contour: str) -> bool:
        return self.waveform == waveform and self.contour == contour


def _frames(clip: np.ndarray) -> np.ndarray:
    count = max(0, 1 + (len(clip) - FRAME) // HOP)
    if count == 0:
        return np.zeros((0, FRAME))
    index = np.arange(FRAME)[None, :] + HOP * np.arange(count)[:, None]
    return clip[index].astype(np.float64)


def frame_f0(frames: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames,) fundamental in Hz by autocorrelation (NaN where no period is found)."""
    centred = frames - frames.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * FRAME, axis=1)
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :FRAME]
    # Unbiased and normalised: lag tau sums FRAME - tau products.
    autocorr = autocorr / (FRAME - np.arange(FRAME))[None, :]
    autocorr = autocorr / np.maximum(autocorr[:, :1], 1e-12)
    low = int(np.floor(sample_rate / _F0_RANGE[1]))
    high = int(np.ceil(sample_rate / _F0_RANGE[0]))
    f0 = np.full(len(frames), np.nan)
    for k, row in enumerate(autocorr):
        window = row[low - 1:high + 2]
        peaks = np.flatnonzero((window[1:-1] > window[:-2]) & (window[1:-1] >= window[2:])) + 1
        if len(peaks) == 0:
            continue
        best = window[peaks].max()
        if best <= 0.3:
            continue
        lag_index = int(peaks[np.flatnonzero(window[peaks] >= _OCTAVE_MARGIN * best)[0]])
        a, b, c = window[lag_index - 1], window[lag_index], window[lag_index + 1]
        denominator = a - 2 * b + c
        shift = 0.5 * (a - c) / denominator if denominator < 0 else 0.0
        f0[k] = sample_rate / (low - 1 + lag_index + shift)
    return f0


def _theil_sen_slope(times: np.ndarray, values: np.ndarray) -> float:
    i, j = np.triu_indices(len(times), k=1)
    dt = times[j] - times[i]
    return float(np.median((values[j] - values[i]) / dt))


def _harmonic_ratios(frames: np.ndarray, f0: np.ndarray, sample_rate: int) -> tuple[float, float]:
    window = np.hanning(FRAME)
    power = np.abs(np.fft.rfft(frames * window, n=_FFT, axis=1)) ** 2
    freqs = np.fft.rfftfreq(_FFT, 1.0 / sample_rate)
    nyquist = sample_rate / 2
    even, odd = [], []
    for row, fundamental in zip(power, f0, strict=True):
        energy = []
        for harmonic in range(1, _HARMONICS + 1):
            centre = harmonic * fundamental
            if centre + _BAND * fundamental >= nyquist:
                energy.append(0.0)
                continue
            band = (freqs >= centre - _BAND * fundamental) & (freqs <= centre + _BAND * fundamental)
            energy.append(float(row[band].sum()))
        base = max(energy[0], 1e-20)
        even.append((energy[1] + energy[3]) / base)
        odd.append((energy[2] + energy[4]) / base)
    return float(np.median(even)), float(np.median(odd))


def judge_clip(clip: np.ndarray, sample_rate: int) -> ToneVerdict:
    """(samples,) mono clip -> the waveform and contour it sounds like (None where it has no tone)."""
    if clip.ndim != 1:
        raise ValueError(f"expected a mono (samples,) clip, got shape {clip.shape}")
    frames = _frames(clip)
    if len(frames) == 0:
        return ToneVerdict(None, None)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    voiced = rms >= _VOICED_FRACTION * rms.max() if rms.max() > 1e-4 else np.zeros(len(frames), bool)
    f0 = np.full(len(frames), np.nan)
    if voiced.any():
        f0[voiced] = frame_f0(frames[voiced], sample_rate)
    usable = np.isfinite(f0)
    if usable.sum() < 3:
        return ToneVerdict(None, None)
    times = (np.arange(len(frames)) * HOP + FRAME / 2) / sample_rate
    slope = _theil_sen_slope(times[usable], np.log2(f0[usable]))
    contour = "steady" if abs(slope) < _GLIDE_SPLIT else ("rising" if slope > 0 else "falling")
    even, odd = _harmonic_ratios(frames[usable], f0[usable], sample_rate)
    waveform = "sawtooth" if even > _EVEN_SPLIT else ("square" if odd > _ODD_SPLIT else "sine")
    return ToneVerdict(waveform, contour, slope, even, odd)


def tone_accuracy(clips: np.ndarray, class_ids: list[int], sample_rate: int) -> dict[str, object]:
    """How often `tones` clips sound like their class: waveform, contour, and both, judged from the
    waveform alone; per class too."""
    from mmgen_deploy.data.tones import CLASS_NAMES, class_parts
    from mmgen_deploy.evaluation.evaluate import class_attribute_accuracy

    return class_attribute_accuracy(
        clips, class_ids, CLASS_NAMES, class_parts,
        lambda clip: judge_clip(np.asarray(clip, dtype=np.float64), sample_rate), ("waveform", "contour"))
