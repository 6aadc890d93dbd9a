"""What the denoiser is conditioned on, as plain arrays the sampling loop forwards.

A class-conditioned DiT takes `class_ids`; a text-conditioned one takes the text encoder's
outputs (`text_embeddings`, `text_mask`, `text_pooled`: whichever its conditioning uses).
Either way the loop sees a `Conditioning`: per-image arrays named as the denoiser's inputs,
plus the one-row null condition (the null label, or the empty prompt's encoding) that
classifier-free guidance puts in the second half of the batch.

The text encoder runs here, once per distinct prompt and once for the empty prompt,
never inside the denoising loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.specs import Tensors, text_condition_names

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.runtime.base import Runner
    from mmgen_deploy.text.tokenizer import WordTokenizer


@dataclass
class Conditioning:
    feeds: dict[str, np.ndarray]  # name -> (N, ...) per image
    null_feeds: dict[str, np.ndarray]  # name -> (1, ...) the unconditional input
    class_ids: list[int] = field(default_factory=list)  # class models
    prompts: list[str] = field(default_factory=list)  # text models
    encode_seconds: float = 0.0  # time in the text encoder
    unknown_words: tuple[str, ...] = ()
    truncated_prompts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    @property
    def labels(self) -> list[str]:
        """One human-readable condition per image (the prompt, or the class id)."""
        return list(self.prompts) if self.prompts else [str(c) for c in self.class_ids]


def class_name(config: ModelConfig, class_id: int) -> str:
    return config.class_names[class_id] if config.class_names else str(class_id)


def resolve_class(config: ModelConfig, value: str) -> int:
    """A class given as an id ("3") or a name ("red circle", case-insensitive) -> its id."""
    text = value.strip()
    num_classes = config.dit.num_classes
    if re.fullmatch(r"[+-]?\d+", text):
        class_id = int(text)
        if not 0 <= class_id < num_classes:
            raise UsageError(f"class id {class_id} is out of range", f"valid ids are 0..{num_classes - 1}")
        return class_id
    lowered = [name.lower() for name in config.class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if not config.class_names:
        raise UsageError(f"unknown class {value!r}: this model has no class names",
                         f"give a class id 0..{num_classes - 1}")
    # A DiTPipeline's id2label names list synonyms ("tench, Tinca tinca"): any one of them will do,
    # as with DiTPipeline.get_label_ids, if it names one class only.
    matches = [i for i, name in enumerate(lowered) if text.lower() in (s.strip() for s in name.split(","))]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(f"class {value!r} names {len(matches)} classes: "
                         + ", ".join(f"{i}={config.class_names[i]!r}" for i in matches), "give the class id")
    shown = list(enumerate(config.class_names))[:20]
    valid = ", ".join(f"{i}={name!r}" for i, name in shown) + (" ..." if len(config.class_names) > 20 else "")
    raise UsageError(f"unknown class {value!r}", f"valid classes: {valid}")


def class_conditioning(config: ModelConfig, class_ids: Sequence[int]) -> Conditioning:
    if config.uses_text:
        raise UsageError("this model is conditioned on text, not on class ids", "give prompts ({prompts})",
                         params=["prompts"])
    ids = [int(c) for c in class_ids]
    if not ids:
        raise UsageError("no classes to sample", "give at least one class")
    num_classes = config.dit.num_classes
    bad = sorted({c for c in ids if not 0 <= c < num_classes})
    if bad:
        raise UsageError(f"class id(s) {bad} out of range", f"valid ids are 0..{num_classes - 1}")
    return Conditioning(feeds={Tensors.CLASS_IDS: np.asarray(ids, dtype=np.int32)},
                        null_feeds={Tensors.CLASS_IDS: np.asarray([num_classes], dtype=np.int32)}, class_ids=ids)


def text_conditioning(runner: Runner, config: ModelConfig, tokenizer: WordTokenizer,
                      prompts: Sequence[str], *, max_batch: int = SAMPLING.batch_size) -> Conditioning:
    """Encode each distinct prompt (and "") once with `runner`'s text encoder."""
    if not config.uses_text:
        raise UsageError("this model is class-conditioned: it takes class ids, not prompts",
                         "use {classes} (see `mmgen info RUN_DIR` for the class names)", params=["classes"])
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UsageError("no prompts to sample", "give at least one prompt")
    distinct = list(dict.fromkeys(["", *prompts]))  # "" first: the unconditional input
    encoding = tokenizer.encode(distinct)
    names = text_condition_names(config.dit)
    started = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(distinct), max_batch):
        out = runner.run("text_encoder", {Tensors.INPUT_IDS: encoding.input_ids[start:start + max_batch]})
        for name in names:
            parts[name].append(np.array(out[name], dtype=np.float32, copy=True))  # runners may reuse buffers
    seconds = time.perf_counter() - started
    table = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    row = {p: i for i, p in enumerate(distinct)}
    pick = np.asarray([row[p] for p in prompts])
    return Conditioning(
        feeds={name: np.ascontiguousarray(values[pick]) for name, values in table.items()},
        null_feeds={name: values[:1].copy() for name, values in table.items()},
        prompts=prompts, encode_seconds=seconds, unknown_words=encoding.unknown_words,
        truncated_prompts=tuple(distinct[i] for i in encoding.truncated))


def make_conditioning(runner: Runner, config: ModelConfig, *, class_ids: Sequence[int] = (),
                      prompts: Sequence[str] = (), tokenizer: WordTokenizer | None = None) -> Conditioning:
    """What the denoiser is conditioned on, for either kind of model: `prompts` (encoded once each
    with `runner`'s text encoder and `tokenizer`) for a text-to-image model, `class_ids` for a class
    model. The wrong kind is refused in one line."""
    if config.uses_text:
        if class_ids:
            raise UsageError("this model is conditioned on text: it takes prompts, not class ids",
                             'give prompts, e.g. "a large blue triangle at the top"')
        if tokenizer is None:
            raise ValueError("a text-to-image model needs its tokenizer (RunDir.load_tokenizer())")
        return text_conditioning(runner, config, tokenizer, prompts)
    if prompts:
        raise UsageError("this model is class-conditioned: it takes class ids, not prompts",
                         "use {classes} (see `mmgen info RUN_DIR` for the class names)", params=["classes"])
    return class_conditioning(config, class_ids)
