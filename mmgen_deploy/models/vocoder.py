"""The vocoder of audio runs: a spectrogram image -> a waveform, by unrolled Griffin-Lim.

Griffin-Lim looks for a signal whose STFT magnitude is the given one: starting from a phase, it
alternates "make a signal of this magnitude and phase" (inverse STFT) with "take that signal's
phase" (STFT), here with the momentum of fast Griffin-Lim (Perraudin et al. 2013, as torchaudio
implements it). The STFT and inverse STFT are a `conv1d` and a `conv_transpose1d` against fixed
windowed DFT bases, a phase is normalised by dividing by its magnitude (no atan2), and the
iteration count is fixed, so the graph exports to ONNX, OpenVINO and TensorRT with only
convolutions, matrix products and element-wise operations, and runs the same on every backend. The
starting phase is a fixed random one (`AudioConfig.phase_seed`) held as a buffer: the vocoder is a
pure function of its input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmgen_deploy.config import AudioConfig
from mmgen_deploy.data.spectrogram import (
    band_inverse,
    column_inverse,
    hann_window,
    magnitude_scale,
    num_frames,
)

# Added to a magnitude before dividing by it (a phase of a zero coefficient stays zero).
_EPS = 1e-8


def _bases(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Analysis and synthesis kernels (2 x bins, 1, n_fft): real parts first, then imaginary."""
    window = hann_window(n_fft)
    bins = n_fft // 2 + 1
    angle = 2.0 * np.pi * np.outer(np.arange(bins), np.arange(n_fft)) / n_fft
    analysis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window
    # One-sided inverse DFT: the bins between DC and Nyquist stand for two conjugate bins.
    weight = np.full(bins, 2.0)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    synthesis = np.concatenate([np.cos(angle) * weight[:, None], -np.sin(angle) * weight[:, None]])
    synthesis = synthesis * window / n_fft
    return analysis[:, None, :].astype(np.float32), synthesis[:, None, :].astype(np.float32)


class GriffinLimVocoder(nn.Module):
    """(B, 1, S, S) spectrogram images in [-1, 1] -> (B, clip_samples) waveforms (1.0 = full scale)."""

    analysis: torch.Tensor
    synthesis: torch.Tensor
    band_inverse: torch.Tensor
    column_inverse_t: torch.Tensor
    inverse_envelope: torch.Tensor
    initial_phase: torch.Tensor

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        analysis, synthesis = _bases(config.n_fft)
        self.register_buffer("analysis", torch.from_numpy(analysis))
        self.register_buffer("synthesis", torch.from_numpy(synthesis))
        self.register_buffer("band_inverse", torch.from_numpy(band_inverse(config).astype(np.float32)))
        self.register_buffer("column_inverse_t",
                             torch.from_numpy(column_inverse(config).T.astype(np.float32).copy()))
        frames = num_frames(config)
        bins = config.n_fft // 2 + 1
        # Overlap-add of the squared window: what the inverse STFT divides by.
        length = (frames - 1) * config.hop + config.n_fft
        envelope = np.zeros(length)
        for frame in range(frames):
            envelope[frame * config.hop:frame * config.hop + config.n_fft] += hann_window(config.n_fft) ** 2
        pad = config.n_fft // 2
        envelope = envelope[pad:pad + config.clip_samples]
        inverse_envelope = (1.0 / np.maximum(envelope, 1e-3)).astype(np.float32)
        self.register_buffer("inverse_envelope", torch.from_numpy(inverse_envelope))
        phase = np.random.default_rng(config.phase_seed).uniform(0.0, 2.0 * np.pi, size=(bins, frames))
        self.register_buffer("initial_phase", torch.from_numpy(
            np.concatenate([np.cos(phase), np.sin(phase)]).astype(np.float32)))
        self.magnitude_scale = magnitude_scale(config)
        self.bins = bins

    def magnitude(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) images -> (B, bins, frames) STFT magnitudes."""
        cfg = self.config
        level_db = (torch.flip(images[:, 0], dims=[1]) - 1.0) * (cfg.db_range / 2.0)
        bands = torch.pow(10.0, level_db / 20.0) * self.magnitude_scale
        return torch.relu(torch.matmul(torch.matmul(self.band_inverse, bands), self.column_inverse_t))

    def stft(self, signal: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, 2 x bins, frames): real parts, then imaginary parts."""
        pad = self.config.n_fft // 2
        padded = nn.functional.pad(signal[:, None, :], (pad, pad))
        return nn.functional.conv1d(padded, self.analysis, stride=self.config.hop)

    def istft(self, spectrum: torch.Tensor) -> torch.Tensor:
        """(B, 2 x bins, frames) -> (B, clip_samples): windowed overlap-add, normalised."""
        pad = self.config.n_fft // 2
        signal = nn.functional.conv_transpose1d(spectrum, self.synthesis, stride=self.config.hop)[:, 0]
        return signal[:, pad:pad + self.config.clip_samples] * self.inverse_envelope

    def _unit_phase(self, spectrum: torch.Tensor) -> torch.Tensor:
        real, imag = spectrum[:, :self.bins], spectrum[:, self.bins:]
        norm = torch.sqrt(real * real + imag * imag) + _EPS
        return torch.cat([real / norm, imag / norm], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        magnitude = self.magnitude(images)
        both = torch.cat([magnitude, magnitude], dim=1)
        phase = self.initial_phase.unsqueeze(0).expand(images.shape[0], -1, -1)
        momentum = self.config.griffin_lim_momentum / (1.0 + self.config.griffin_lim_momentum)
        previous = torch.zeros_like(both)
        for _ in range(self.config.griffin_lim_iters):
            rebuilt = self.stft(self.istft(both * phase))
            phase = self._unit_phase(rebuilt - previous * momentum)
            previous = rebuilt
        return self.istft(both * phase)
