"""jieba's segmentation with its prefix dictionary loaded one first character at a time.

``jieba.Tokenizer.initialize`` unmarshals the whole prefix dictionary (about half a million
words and prefixes) before it cuts anything: for a one-shot ``cpmlive generate`` or ``title``
that costs about half as much CPU as importing torch. Segmenting a text only ever looks up
substrings of that text, so only the entries whose first character occurs in it are needed.

This keeps jieba's dictionary split by first character, each part marshalled on its own, in a
cache file under ``cpmlive/`` in ``$CPMLIVE_CACHE``, ``$XDG_CACHE_HOME`` or ``~/.cache`` (as
the native kernels), written once from jieba's own dictionary.
Before each cut the parts for the text's new characters are added to the tokenizer's plain
``FREQ`` dict, so jieba runs unchanged, with the same entries and total, and cuts exactly as a
fully initialised ``jieba.Tokenizer``. Without a usable cache directory it initialises jieba fully.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import threading
from pathlib import Path
from typing import Iterator

from cpmlive.utils import atomic_write_bytes

FORMAT = 1


def cache_dir() -> Path:
    """Where cpmlive keeps files it can rebuild, under the same root as the native kernels."""
    root = os.environ.get("CPMLIVE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cpmlive"


def cache_path(dictionary: Path) -> Path:
    """A name that changes with jieba's version and with the dictionary file's path, size and time."""
    import jieba

    stat = dictionary.stat()
    key = f"{FORMAT}:{jieba.__version__}:{dictionary.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_dir() / f"jieba-prefix-{hashlib.sha256(key.encode()).hexdigest()[:16]}.marshal"


def split_by_first_char(freq: dict[str, int]) -> dict[str, bytes]:
    parts: dict[str, dict[str, int]] = {}
    for word, count in freq.items():
        parts.setdefault(word[0], {})[word] = count
    return {char: marshal.dumps(part) for char, part in parts.items()}


def read_parts(path: Path) -> tuple[int, dict[str, bytes]] | None:
    """``(total, parts)`` from a cache file; None if it is not one this version wrote."""
    try:
        form, total, parts = marshal.loads(path.read_bytes())
    except (ValueError, EOFError, TypeError):
        return None
    return (total, parts) if form == FORMAT and isinstance(parts, dict) else None


class Segmenter:
    """``cut`` as ``jieba.Tokenizer().cut``, on a private tokenizer whose dictionary fills in on demand."""

    def __init__(self) -> None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        self.tokenizer = jieba.Tokenizer()
        self.lock = threading.Lock()
        self.parts: dict[str, bytes] = {}
        self.seen: set[str] = set()
        self.tokenizer.FREQ, self.tokenizer.total = {}, 0
        if not self._load_parts():
            self.tokenizer.initialize()

    def _load_parts(self) -> bool:
        """Read the split dictionary, (re)writing it first if it is missing or unreadable; False
        when the cache cannot be written."""
        import jieba

        try:
            path = cache_path(Path(jieba.__file__).parent / jieba.DEFAULT_DICT_NAME)
            loaded = read_parts(path) if path.is_file() else None
            if loaded is None:
                self._write_parts(path)
                loaded = read_parts(path)
        except (OSError, RuntimeError):  # RuntimeError: no home directory to put the cache under
            return False
        if loaded is None:
            return False
        self.tokenizer.total, self.parts = loaded
        self.tokenizer.initialized = True
        return True

    def _write_parts(self, path: Path) -> None:
        full = type(self.tokenizer)()
        full.initialize()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, marshal.dumps((FORMAT, full.total, split_by_first_char(full.FREQ))))

    def cover(self, text: str) -> None:
        """Add the dictionary entries that start with a character of ``text`` (once per character)."""
        new = set(text) - self.seen
        if not new or not self.parts:
            return
        with self.lock:
            for char in new - self.seen:
                part = self.parts.get(char)
                if part is not None:
                    self.tokenizer.FREQ.update(marshal.loads(part))
                self.seen.add(char)

    def cut(self, text: str, cut_all: bool = False, HMM: bool = True) -> Iterator[str]:  # noqa: N803 - jieba's name
        self.cover(text)
        return self.tokenizer.cut(text, cut_all=cut_all, HMM=HMM)


__all__ = ["Segmenter", "cache_dir", "cache_path"]
