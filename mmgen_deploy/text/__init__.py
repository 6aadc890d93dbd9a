"""Text side of text-to-image models: the word tokenizer (the encoder is in models/)."""

from mmgen_deploy.text.tokenizer import BOS, EOS, PAD, UNK, Encoding, WordTokenizer, split_words

__all__ = ["BOS", "EOS", "PAD", "UNK", "Encoding", "WordTokenizer", "split_words"]
