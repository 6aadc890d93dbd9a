"""A tiny text-to-image run for the tests that deploy one (export, serve, batch)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen_deploy.config import preset, with_text
from mmgen_deploy.data import DataSpec, load_split
from mmgen_deploy.models import DiT, TextEncoder, VQModel, rerandomize_
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.text import WordTokenizer

TEXT_DATA = DataSpec(name="shapes", num_train=64, num_val=16)
PROMPT = "a large blue triangle at the top"  # a prompt in the shapes captions' words


def make_text_run(root: Path) -> RunDir:
    """A tiny pooled+cross-attention text run with re-randomised weights (fresh DiT outputs are
    zero) and the shapes captions' tokenizer."""
    tokenizer = WordTokenizer.build(load_split(TEXT_DATA, "val").captions, max_length=16)
    config = with_text(preset("tiny"), conditioning="pooled+cross_attention", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    vq, dit, text_encoder = VQModel(config.first_stage), DiT(config.dit), TextEncoder(config.text)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    rerandomize_(text_encoder, seed=3)
    return save_run(root, config, vq.eval(), dit.eval(), data=TEXT_DATA.to_dict(), text_encoder=text_encoder.eval(),
                    tokenizer=tokenizer)
