"""The ceiling of the spectrogram route for `tones`: real validation clips -> spectrogram image ->
Griffin-Lim vocoder -> the waveform judge, per spectrogram layout (docs/design/audio-first-stage.md).

    python benchmarks/audio_first_stage.py [--clips-per-class 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mmgen_deploy.config import AudioConfig
from mmgen_deploy.data.spectrogram import clips_to_images
from mmgen_deploy.data.tones import CLASS_NAMES, SAMPLE_RATE, class_parts, make_tones
from mmgen_deploy.evaluation.tone_judge import judge_clip
from mmgen_deploy.models.vocoder import GriffinLimVocoder

LAYOUTS = {
    "64 linear 0-2.5 kHz (n_fft 400, hop 100)": AudioConfig(image_size=64, n_fft=400, hop=100, f_max=2520.0),
    "64 linear 0-4 kHz (n_fft 512, hop 128)": AudioConfig(image_size=64, n_fft=512, hop=128, f_max=4000.0),
    "64 mel 0-4 kHz (n_fft 512, hop 128)": AudioConfig(image_size=64, n_fft=512, hop=128, f_max=4000.0,
                                                        freq_scale="mel"),
    "64 mel 0-8 kHz (n_fft 512, hop 128)": AudioConfig(image_size=64, n_fft=512, hop=128, f_max=8000.0,
                                                        freq_scale="mel"),
    "32 linear 0-2.5 kHz (n_fft 200, hop 50)": AudioConfig(image_size=32, n_fft=200, hop=50, f_max=2480.0),
    "32 mel 0-4 kHz (n_fft 400, hop 100)": AudioConfig(image_size=32, n_fft=400, hop=100, f_max=4000.0,
                                                        freq_scale="mel"),
}


def judged(clips: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    both = waveform = contour = 0
    for clip, label in zip(clips, labels, strict=True):
        want = class_parts(int(label))
        verdict = judge_clip(clip, SAMPLE_RATE)
        waveform += verdict.waveform == want[0]
        contour += verdict.contour == want[1]
        both += verdict.matches(*want)
    n = len(labels)
    return both / n, waveform / n, contour / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips-per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, nargs="+", default=[32])
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = make_tones(args.clips_per_class * len(CLASS_NAMES), seed=0, split="val")
    print(f"real clips: both/waveform/contour = {judged(data.clips, data.labels)}")
    print("| layout | GL iterations | both | waveform | contour | vocoder ms/clip |")
    print("|---|---|---|---|---|---|")
    for name, layout in LAYOUTS.items():
        if args.only and args.only not in name:
            continue
        images = clips_to_images(data.clips, layout)
        for iters in args.iters:
            vocoder = GriffinLimVocoder(layout.replace(griffin_lim_iters=iters)).eval()
            started = time.perf_counter()
            with torch.no_grad():
                clips = vocoder(torch.from_numpy(images[:, None])).numpy()
            ms = (time.perf_counter() - started) * 1000 / len(clips)
            both, waveform, contour = judged(clips, data.labels)
            print(f"| {name} | {iters} | {both:.1%} | {waveform:.1%} | {contour:.1%} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
