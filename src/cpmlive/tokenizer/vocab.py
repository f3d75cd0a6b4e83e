"""Build a CPM-Ant-style vocabulary for a new corpus.

The layout follows the published CPM-Ant vocabulary: the ten control tokens
at ids 0..9, then single characters, then multi-character words. Every
character of the corpus gets a token (size permitting), so text made of seen
characters always round-trips through ``AntTokenizer``. It takes texts: reading corpus files
is ``cpmlive.data.corpora``'s.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.ant import AntTokenizer, jieba_pieces

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>")
MIN_VOCAB_SIZE = 16


def _ranked(counts: Counter[str]) -> list[str]:
    """Most frequent first; ties broken by the string itself, for determinism."""
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _is_word(piece: str) -> bool:
    """Multi-character jieba piece made only of letters/digits (CJK included)."""
    return len(piece) > 1 and all(ch.isalnum() for ch in piece)


def build_vocab(texts: Iterable[str], size: int, min_char_count: int = 1) -> list[str]:
    """Vocabulary of at most ``size`` tokens, in file form (``</_>``, ``</n>``).

    Whitespace characters get no token of their own: space and newline are
    ``</_>`` and ``</n>``; other whitespace becomes ``<unk>``, as in CPM-Ant.
    When ``size`` cannot hold every character, the rarest are left out.
    """
    if size < MIN_VOCAB_SIZE:
        raise CpmliveError(f"vocabulary size {size} is too small (at least {MIN_VOCAB_SIZE})")
    char_counts: Counter[str] = Counter()
    word_counts: Counter[str] = Counter()
    for text in texts:
        char_counts.update(text)
        word_counts.update(piece for piece in jieba_pieces(text) if _is_word(piece))
    room = size - len(SPECIAL_TOKENS)
    chars = [ch for ch in _ranked(char_counts) if char_counts[ch] >= min_char_count and not ch.isspace()]
    chars = chars[:room]
    words = _ranked(word_counts)[: room - len(chars)]
    return [*SPECIAL_TOKENS, *chars, *words]


# CPM-2's first ids, as its published vocabulary has them (id 9 is a CJK comma there too).
CPM2_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", "，", "\u2582")
CPM2_SENTINELS = 190


def build_cpm2_vocab(texts: Iterable[str], size: int) -> list[str]:
    """A vocabulary laid out as CPM-2's: its eleven first tokens (``▂`` a space, ``▃`` a newline),
    the corpus's characters and words as :func:`build_vocab` ranks them, then the sentinels
    ``<s_0>`` ... ``<s_189>`` in the last ids."""
    room = size - len(CPM2_SPECIAL_TOKENS) - CPM2_SENTINELS
    if room < MIN_VOCAB_SIZE:
        raise CpmliveError(f"vocabulary size {size} is too small for CPM-2's layout")
    ranked = build_vocab(texts, room + len(SPECIAL_TOKENS) + 1)[len(SPECIAL_TOKENS):]
    pieces = [piece for piece in ranked if piece not in CPM2_SPECIAL_TOKENS][:room]
    return [*CPM2_SPECIAL_TOKENS, *pieces, *(f"<s_{i}>" for i in range(CPM2_SENTINELS))]


def save_vocab(tokens: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Check ``tokens`` form a usable vocabulary, then write it atomically."""
    AntTokenizer(tokens, source=str(path)).save(path)
