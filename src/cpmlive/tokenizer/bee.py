"""CPM-Bee tokenizer (spec section 7.3): bilingual, no word segmenter.

Text is first split into special tokens written ``<name>`` and ordinary text; a literal ``<``
is written ``<<``. Ordinary text is matched greedily, longest vocabulary entry first (never an
entry that looks like ``<name>``); characters no entry starts with are gathered into one
unknown piece. Unknown pieces and specials that are not vocabulary entries (``<mask_0>``,
``<ans_1>``, ``<option_2>``) get temporary ids from ``vocab_size`` on, recorded in an *ext
table* that one example's segments share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import check_not_sentencepiece
from cpmlive.tokenizer.special import SpecialIds

# The vocabulary file spells these two ``</n>`` and ``</_>`` (a line cannot hold a bare newline).
FILE_SPELLING = {"\n": "</n>", " ": "</_>"}
# The tokens the published CPM-Bee 3B config leaves out of the vocabulary (spec section 7.1).
BEE_3B_MISSING = ("）", "（", "…")
SPECIALS = ("<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>", "<option>")


@dataclass(frozen=True)
class Piece:
    """One token of :meth:`BeeTokenizer.tokenize`: its text, where it starts in the source, and
    whether it is an unknown run of characters or a ``<name>`` special."""

    token: str
    start: int
    is_unk: bool = False
    is_special: bool = False


def is_special_name(token: str) -> bool:
    return len(token) > 1 and token.startswith("<") and token.endswith(">")


def escape(text: str) -> str:
    """Ordinary text as the tokenizer reads it literally (``<`` doubled)."""
    return text.replace("<", "<<")


def unescape(text: str) -> str:
    return text.replace("<<", "<")


def split_specials(text: str) -> list[str]:
    """``[text, special, text, special, ..., text]``: odd entries are ``<name>`` specials,
    even ones ordinary text with ``<<`` already read as ``<``."""
    parts = [""]
    pending_lt = in_special = False
    for index, char in enumerate(text):
        if in_special:
            if char == "<":
                raise CpmliveError(f"invalid special token at position {index} of {text!r} (write a literal < as <<)")
            parts[-1] += char
            if char == ">":
                in_special = False
                parts.append("")
        elif char == "<":
            if pending_lt:
                parts[-1] += "<"
            pending_lt = not pending_lt
        elif pending_lt:
            pending_lt, in_special = False, True
            parts.append("<" + char)
        else:
            parts[-1] += char
    if pending_lt or in_special:
        raise CpmliveError(f"unterminated special token in {text!r} (write a literal < as <<)")
    return parts


class BeeTokenizer(SpecialIds):
    def __init__(self, tokens: Sequence[str], *, source: str = "(in memory)") -> None:
        readable = [{v: k for k, v in FILE_SPELLING.items()}.get(token, token) for token in tokens]
        self.tokens = list(readable)
        self.encoder = {token: index for index, token in enumerate(readable)}
        if len(self.encoder) != len(readable):
            raise CpmliveError(f"{source}: the vocabulary repeats a token")
        missing = [name for name in ("<unk>", "<s>", "</s>", "<pad>", "<ans>") if name not in self.encoder]
        if missing:
            raise CpmliveError(f"{source}: not a CPM-Bee vocabulary (no {missing[0]})")
        self.specials = {token for token in readable if is_special_name(token)}
        self.max_word_length = max(len(token) for token in readable)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "BeeTokenizer":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise CpmliveError(f"{path}: vocabulary file not found") from None
        except UnicodeDecodeError:
            raise CpmliveError(f"{path}: the vocabulary is not UTF-8 text") from None
        return cls([line for line in lines if line], source=str(path))

    @classmethod
    def for_model(cls, vocab: Path, vocab_size: int, hf_compat: bool = False) -> "BeeTokenizer":
        """The tokenizer of a checkpoint's vocabulary file, cut to a model whose config has the 3B's
        three fewer tokens: those characters then read as unknown (ext) pieces, where the original
        would index past the end of the embedding."""
        check_not_sentencepiece(vocab)
        if hf_compat:
            raise CpmliveError("hf_tokenizer is CPM-Ant's (HF has no CPM-Bee tokenizer)")
        tokenizer = cls.from_file(vocab)
        extra = tokenizer.tokens[vocab_size:]
        if tokenizer.vocab_size > vocab_size and tuple(extra) == BEE_3B_MISSING[:len(extra)]:
            return cls(tokenizer.tokens[:vocab_size], source=str(vocab))
        if tokenizer.vocab_size != vocab_size:
            raise CpmliveError(f"{vocab}: the vocabulary has {tokenizer.vocab_size} tokens, the model expects "
                               f"{vocab_size}")
        return tokenizer

    def save(self, path: str | os.PathLike[str]) -> None:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(path, "".join(f"{FILE_SPELLING.get(token, token)}\n" for token in self.tokens))

    # ---- ids -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.encoder.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]

    # ---- text <-> pieces <-> ids ----------------------------------------------------------------

    def _longest_piece(self, text: str, start: int) -> str | None:
        for end in range(min(len(text), start + self.max_word_length), start, -1):
            piece = text[start:end]
            if piece in self.encoder and piece not in self.specials:
                return piece
        return None

    def tokenize(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        offset = 0
        for index, part in enumerate(split_specials(text)):
            if index % 2:
                pieces.append(Piece(part, offset, is_special=True))
            else:
                self._tokenize_text(part, offset, pieces)
            offset += len(part)
        return pieces

    def _tokenize_text(self, part: str, offset: int, pieces: list[Piece]) -> None:
        unknown_start, position = None, 0
        while position < len(part):
            piece = self._longest_piece(part, position)
            if piece is None:
                unknown_start = position if unknown_start is None else unknown_start
                position += 1
                continue
            if unknown_start is not None:
                pieces.append(Piece(part[unknown_start:position], offset + unknown_start, is_unk=True))
                unknown_start = None
            pieces.append(Piece(piece, offset + position))
            position += len(piece)
        if unknown_start is not None:
            pieces.append(Piece(part[unknown_start:], offset + unknown_start, is_unk=True))

    def encode(self, text: str, ext_table: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
        """Ids of ``text`` and the ext table extended with its unknown pieces and specials that
        are not vocabulary entries (``ext_table`` itself is not modified)."""
        table = dict(ext_table or {})
        return self.encode_into(text, table, {value: key for key, value in table.items()}), table

    def encode_into(self, text: str, table: dict[int, str], ids_of: dict[str, int]) -> list[int]:
        """``encode`` that extends ``table`` and its inverse ``ids_of`` in place: the segments of
        one example share them, and copying them for each segment made a task's cost grow with
        the square of its segments."""
        ids = []
        for piece in self.tokenize(text):
            if piece.is_unk or (piece.is_special and piece.token not in self.encoder):
                if piece.token not in ids_of:
                    ids_of[piece.token] = self.vocab_size + len(ids_of)
                    table[ids_of[piece.token]] = piece.token
                ids.append(ids_of[piece.token])
            else:
                ids.append(self.encoder[piece.token])
        return ids

    def decode(self, ids: Iterable[int], ext_table: dict[int, str] | None = None) -> str:
        """Text of ``ids``: ordinary pieces escaped (``<`` as ``<<``), specials and ext entries as
        written, so decoding then encoding gives the ids back."""
        table = ext_table or {}
        out = []
        for token_id in ids:
            if token_id in table:
                out.append(table[token_id])
            elif 0 <= token_id < self.vocab_size:
                token = self.tokens[token_id]
                out.append(token if token in self.specials else escape(token))
        return "".join(out)

    def text_of(self, ids: Iterable[int], ext_table: dict[int, str] | None = None) -> str:
        """``decode`` for showing to people: ordinary ``<`` unescaped."""
        return unescape(self.decode(ids, ext_table))


def build_vocab(texts: Iterable[str], size: int, min_char_count: int = 2) -> list[str]:
    """A CPM-Bee vocabulary of ``size`` entries for greedy longest-match tokenizing: the special
    tokens at their published ids, every character seen ``min_char_count`` times, then the most
    frequent Chinese words (jieba's segmentation) and English words (with and without their
    leading space) and digit groups, by count."""
    import re
    from collections import Counter

    import jieba

    jieba.setLogLevel(60)
    chars: Counter[str] = Counter()
    words: Counter[str] = Counter()
    latin = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}")
    for text in texts:
        chars.update(text)
        for match in latin.findall(text):
            words[match] += 1
            if match.startswith(" "):
                words[match[1:]] += 1
        for word in jieba.lcut(text):
            if 2 <= len(word) <= 4 and all("\u4e00" <= c <= "\u9fff" for c in word):
                words[word] += 1
    tokens = list(SPECIALS) + ["<eod>"]
    taken = set(tokens) | {"\n", " "}
    for char, count in chars.most_common():
        if count >= min_char_count and char not in taken and char.isprintable():
            tokens.append(char)
            taken.add(char)
    for word, _ in words.most_common():
        if len(tokens) >= size:
            break
        if word not in taken and len(word) > 1:
            tokens.append(word)
            taken.add(word)
    return tokens[:max(size, len(SPECIALS) + 1)]


__all__ = ["BEE_3B_MISSING", "BeeTokenizer", "build_vocab", "Piece", "SPECIALS", "escape", "split_specials", "unescape"]
