"""The tokenizers, one a family (``ant``, ``bee``, ``cpm1``), and CPM-Ant's vocabulary builder.

A family's registry entry names its tokenizer class, which opens a checkpoint's vocabulary with
``for_model`` (see ``docs/adding-a-family.md``). :func:`text_tokenizer` opens the vocabulary of
a model that reads plain text (pretraining data, fine-tuning rows) by the kind of file it is.
"""

from __future__ import annotations

import os
from typing import Protocol

from cpmlive.tokenizer.ant import AntTokenizer
from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer
from cpmlive.tokenizer.hf import TOKENIZER_FILES, HFTokenizer
from cpmlive.tokenizer.vocab import build_vocab, save_vocab


class TextTokenizer(Protocol):
    """What prepared data and its checks need of a plain-text model's tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def id_to_token(self, token_id: int) -> str: ...


# The tokenizers of plain-text models, asked in this order whether they read a vocabulary file
# (``reads``); the last reads any file (one token a line).
TEXT_TOKENIZERS = (HFTokenizer, Cpm1Tokenizer, AntTokenizer)


def text_tokenizer(vocab: str | os.PathLike) -> HFTokenizer | AntTokenizer | Cpm1Tokenizer:
    """The tokenizer of a plain-text model's vocabulary file: the first of :data:`TEXT_TOKENIZERS`
    that reads it (a ``tokenizer.json`` is an HF directory's, a SentencePiece ``.model`` CPM-1's, a
    one-token-a-line file CPM-Ant's)."""
    return next(kind for kind in TEXT_TOKENIZERS if kind.reads(vocab)).from_file(vocab)


__all__ = ["AntTokenizer", "Cpm1Tokenizer", "HFTokenizer", "TEXT_TOKENIZERS", "TOKENIZER_FILES", "TextTokenizer",
           "build_vocab", "save_vocab", "text_tokenizer"]
