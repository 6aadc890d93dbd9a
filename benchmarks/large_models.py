"""Real-size model pairs for development: a diffusers DiT (S/2, B/2, XL/2) on a 256 px VQ-f8 or VQ-f4.

    python benchmarks/large_models.py XL/2 OUT_DIR [--vq f8|f4] [--image-size 256] [--seed 0] [--json -]

writes `OUT_DIR/vqvae/` (diffusers `VQModel`) and `OUT_DIR/transformer/` (diffusers
`DiTTransformer2DModel`), each with `save_pretrained` (config.json + safetensors), ready for
`mmgen import --vq OUT_DIR/vqvae --dit OUT_DIR/transformer --out RUN`.

Weights are random (nothing is downloaded): diffusers' own initialisation, then every
all-zero tensor (the zero-initialised adaLN modulations and final layers of a fresh DiT, which
would make it output exactly zero) is given small random values, the VQ codebook is drawn
well separated (like a trained one), and every transformer block's copy of the timestep/class
embedder is set equal to block 0's, as in converted published checkpoints.

The XL/2 + f8 pair is the published DiT-XL/2 with a 256 px VQ-f8:
  VQModel(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
          num_vq_embeddings=16384, vq_embed_dim=4, norm_num_groups=32, sample_size=256)
  DiTTransformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
                        num_attention_heads=16, attention_head_dim=72, num_embeds_ada_norm=1000)
f4 is the LDM VQ-f4 (128-256-512 channels, 3 latent channels, 8192 codes); its latent is
64x64 at 256 px, so the DiT has 4x the tokens of the f8 pair.

Library use (other benchmarks import this module):

    from benchmarks.large_models import make_pair
    pair = make_pair("B/2", Path("/tmp/x/pair"), vq="f4")
    pair.vq_dir, pair.dit_dir, pair.params   # folders to give `mmgen import --vq/--dit`

Peak memory is about twice the FP32 size of the DiT (XL/2: 2.7 GB of weights), for the model
plus the serialized file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# (depth, heads, head_dim, patch): the DiT paper's sizes (width = heads x head_dim).
DIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "S/2": (12, 6, 64, 2),
    "S/4": (12, 6, 64, 4),
    "B/2": (12, 12, 64, 2),
    "B/4": (12, 12, 64, 4),
    "L/2": (24, 16, 64, 2),
    "L/4": (24, 16, 64, 4),
    "XL/2": (28, 16, 72, 2),
    "XL/4": (28, 16, 72, 4),
}

# name -> (block_out_channels, latent channels = vq_embed_dim, codebook size): LDM's VQ-f8 and VQ-f4.
VQ_PRESETS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "f8": ((128, 256, 512, 512), 4, 16384),
    "f4": ((128, 256, 512), 3, 8192),
}

NUM_CLASSES = 1000


@dataclass
class Pair:
    """Where `make_pair` wrote the two models, and what they are."""

    root: Path
    vq_dir: Path
    dit_dir: Path
    dit_preset: str
    vq_preset: str
    image_size: int
    latent_size: int
    latent_channels: int
    params: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("root", "vq_dir", "dit_dir"):
            out[key] = str(out[key])
        return out


def _check(dit: str, vq: str, image_size: int) -> None:
    if dit not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {dit!r}; choose one of {', '.join(DIT_PRESETS)}")
    if vq not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {vq!r}; choose one of {', '.join(VQ_PRESETS)}")
    factor = 2 ** (len(VQ_PRESETS[vq][0]) - 1)
    patch = DIT_PRESETS[dit][3]
    if image_size % (factor * patch):
        raise ValueError(f"image size {image_size} is not a multiple of {factor * patch} "
                         f"(VQ-{vq} downsampling x DiT patch {patch})")


def make_vq(vq: str = "f8", image_size: int = 256, seed: int = 0) -> Any:
    """A diffusers `VQModel` of preset `vq` ('f8' or 'f4') with random, trained-looking weights (eval mode)."""
    import diffusers
    import torch

    channels, latent, codes = VQ_PRESETS[vq]
    torch.manual_seed(seed)
    model = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels, layers_per_block=2,
        latent_channels=latent, num_vq_embeddings=codes, vq_embed_dim=latent, norm_num_groups=32,
        sample_size=image_size)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        _fill_zero_tensors(model, gen)
        # A trained-looking codebook: well-separated codes at roughly the scale of the encoder's output.
        model.quantize.embedding.weight.copy_(torch.randn(codes, latent, generator=gen))
    return model.eval()


def make_dit(dit: str = "XL/2", latent_size: int = 32, latent_channels: int = 4, seed: int = 0,
             num_classes: int = NUM_CLASSES) -> Any:
    """A diffusers `DiTTransformer2DModel` of preset `dit` (learned sigma), re-randomised (eval mode)."""
    import diffusers
    import torch

    depth, heads, head_dim, patch = DIT_PRESETS[dit]
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(
        sample_size=latent_size, patch_size=patch, in_channels=latent_channels, out_channels=2 * latent_channels,
        num_layers=depth, num_attention_heads=heads, attention_head_dim=head_dim, num_embeds_ada_norm=num_classes)
    with torch.no_grad():
        _fill_zero_tensors(model, torch.Generator().manual_seed(seed + 1))
        # diffusers gives each block its own embedder copy; converted checkpoints have them equal.
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model.eval()


def _fill_zero_tensors(model: Any, gen: Any, scale: float = 0.02) -> None:
    """Give every all-zero parameter small random values (a zero-initialised layer would hide errors)."""
    import torch

    for param in model.parameters():
        if torch.count_nonzero(param) == 0:
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def make_pair(dit: str, out_dir: Path, *, vq: str = "f8", image_size: int = 256, seed: int = 0,
              num_classes: int = NUM_CLASSES) -> Pair:
    """Write a diffusers VQ model (`out_dir/vqvae`) and DiT (`out_dir/transformer`) that fit each other.

    dit: a key of DIT_PRESETS ('S/2', 'B/2', 'XL/2', ...); vq: 'f8' or 'f4'; image_size: pixels
    (the DiT's latent size is image_size / 8 or / 4). Raises ValueError for an unknown preset or a
    size that does not divide. One model is in memory at a time.
    """
    import gc

    _check(dit, vq, image_size)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels, latent_channels, _ = VQ_PRESETS[vq]
    latent_size = image_size // 2 ** (len(channels) - 1)
    pair = Pair(root=out_dir, vq_dir=out_dir / "vqvae", dit_dir=out_dir / "transformer", dit_preset=dit,
                vq_preset=vq, image_size=image_size, latent_size=latent_size, latent_channels=latent_channels)
    model = make_vq(vq, image_size, seed)
    pair.params["vqvae"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(pair.vq_dir)
    del model
    gc.collect()
    model = make_dit(dit, latent_size, latent_channels, seed + 100, num_classes)
    pair.params["dit"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(pair.dit_dir)
    del model
    gc.collect()
    pair.seconds = round(time.perf_counter() - start, 1)
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dit", choices=sorted(DIT_PRESETS), help="DiT preset")
    parser.add_argument("out_dir", type=Path, help="folder to write vqvae/ and transformer/ into")
    parser.add_argument("--vq", choices=sorted(VQ_PRESETS), default="f8", help="autoencoder preset (default f8)")
    parser.add_argument("--image-size", type=int, default=256, help="pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--json", metavar="FILE", help="write what was made as JSON ('-' = stdout)")
    args = parser.parse_args(argv)
    try:
        pair = make_pair(args.dit, args.out_dir, vq=args.vq, image_size=args.image_size, seed=args.seed,
                         num_classes=args.num_classes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps(pair.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    print(f"DiT-{pair.dit_preset} ({pair.params['dit']:,} params, latent {pair.latent_channels}x{pair.latent_size}"
          f"x{pair.latent_size}) + VQ-{pair.vq_preset} ({pair.params['vqvae']:,} params) at {pair.image_size} px "
          f"in {pair.seconds} s:\n  mmgen import --vq {pair.vq_dir} --dit {pair.dit_dir} --out RUN",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
