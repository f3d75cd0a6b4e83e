"""Build a CPM-Ant-style vocabulary for a new corpus.

The layout follows the published CPM-Ant vocabulary: the ten control tokens
at ids 0..9, then single characters, then multi-character words. Every
character of the corpus gets a token (size permitting), so text made of seen
characters always round-trips through ``AntTokenizer``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

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


def save_vocab(tokens: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Check ``tokens`` form a usable vocabulary, then write it atomically."""
    AntTokenizer(tokens, source=str(path)).save(path)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _corpus_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path)))
            if not found:
                raise CpmliveError(f"corpus directory {path} contains no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CpmliveError(f"corpus file not found: {path}")
    return files


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CpmliveError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise CpmliveError(f'{path}: line {number} has no string "text" field')
    return text


def _file_texts(path: Path) -> Iterator[str]:
    is_jsonl = path.suffix.lower() == ".jsonl"
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CpmliveError(f"cannot read corpus file {path}: {exc.strerror}") from exc
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CpmliveError(f"{path}: line {number} is not valid UTF-8") from exc
            line = line.rstrip("\r\n")
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            yield _jsonl_text(line, path, number) if is_jsonl else line


def read_corpus_texts(paths: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """Texts of UTF-8 files (one per non-blank line; ``.jsonl``: the ``"text"`` field).

    Directories are read recursively, files in name order, hidden files
    skipped. Missing paths and empty directories are reported at once;
    decoding errors when the offending line is reached.
    """
    files = _corpus_files(paths)
    return (text for path in files for text in _file_texts(path))
