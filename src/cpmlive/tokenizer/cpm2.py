"""The CPM-2 tokenizer (CPM-2, CPM-2.1, EVA), as the original code and ModelCenter's
``CPM2Tokenizer`` compute it.

The vocabulary file has one token a line, the id its line number less one; a line may be empty
(EVA's line 9 is the empty token: reading it as a gap would shift every later id, as BMInf's
reader does). A space is the token ``▂`` and a newline ``▃``. Encoding cuts the text with jieba
(accurate mode, HMM on) and every piece into vocabulary entries by greedy longest-prefix match;
a character no entry starts with is ``<unk>``, a piece of over 200 characters one ``<unk>``.
ModelCenter's default (no full-width to half-width folding) is kept. The sentinels ``<s_0>`` ...
mark spans: a prompt row is the text, then ``<s_0>`` (the span the decoder writes, starting from
``<s_0>``); the next sentinel or ``<eod>`` ends it.

Literal special tokens in a text (``<sep>``, ``<s_3>``, ``<eod>``) are read as those tokens, so
that a rendered dialogue (EVA's ``u1<sep>u2<sep>``) encodes as the original builds it from ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import jieba_pieces, longest_match

VOCAB_FILE = "vocab.txt"
SPACE, NEWLINE = "\u2582", "\u2583"
REQUIRED_TOKENS = ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<eod>", "<s_0>", "<s_1>", SPACE, NEWLINE)
SPECIAL = re.compile(r"(<sep>|<eod>|<s_\d+>|<mask>|<pad>|<unk>|<s>|</s>)")


def read_vocab(path: Path) -> list[str]:
    """The tokens of a vocabulary file, one a line (surrounding spaces stripped, empty lines kept
    as the empty token); a final newline ends the last line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise CpmliveError(f"vocabulary file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise CpmliveError(f"vocabulary file {path} is not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise CpmliveError(f"cannot read vocabulary file {path}: {exc.strerror}") from None
    if "\x00" in text[:4096]:
        raise CpmliveError(f"{path}: a binary (SentencePiece) model is not a CPM-2 vocabulary (one token a line)")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


class Cpm2Tokenizer:
    """CPM-2's tokenizer over a vocabulary (see the module docstring)."""

    vocab_file = VOCAB_FILE
    adds_bos = False
    mask_id = bod_id = None

    def __init__(self, tokens: Sequence[str], *, source: str = "(in memory)") -> None:
        self._tokens = list(tokens)
        self._ids: dict[str, int] = {}
        for index, token in enumerate(self._tokens):
            self._ids.setdefault(token, index)
        missing = [token for token in REQUIRED_TOKENS if token not in self._ids]
        if missing:
            raise CpmliveError(f"vocabulary {source} lacks the CPM-2 token(s) {' '.join(missing)}")
        self._longest = max(map(len, self._tokens))
        self.sentinels = [self._ids[f"<s_{i}>"] for i in range(len(self._tokens)) if f"<s_{i}>" in self._ids]
        self._special = frozenset(i for i, token in enumerate(self._tokens) if SPECIAL.fullmatch(token))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], hf_compat: bool = False) -> "Cpm2Tokenizer":
        if hf_compat:
            raise CpmliveError("--hf-tokenizer is CPM-Ant's; CPM-2 has one tokenizer")
        path = Path(path)
        path = path / VOCAB_FILE if path.is_dir() else path
        return cls(read_vocab(path), source=str(path))

    @classmethod
    def for_model(cls, vocab: Path, vocab_size: int, hf_compat: bool = False) -> "Cpm2Tokenizer":
        """The tokenizer of a checkpoint's vocabulary, refused when it does not have the
        embedding's ``vocab_size`` tokens."""
        tokenizer = cls.from_file(vocab, hf_compat)
        if tokenizer.vocab_size != vocab_size:
            raise CpmliveError(f"vocabulary has {tokenizer.vocab_size} tokens, the model expects {vocab_size}")
        return tokenizer

    def save(self, path: str | os.PathLike[str]) -> None:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(path, "".join(f"{token}\n" for token in self._tokens))

    # ---- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._tokens):
            raise CpmliveError(f"token id {token_id} is outside the vocabulary (size {len(self._tokens)})")
        return self._tokens[token_id]

    unk_id = property(lambda self: self._ids["<unk>"])
    pad_id = property(lambda self: self._ids["<pad>"])
    bos_id = property(lambda self: self._ids["<s>"])
    sep_id = property(lambda self: self._ids["<sep>"])
    eod_id = property(lambda self: self._ids["<eod>"])
    eos_id = eod_id
    space_id = property(lambda self: self._ids[SPACE])
    newline_id = property(lambda self: self._ids[NEWLINE])

    def sentinel(self, index: int) -> int:
        """The id of ``<s_index>``."""
        if not 0 <= index < len(self.sentinels):
            raise CpmliveError(f"the vocabulary has {len(self.sentinels)} sentinels, not <s_{index}>")
        return self.sentinels[index]

    @property
    def stop_ids(self) -> frozenset[int]:
        """A generated span ends at ``<eod>`` or at the next sentinel (``<s_1>``)."""
        return frozenset((self.eod_id, self.sentinel(1)))

    # ---- text --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The text's ids (literal special tokens as themselves)."""
        ids: list[int] = []
        for index, part in enumerate(SPECIAL.split(text)):
            if index % 2:
                ids.append(self._ids.get(part, self.unk_id))
            elif part:
                for piece in jieba_pieces(part.replace(" ", SPACE).replace("\n", NEWLINE)):
                    ids.extend(longest_match(piece, self._ids, self._longest, self.unk_id))
        return ids

    def encode_for_model(self, text: str) -> list[int]:
        """A prompt's encoder row: the text, then ``<s_0>`` (the span its decoder writes), unless
        the text marks its spans with sentinels itself (blanks to fill)."""
        ids = self.encode(text)
        return ids if self.sentinels and self.sentinels[0] in ids else [*ids, self.sentinel(0)]

    def tokenize(self, text: str) -> list[str]:
        return [self._tokens[i] for i in self.encode(text)]

    def pieces_with_ids(self, text: str) -> list[tuple[str, int]]:
        return [(self._tokens[i], i) for i in self.encode(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The tokens' text (``▂`` a space, ``▃`` a newline); negative ids are dropped."""
        kept = [int(i) for i in ids if int(i) >= 0 and not (skip_special_tokens and int(i) in self._special)]
        return "".join(self.id_to_token(i) for i in kept).replace(SPACE, " ").replace(NEWLINE, "\n")


__all__ = ["Cpm2Tokenizer", "read_vocab"]
