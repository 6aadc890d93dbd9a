"""A deterministic word-level tokenizer in plain Python/NumPy (no model files to download).

Text is lower-cased and split into words (runs of letters/digits); punctuation and
other symbols are dropped. Ids 0..3 are special: [PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3; words follow in the order
fixed when the vocabulary was built (by frequency in the training captions, ties broken
alphabetically), so the same captions always give the same ids.

Every prompt becomes exactly `max_length` ids: [BOS] words... [EOS] [PAD]... A prompt with
more than `max_length - 2` words is truncated to its first `max_length - 2` words (the
[EOS] is always kept); words not in the vocabulary become [UNK]. The empty prompt is
[BOS] [EOS]: the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.errors import RunDirError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
TOKENIZER_FORMAT = "mmgen-word-tokenizer"
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Encoding:
    input_ids: np.ndarray  # int32 (N, max_length)
    unknown_words: tuple[str, ...]  # distinct words mapped to [UNK], in order of appearance
    truncated: tuple[int, ...]  # indices of the prompts that were cut to max_length


class WordTokenizer:
    def __init__(self, words: Sequence[str], max_length: int) -> None:
        if max_length < 3:
            raise ValueError("max_length must be >= 3 ([BOS], one word, [EOS])")
        self.words = tuple(words)
        self.max_length = int(max_length)
        self._ids = {word: i + len(SPECIAL_TOKENS) for i, word in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("the vocabulary has duplicate words")

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], *, max_length: int = 16, max_words: int = 4096) -> WordTokenizer:
        """The vocabulary of `captions`: the `max_words` most frequent words."""
        counts = Counter(word for caption in captions for word in split_words(caption))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
        return cls(ranked, max_length)

    def encode(self, prompts: Sequence[str]) -> Encoding:
        ids = np.full((len(prompts), self.max_length), PAD, dtype=np.int32)
        unknown: dict[str, None] = {}
        truncated = []
        room = self.max_length - 2
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            if len(words) > room:
                truncated.append(row)
                words = words[:room]
            tokens = [BOS]
            for word in words:
                token = self._ids.get(word, UNK)
                if token == UNK:
                    unknown.setdefault(word)
                tokens.append(token)
            tokens.append(EOS)
            ids[row, :len(tokens)] = tokens
        return Encoding(ids, tuple(unknown), tuple(truncated))

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return self.encode(prompts).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        vocab = (*SPECIAL_TOKENS, *self.words)
        return " ".join(vocab[i] for i in ids if i not in (PAD, BOS, EOS))

    # -- files ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "version": 1, "max_length": self.max_length,
                "special_tokens": list(SPECIAL_TOKENS), "words": list(self.words)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "tokenizer") -> WordTokenizer:
        if not isinstance(data, dict) or data.get("format") != TOKENIZER_FORMAT:
            raise RunDirError(f"{source} is not an mmgen word tokenizer (format != {TOKENIZER_FORMAT!r})")
        if list(data.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise RunDirError(f"{source} has other special tokens than {', '.join(SPECIAL_TOKENS)}")
        try:
            return cls([str(w) for w in data["words"]], int(data["max_length"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{source} is damaged: {exc}") from None

    def save(self, path: Path) -> None:
        from mmgen_deploy.io_utils import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        import json

        from mmgen_deploy.io_utils import read_json

        if not path.is_file():
            raise RunDirError(f"missing tokenizer {path}", "train the text-conditioned DiT first (`mmgen train dit`)")
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{path} is unreadable: {exc}") from None
        return cls.from_dict(data, str(path))
