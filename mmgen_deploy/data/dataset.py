"""The in-memory dataset every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageData:
    """Images (N, H, W, 3) uint8, class ids (N,), one caption per image, and the class names.

    Class-conditional training reads `labels`; a text-to-image model trains on `captions`
    (its tokenizer is built from them).
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: np.ndarray) -> ImageData:
        return ImageData(self.images[indices], self.labels[indices],
                         [self.captions[int(i)] for i in indices], self.class_names)

    def to_tensor(self):  # -> torch.Tensor; torch imported lazily for a fast CLI
        """Images as float32 (N, 3, H, W) in [-1, 1], the range the VQ-VAE works in."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class AudioData:
    """Mono clips (N, samples) float32 in [-1, 1] at `sample_rate`, class ids (N,), one caption per
    clip, and the class names: what the audio sources produce, before any transform to the
    spectrogram images the first stage trains on."""

    clips: np.ndarray
    labels: np.ndarray
    captions: list[str]
    class_names: tuple[str, ...]
    sample_rate: int

    def __len__(self) -> int:
        return int(self.clips.shape[0])

    def subset(self, indices: np.ndarray) -> AudioData:
        return AudioData(self.clips[indices], self.labels[indices], [self.captions[int(i)] for i in indices],
                         self.class_names, self.sample_rate)
