"""CPM-Ant's and CPM-1's tokenizers and the vocabulary builder."""

import os
from pathlib import Path

from cpmlive.tokenizer.ant import AntTokenizer
from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer
from cpmlive.tokenizer.vocab import build_vocab, read_corpus_texts, save_vocab


def text_tokenizer(vocab: str | os.PathLike) -> AntTokenizer | Cpm1Tokenizer:
    """The tokenizer of a plain-text model's vocabulary file: a SentencePiece ``.model`` is
    CPM-1's, a one-token-a-line file CPM-Ant's."""
    return Cpm1Tokenizer(vocab) if Path(vocab).suffix == ".model" else AntTokenizer.from_file(vocab)


__all__ = ["AntTokenizer", "Cpm1Tokenizer", "build_vocab", "read_corpus_texts", "save_vocab", "text_tokenizer"]
