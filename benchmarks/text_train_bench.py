"""Cost of one DiT training step: class-conditioned vs text-conditioned (DiT + text encoder), side by side.

    PYTHONPATH=$PWD python benchmarks/text_train_bench.py [--steps 20] [--batch-size 128] [--threads 1]

The tiny preset on random latents and real `shapes` captions, the same loss and optimizer
as `mmgen train dit`; each variant runs `--steps` timed steps after 3 warm-up steps,
interleaved round-robin so that a shared machine's load hits every variant alike. Prints
median milliseconds per step (wall and process CPU) and the ratio to the class DiT, which
is what the text quickstart's step budget follows from. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _variants(batch_size: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from mmgen_deploy.config import preset, with_text
    from mmgen_deploy.data.shapes import make_shapes
    from mmgen_deploy.models import DiT, TextEncoder
    from mmgen_deploy.training.dit import build_tokenizer

    captions = make_shapes(512, seed=0).captions
    tokenizer = build_tokenizer(captions, 16)
    ids = torch.from_numpy(tokenizer(captions[:batch_size])).long()
    base = preset("tiny")
    x = torch.randn(batch_size, 4, 8, 8)
    t = torch.randint(0, 1000, (batch_size,)).float()
    y = torch.randint(0, 18, (batch_size,))

    def make(conditioning: str | None):
        config = base if conditioning is None else with_text(base, conditioning=conditioning,
                                                            vocab_size=tokenizer.vocab_size)
        torch.manual_seed(0)
        dit = DiT(config.dit)
        text = TextEncoder(config.text) if config.text is not None else None
        params = list(dit.parameters()) + (list(text.parameters()) if text is not None else [])
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

        def step() -> None:
            if text is None:
                out = dit(x, t, y)
            else:
                emb, mask, pooled = text(ids)
                out = dit(x, t, text=emb, text_mask=mask, text_pooled=pooled)
            loss = F.mse_loss(out[:, :4], x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    return {"class": make(None), "text pooled": make("pooled"), "text cross_attention": make("cross_attention"),
            "text pooled+cross_attention": make("pooled+cross_attention")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    variants = _variants(args.batch_size)
    for step in variants.values():
        for _ in range(3):
            step()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, step in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    base_wall, base_cpu = statistics.median(wall["class"]), statistics.median(cpu["class"])
    print(f"tiny preset, batch {args.batch_size}, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'variant':30s} {'wall ms':>9s} {'cpu ms':>9s} {'wall x':>7s} {'cpu x':>7s}")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:30s} {1000 * w:9.1f} {1000 * c:9.1f} {w / base_wall:7.2f} {c / base_cpu:7.2f}")


if __name__ == "__main__":
    main()
