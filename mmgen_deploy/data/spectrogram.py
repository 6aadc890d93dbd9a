"""Clips <-> the one-channel spectrogram images the audio first stage trains on.

An `AudioConfig` fixes the transform. A clip's short-time Fourier transform (a periodic Hann window
of `n_fft` samples every `hop` samples, the clip padded by `n_fft // 2` zeros at both ends) gives
magnitudes on `n_fft // 2 + 1` frequencies x `num_frames` frames. Two fixed matrices resample them
to the square image: rows are triangular bands centred on `image_size` frequencies spaced evenly from
0 to `f_max` on a linear or a mel scale (`freq_scale`), columns triangular averages of the frames
around `image_size` evenly spaced times. The image holds the level in dB relative to a full-scale
sine, mapped from [-`db_range`, 0] to [-1, 1]; rows go from the highest frequency (top) down, as
spectrograms are drawn.

The way back (the vocoder, `models.vocoder`) inverts the matrices (a pseudo-inverse of the bands,
linear interpolation between the columns) and recovers a phase by Griffin-Lim. The same matrices
serve both directions, built here with NumPy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mmgen_deploy.config import AudioConfig


def hann_window(n_fft: int) -> np.ndarray:
    """The periodic Hann window (what STFT implementations use for perfect overlap-add)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)


def num_frames(config: AudioConfig) -> int:
    return 1 + config.clip_samples // config.hop


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def band_matrix(config: AudioConfig) -> np.ndarray:
    """(image_size, n_fft // 2 + 1) triangular bands, lowest frequency first, each summing to 1."""
    bins = np.fft.rfftfreq(config.n_fft, 1.0 / config.sample_rate)
    if config.freq_scale == "mel":
        centres = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.asarray(config.f_max)), config.image_size))
    else:
        centres = np.linspace(0.0, config.f_max, config.image_size)
    spacing = np.diff(centres)
    left = np.concatenate([[spacing[0]], spacing])  # the distance to each neighbour below / above
    right = np.concatenate([spacing, [spacing[-1]]])
    offset = bins[None, :] - centres[:, None]
    weights = np.where(offset < 0, 1.0 + offset / left[:, None], 1.0 - offset / right[:, None])
    weights = np.clip(weights, 0.0, None)
    # A band narrower than a bin would catch nothing: it takes the nearest bin instead.
    empty = weights.sum(axis=1) == 0
    weights[empty, np.abs(offset[empty]).argmin(axis=1)] = 1.0
    return weights / weights.sum(axis=1, keepdims=True)


def band_inverse(config: AudioConfig) -> np.ndarray:
    """(n_fft // 2 + 1, image_size): the least-squares way back from bands to bins."""
    return np.linalg.pinv(band_matrix(config))


def column_matrix(config: AudioConfig) -> np.ndarray:
    """(image_size, num_frames): each column a triangular average of the frames around its time."""
    frames = num_frames(config)
    position = np.arange(frames) * (config.image_size - 1) / (frames - 1)  # frame -> column units
    weights = np.clip(1.0 - np.abs(position[None, :] - np.arange(config.image_size)[:, None]), 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def column_inverse(config: AudioConfig) -> np.ndarray:
    """(num_frames, image_size): each frame linearly interpolated between its two nearest columns."""
    frames = num_frames(config)
    position = np.arange(frames) * (config.image_size - 1) / (frames - 1)
    return np.clip(1.0 - np.abs(position[:, None] - np.arange(config.image_size)[None, :]), 0.0, None)


def magnitude_scale(config: AudioConfig) -> float:
    """The STFT magnitude of a full-scale sine at a bin's centre (0 dB)."""
    return float(hann_window(config.n_fft).sum() / 2.0)


def stft_magnitude(clips: np.ndarray, config: AudioConfig) -> np.ndarray:
    """(N, samples) -> (N, n_fft // 2 + 1, num_frames) float32 magnitudes (the transform in the module
    doc; torch's FFT, several times NumPy's speed on the training set)."""
    import torch

    signal = np.zeros((len(clips), config.clip_samples), dtype=np.float32)
    kept = np.asarray(clips, dtype=np.float32)[:, :config.clip_samples]
    signal[:, :kept.shape[1]] = kept
    spectrum = torch.stft(torch.from_numpy(signal), n_fft=config.n_fft, hop_length=config.hop,
                          window=torch.from_numpy(hann_window(config.n_fft).astype(np.float32)),
                          center=True, pad_mode="constant", return_complex=True)
    return spectrum.abs().numpy()


def clips_to_images(clips: np.ndarray, config: AudioConfig, batch: int = 256) -> np.ndarray:
    """(N, samples) float clips -> (N, image_size, image_size) float32 spectrogram images in [-1, 1]."""
    bands, columns = band_matrix(config), column_matrix(config)
    out = np.empty((len(clips), config.image_size, config.image_size), dtype=np.float32)
    for start in range(0, len(clips), batch):
        magnitude = stft_magnitude(clips[start:start + batch], config) / magnitude_scale(config)
        resampled = np.matmul(np.matmul(bands.astype(np.float32), magnitude), columns.T.astype(np.float32))
        out[start:start + batch] = level_to_image(resampled, config)[:, ::-1]
    return out


def level_to_image(magnitude: np.ndarray, config: AudioConfig) -> np.ndarray:
    """Magnitudes (1.0 = full scale) -> image values: dB in [-db_range, 0] -> [-1, 1]."""
    db = 20.0 * np.log10(np.maximum(magnitude, 10.0 ** (-config.db_range / 20.0)))
    return np.clip(2.0 * db / config.db_range + 1.0, -1.0, 1.0).astype(np.float32)


def clips_to_uint8(clips: np.ndarray, config: AudioConfig) -> np.ndarray:
    """(N, samples) clips -> (N, S, S) uint8 spectrograms (0.3 dB steps over an 80 dB range), the
    form image data takes."""
    return np.clip(np.rint((clips_to_images(clips, config) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, S, S) images in [-1, 1] -> (N, S, S, 3) grey uint8 pictures (louder is brighter)."""
    grey = np.clip(np.rint((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
