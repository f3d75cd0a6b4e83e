"""The CPM-Ant tokenizer, in its two flavours.

* OpenBMB mode (default) reproduces ``cpm_live/tokenizers/ant.py``: jieba
  (accurate mode, HMM on) splits the text into pieces, and every piece is cut
  into vocabulary entries by greedy longest-prefix matching.
* HF mode (``hf_compat=True``) reproduces ``transformers.CpmAntTokenizer``:
  rjieba with HMM off, literal special-token strings split out of the text
  first, ``<s>`` prepended by ``encode``, and HF's decoding rules.

Both load the same vocabulary file, in which ``</_>`` and ``</n>`` stand for a
space and a newline; in memory those two entries *are* ``" "`` and ``"\\n"``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.special import SpecialIds, token_id_property
from cpmlive.utils import atomic_write_text

SPACE_TOKEN = "</_>"
NEWLINE_TOKEN = "</n>"
_RENAMES = {SPACE_TOKEN: " ", NEWLINE_TOKEN: "\n"}
_FILE_FORMS = {v: k for k, v in _RENAMES.items()}
REQUIRED_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
UNK_TOKEN = "<unk>"
VOCAB_FILE = "vocab.txt"  # the file a checkpoint keeps its vocabulary in

# Longer pre-tokenizer pieces become a single <unk>, in both implementations.
MAX_PIECE_CHARS = 200

# The special tokens HF CpmAntTokenizer splits out of raw text before running
# rjieba. `</n>` and `</_>` are among them although they are no longer in its
# vocabulary, so a literal "</n>" in the text encodes to <unk>. `<mask>` is not.
HF_LITERAL_SPECIALS = ("<s>", "</s>", "<unk>", "<pad>", "<d>", "</d>", "</n>", "</_>")
_HF_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in HF_LITERAL_SPECIALS) + ")")
# Ids that HF decode removes when skip_special_tokens=True (the literal
# specials that have an id of their own; `</n>`/`</_>` map to <unk>).
_HF_SKIPPED_ON_REQUEST = ("<s>", "</s>", "<unk>", "<pad>", "<d>", "</d>")

# Control entries such as <pad>, <mask>, <s12>; skipped by OpenBMB-mode decode
# when skip_special_tokens=True.
_CONTROL_TOKEN_RE = re.compile(r"<[^<>\s]+>")

_jieba_lock = threading.Lock()
_jieba_tokenizer: Any = None


def _jieba() -> Any:
    """A private jieba tokenizer (made once, on first use), whose dictionary loads only the
    entries a text needs (:mod:`cpmlive.tokenizer.jieba_dict`).

    A private instance keeps words that other code adds to jieba's global
    dictionary from changing our segmentation.
    """
    global _jieba_tokenizer
    if _jieba_tokenizer is None:
        with _jieba_lock:
            if _jieba_tokenizer is None:
                from cpmlive.tokenizer.jieba_dict import Segmenter

                _jieba_tokenizer = Segmenter()
    return _jieba_tokenizer


def jieba_pieces(text: str) -> list[str]:
    """The pieces of ``jieba.cut(text, cut_all=False)`` (accurate mode, HMM on)."""
    return list(_jieba().cut(text, cut_all=False, HMM=True))


def rjieba_pieces(text: str) -> list[str]:
    """The pieces of ``rjieba.cut(text, False)`` (HMM off), as HF uses them."""
    import rjieba

    return list(rjieba.cut(text, False))


def longest_match(piece: str, ids: dict[str, int], longest: int, unk_id: int) -> list[int]:
    """Greedy longest-prefix match of one pre-tokenizer piece over a vocabulary (``longest``: its
    longest entry's length); a character no entry starts with is ``unk_id``, and so is a piece of
    more than :data:`MAX_PIECE_CHARS` characters, whole (CPM-Ant's and CPM-2's rule)."""
    if len(piece) > MAX_PIECE_CHARS:
        return [unk_id]
    out: list[int] = []
    start, length = 0, len(piece)
    while start < length:
        end = min(length, start + longest)
        while end > start and piece[start:end] not in ids:
            end -= 1
        if end == start:
            out.append(unk_id)
            start += 1
        else:
            out.append(ids[piece[start:end]])
            start = end
    return out


def write_vocab_file(tokens: Iterable[str], path: str | os.PathLike[str]) -> None:
    """Write one token per line (file form), replacing ``path`` atomically."""
    target = Path(path)
    text = "".join(_FILE_FORMS.get(token, token) + "\n" for token in tokens)
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise CpmliveError(f"cannot write vocabulary file {target}: {exc.strerror}") from exc


def _read_vocab_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CpmliveError(f"vocabulary file not found: {path}") from exc
    except OSError as exc:
        raise CpmliveError(f"cannot read vocabulary file {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CpmliveError(f"vocabulary file {path} is not UTF-8 (line {line})") from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise CpmliveError(f"vocabulary file {path} is empty")
    for number, line in enumerate(lines, 1):
        if not line:
            raise CpmliveError(f"vocabulary file {path} has an empty line {number}")
    return lines


def check_not_sentencepiece(vocab: Path) -> None:
    """A SentencePiece model given for a one-token-a-line vocabulary is refused in one line (it is CPM-1's)."""
    with open(vocab, "rb") as handle:
        head = handle.read(4096)
    if b"\x00" in head:
        raise CpmliveError(f"{vocab}: a binary (SentencePiece) model is CPM-1's vocabulary; this checkpoint reads a "
                           f"one-token-a-line {VOCAB_FILE}")


def _check_tokens(tokens: Sequence[str], source: str) -> None:
    if not tokens:
        raise CpmliveError(f"vocabulary {source} is empty")
    seen: set[str] = set()
    for index, token in enumerate(tokens):
        if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
            raise CpmliveError(f"vocabulary {source}: entry {index} ({token!r}) is empty or contains whitespace")
        if token in seen:
            raise CpmliveError(f"vocabulary {source}: entry {index} ({token!r}) is a duplicate")
        seen.add(token)
    missing = [t for t in REQUIRED_TOKENS if t not in seen]
    if missing:
        raise CpmliveError(f"vocabulary {source} lacks the special token(s) {' '.join(missing)}")


class AntTokenizer(SpecialIds):
    """CPM-Ant tokenizer over a vocabulary given in file form (``</_>``, ``</n>``)."""

    def __init__(self, tokens: Sequence[str], hf_compat: bool = False, *, source: str = "(in memory)") -> None:
        tokens = list(tokens)
        _check_tokens(tokens, source)
        self.hf_compat = hf_compat
        self._tokens = [_RENAMES.get(t, t) for t in tokens]
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        self._max_token_len = max(len(t) for t in self._tokens)
        self._pad_id = self._ids["<pad>"]
        self._unk_id = self._ids[UNK_TOKEN]
        self._bos_id = self._ids["<s>"]
        self._eos_id = self._ids["</s>"]
        self._control_ids = frozenset(
            i for i, t in enumerate(tokens) if _CONTROL_TOKEN_RE.fullmatch(t) and t not in _RENAMES
        )
        self._hf_always_dropped = frozenset((self._pad_id, self._bos_id, self._eos_id))
        self._hf_skipped = frozenset(self._hf_special_id(t) for t in HF_LITERAL_SPECIALS)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], hf_compat: bool = False) -> AntTokenizer:
        """Load a vocabulary file: one token per line, id = line index."""
        path = Path(path)
        return cls(_read_vocab_lines(path), hf_compat=hf_compat, source=str(path))

    @classmethod
    def for_model(cls, vocab: Path, vocab_size: int, hf_compat: bool = False) -> AntTokenizer:
        """The tokenizer of a checkpoint's vocabulary file, refused in one line when it is a
        SentencePiece model (CPM-1's) or does not have the embedding's ``vocab_size`` tokens."""
        check_not_sentencepiece(vocab)
        tokenizer = cls.from_file(vocab, hf_compat=hf_compat)
        if tokenizer.vocab_size != vocab_size:
            raise CpmliveError(f"vocabulary has {tokenizer.vocab_size} tokens, the model expects {vocab_size}")
        return tokenizer

    @classmethod
    def reads(cls, vocab: str | os.PathLike[str]) -> bool:
        """Whether ``vocab`` is this tokenizer's kind of file: any (one token a line) that no other claims."""
        return True

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary file, with ``</_>`` and ``</n>`` in file form."""
        write_vocab_file(self._tokens, path)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    newline_id = token_id_property("\n")
    space_id = token_id_property(" ")
    bod_id = token_id_property("<d>")
    eod_id = token_id_property("</d>")

    def token_to_id(self, token: str) -> int | None:
        """Id of a token in memory form (``" "``, ``"\\n"``), or None."""
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        """Token string of an id (memory form); CpmliveError when out of range."""
        if not 0 <= token_id < len(self._tokens):
            raise CpmliveError(f"token id {token_id} is outside the vocabulary (size {len(self._tokens)})")
        return self._tokens[token_id]

    def pieces_with_ids(self, text: str) -> list[tuple[str, int]]:
        """(token string, id) for every token of ``text``, without ``<s>``."""
        if self.hf_compat:
            return self._hf_pairs(text)
        pairs: list[tuple[str, int]] = []
        for piece in jieba_pieces(text):
            pairs.extend(self._match_piece(piece))
        return pairs

    def tokenize(self, text: str) -> list[str]:
        return [token for token, _ in self.pieces_with_ids(text)]

    def encode(self, text: str) -> list[int]:
        """OpenBMB: raw ids, ``<unk>`` kept, no ``<s>``. HF: ``tokenizer(text)["input_ids"]``."""
        ids = [token_id for _, token_id in self.pieces_with_ids(text)]
        return [self._bos_id, *ids] if self.hf_compat else ids

    def encode_for_model(self, text: str) -> list[int]:
        """The ids CPM-Live feeds the model: ``<s>`` then the ids without ``<unk>`` (HF: as ``encode``)."""
        if self.hf_compat:
            return self.encode(text)
        return [self._bos_id, *(i for i in self.encode(text) if i != self._unk_id)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Concatenate token strings; negative ids are dropped.

        HF mode also always drops ``<pad>``, ``<s>`` and ``</s>``, and turns
        unknown ids into ``<unk>`` as ``CpmAntTokenizer.decode`` does.
        """
        id_list = [int(i) for i in ids]
        if self.hf_compat:
            return self._hf_decode(id_list, skip_special_tokens)
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._control_ids]
        return "".join(self.id_to_token(i) for i in id_list if i >= 0)

    def _match_piece(self, piece: str) -> list[tuple[str, int]]:
        """Greedy longest-prefix match of one pre-tokenizer piece."""
        return [(UNK_TOKEN if i == self._unk_id else self._tokens[i], i)
                for i in longest_match(piece, self._ids, self._max_token_len, self._unk_id)]

    def _hf_special_id(self, token: str) -> int:
        return self._ids.get(token, self._unk_id)

    def _hf_pairs(self, text: str) -> list[tuple[str, int]]:
        pairs: list[tuple[str, int]] = []
        for index, part in enumerate(_HF_SPECIAL_RE.split(text)):
            if not part:
                continue
            if index % 2:
                pairs.append((part, self._hf_special_id(part)))
                continue
            for piece in rjieba_pieces(part):
                pairs.extend(self._match_piece(piece))
        return pairs

    def _hf_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        dropped = self._hf_always_dropped | self._hf_skipped if skip_special_tokens else self._hf_always_dropped
        size = len(self._tokens)
        return "".join(
            self._tokens[i] if i < size else UNK_TOKEN for i in ids if i >= 0 and i not in dropped
        )
