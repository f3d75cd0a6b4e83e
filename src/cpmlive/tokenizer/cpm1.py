"""CPM-1's tokenizer, exactly CPM-Generate's recipe (``data_utils/tokenization_gpt2.py``).

Encoding: ``jieba.cut`` in accurate mode; in every word a space becomes U+2582 and a newline
U+2583; the words are joined by spaces and the result goes through SentencePiece (whose
``▁`` then marks each word start). Decoding: SentencePiece's text with every space removed (they
are the joins), U+2582 / U+2583 mapped back.

HF's ``CpmTokenizer`` and ``CpmTokenizerFast`` (transformers 5.x) skip the jieba step and the
mapping: their ids differ from the original's wherever a word boundary or a space falls
(``tests/test_cpm1_tokenizer.py`` records it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import jieba_pieces

VOCAB_FILE = "spiece.model"
SPACE, NEWLINE = "\u2582", "\u2583"
_TO_PIECES = str.maketrans(" \n", SPACE + NEWLINE)
EOD_TOKEN = "<eod>"


def segment(text: str) -> str:
    """The text SentencePiece sees: jieba's words, spaces and newlines mapped, joined by spaces."""
    return " ".join(word.translate(_TO_PIECES) for word in jieba_pieces(text))


def restore(text: str) -> str:
    """SentencePiece's decoded text back to the original: joins removed, U+2582/U+2583 mapped back."""
    return text.replace(" ", "").replace(SPACE, " ").replace(NEWLINE, "\n")


class Cpm1Tokenizer:
    """jieba + SentencePiece over a ``spiece.model`` (CPM-Generate's ``chinese_vocab.model``).

    ``eos_id`` is ``<eod>``, where CPM-1's documents end and generation stops. Prompts are fed as
    their pieces alone (``adds_bos`` is false), as CPM-Generate's script does; where a start token
    is needed (scoring a text's first piece, fine-tuning rows), ``bos_id`` is ``<eod>`` too: in
    CPM-1's training data a document follows the ``<eod>`` of the one before.
    """

    adds_bos = False
    vocab_file = VOCAB_FILE

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        import sentencepiece

        self.path = Path(model_file)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CpmliveError(f"{self.path}: cannot read the SentencePiece model ({exc.strerror or exc})") from None
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError):
            raise CpmliveError(f"{self.path}: not a SentencePiece model") from None
        eod = self.sp.piece_to_id(EOD_TOKEN)
        if eod == self.sp.unk_id():
            raise CpmliveError(f"{self.path}: the SentencePiece model has no {EOD_TOKEN} piece "
                               "(not CPM-1's vocabulary)")
        self._eod_id = eod
        pad = self.sp.piece_to_id("<pad>")
        self._pad_id = pad if pad != self.sp.unk_id() else eod

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], hf_compat: bool = False) -> "Cpm1Tokenizer":
        if hf_compat:
            raise CpmliveError("--hf-tokenizer is CPM-Ant's; CPM-1's tokenizer is the original recipe")
        return cls(path)

    @classmethod
    def for_model(cls, vocab: Path, vocab_size: int, hf_compat: bool = False) -> "Cpm1Tokenizer":
        """The tokenizer of a SentencePiece model that fits the embedding; a CPM-Ant/Bee
        ``vocab.txt`` or a model of another size is refused in one line."""
        if hf_compat:
            raise CpmliveError("hf_tokenizer is CPM-Ant's; CPM-1's tokenizer is the original recipe")
        if vocab.suffix == ".txt":
            raise CpmliveError(f"{vocab}: a one-token-a-line vocabulary is CPM-Ant's or CPM-Bee's; CPM-1 reads a "
                               f"SentencePiece {VOCAB_FILE}")
        tokenizer = cls(vocab)
        if tokenizer.vocab_size != vocab_size:
            raise CpmliveError(f"{vocab}: the SentencePiece model has {tokenizer.vocab_size} pieces, the embedding "
                               f"{vocab_size} rows")
        return tokenizer

    @classmethod
    def reads(cls, vocab: str | os.PathLike[str]) -> bool:
        """Whether ``vocab`` is this tokenizer's kind of file: a SentencePiece ``.model``."""
        return Path(vocab).suffix == ".model"

    def save(self, path: str | os.PathLike[str]) -> None:
        shutil.copyfile(self.path, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def eod_id(self) -> int:
        return self._eod_id

    bos_id = eos_id = eod_id  # see the class docstring
    mask_id = newline_id = space_id = bod_id = None

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise CpmliveError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(token_id)

    def pieces_with_ids(self, text: str) -> list[tuple[str, int]]:
        ids = self.encode(text)
        return [(self.sp.id_to_piece(i), i) for i in ids]

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(segment(text), out_type=str)

    def encode(self, text: str) -> list[int]:
        """The original's ``encode``: no special token added."""
        return self.sp.encode(segment(text))

    def encode_for_model(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The original's ``decode``; ``skip_special_tokens`` drops ``<eod>`` and the control pieces."""
        id_list = [int(i) for i in ids if int(i) >= 0]
        for token_id in id_list:
            self.id_to_token(token_id)  # range check
        if skip_special_tokens:
            id_list = [i for i in id_list if i != self._eod_id and not self.sp.is_control(i)]
        return restore(self.sp.decode(id_list))


__all__ = ["Cpm1Tokenizer", "EOD_TOKEN", "VOCAB_FILE", "restore", "segment"]
