"""Readers of the real Chinese corpora that npm and Debian packages ship.

Each reader fetches its package once (``cpmlive.data.fetch``) and yields
cleaned documents (``normalize_width``), typically 20–2000 characters; longer
pages and chapters are cut at line boundaries (``split_document``):

* ``chinese-poetry`` (npm 2.0.1, MIT): one document per poem or chapter,
  ``author《title》`` then its lines, converted to simplified script with
  OpenCC ``t2s`` (全唐诗/全宋诗 and most 蒙学 texts are traditional).
* ``libreoffice-help`` (Debian ``libreoffice-help-zh-cn``, MPL-2.0): one
  document per help page, its title and paragraphs.
* ``manpages-zh`` (Debian, GFDL): one document per man page section, headed
  ``name(section) heading``.
* ``debian-docs-zh`` (Debian reference, new maintainers' guide, FAQ; GPL):
  one document per paragraph, with the heading before it and the list after it.
* ``fortunes-zh`` (Debian, GPL): one document per fortune record.

Untranslated English, code listings, tables of contents and text repeated on
many pages (navigation, colophons) are dropped: they teach a Chinese model
nothing and would dominate the counts.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from cpmlive.data.fetch import deb_members, fetch_debian_package, fetch_npm_package, tar_members
from cpmlive.data.markup import html_blocks, join_wrapped, roff_sections, strip_ansi, tag_is
from cpmlive.data.text import cjk_count, cjk_share, normalize_width, split_document
from cpmlive.errors import CpmliveError

CacheDir = str | os.PathLike[str] | None

CHINESE_POETRY = ("chinese-poetry", "2.0.1")
LIBREOFFICE_HELP = ("libreoffice-help-zh-cn", "4:7.4.7-1+deb12u14")
MANPAGES_ZH = ("manpages-zh", "1.6.4.0-1")
DEBIAN_DOCS_ZH = (("debian-reference-zh-cn", "2.100"), ("maint-guide-zh-cn", "1.2.53"), ("debian-faq-zh-cn", "11.1"))
FORTUNES_ZH = ("fortunes-zh", "2.98")

MIN_CJK_SHARE = 0.3
# A line of a man page is dropped as untranslated only when it is also a
# sentence: option tags such as ``-a, --all`` have no ideographs either.
UNTRANSLATED_WORDS = 6
# Text on more than this share of a package's pages is navigation or a colophon.
BOILERPLATE_SHARE = 0.02
BOILERPLATE_MIN_PAGES = 5

_LATIN_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def mostly_foreign(text: str) -> bool:
    """Fewer than ``MIN_CJK_SHARE`` of the visible characters are ideographs."""
    return cjk_share(text) < MIN_CJK_SHARE


def drop_boilerplate(pages: list[list[str]]) -> list[list[str]]:
    """The pages without the lines found on more than ``BOILERPLATE_SHARE`` of
    them and on more than ``BOILERPLATE_MIN_PAGES``: repeated navigation,
    section labels ("相关主题", "语法:"), translators' colophons."""
    seen = Counter(line for page in pages for line in set(page))
    limit = max(BOILERPLATE_MIN_PAGES, int(BOILERPLATE_SHARE * len(pages)))
    return [[line for line in page if seen[line] <= limit] for page in pages]


# ---- chinese-poetry (npm) ---------------------------------------------------------------------------

POETRY_PREFIX = "package/dist/"
POETRY_FILES = (
    "quantangshi/poet.tang.*.json", "quantangshi/poet.song.*.json", "songci/ci.song.*.json", "yuanqu/*.json",
    "shijing/*.json", "chuci/*.json", "lunyu/*.json", "sishuwujing/*.json", "mengxue/*.json",
    "wudaishici/*.json", "nalanxingde/*.json", "caocaoshiji/*.json", "youmengying/*.json",
)
_TEXT_KEYS = ("paragraphs", "content", "para")
_TITLE_KEYS = ("title", "subchapter", "chapter", "rhythmic")
# Lost characters (□ ● ■), characters spelt as components ({亻壘}, =), private
# use code points, stray Latin/digits and editors' notes (〖1〗…) mark a
# damaged transcription: such poems are skipped.
_GARBLED_RE = re.compile(r"[□■●{}=〖〗\[\]［］A-Za-z0-9\ue000-\uf8ff\ufffd]")
_EDITOR_FILL_RE = re.compile(r"[\[［]([\u4e00-\u9fff])[\]］]")
_EDITOR_NOTE_RE = re.compile(r"（[^（）]*）|\([^()]*\)")
_AUTHOR_DYNASTY_RE = re.compile(r"^\s*(?:[（(][^）)]*[）)]|[^：:]{1,4}[：:])")
MAX_AUTHOR_CHARS = 10
# Share of ideographs t2s changes in traditional text: ~0.2-0.4 (全唐诗 0.30);
# in the simplified collections at most 0.007.
TRADITIONAL_SHARE = 0.1


def is_poetry_text(name: str) -> bool:
    """Whether tarball member ``name`` is one of the text collections read
    (``rank/``, ``strains/``, ``quantangshi/error/``, author files and
    ``yudingquantangshi``, a duplicate of 全唐诗, are not)."""
    if not name.startswith(POETRY_PREFIX):
        return False
    rest = name[len(POETRY_PREFIX):]
    return any(fnmatch.fnmatchcase(rest, pattern) for pattern in POETRY_FILES) and "/error/" not in rest


def _t2s() -> Callable[[str], str]:
    """OpenCC's traditional→simplified converter (imported here: only two readers need it)."""
    try:
        import opencc
    except ImportError as exc:
        raise CpmliveError("reading classical Chinese needs the opencc package (pip install opencc==1.1.9)") from exc
    return opencc.OpenCC("t2s").convert


def to_simplified(text: str, convert: Callable[[str], str]) -> str:
    """``text`` in simplified script when it is traditional, else unchanged.

    ``t2s`` is not a no-op on simplified text (乾 → 干, rare characters become
    extension-B forms such as 壈 → 𡒄), so the conversion is kept only when at
    least ``TRADITIONAL_SHARE`` of the ideographs change.
    """
    converted = convert(text)
    changed = sum(a != b for a, b in zip(text, converted)) + abs(len(text) - len(converted))
    return converted if changed >= TRADITIONAL_SHARE * max(cjk_count(text), 1) else text


def clean_author(author: object) -> str:
    """``（唐）孟浩然``/``先秦：左丘明 `` → the name; biographies and non-strings → ``""``."""
    if not isinstance(author, str):
        return ""
    name = re.split(r"[（(，,]", _AUTHOR_DYNASTY_RE.sub("", author), maxsplit=1)[0].strip()
    return name if len(name) <= MAX_AUTHOR_CHARS else ""


def _text_lines(node: dict) -> list[str] | None:
    for key in _TEXT_KEYS:
        value = node.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return value
    return None


def _title(node: dict) -> str:
    return next((node[key] for key in _TITLE_KEYS if isinstance(node.get(key), str) and node[key].strip()), "")


def poetry_entries(node: object, book: str = "", author: str = "") -> Iterator[tuple[str, str, list[str]]]:
    """``(title, author, lines)`` of each text in a chinese-poetry JSON value.

    Files are lists of poems or, for 蒙学 books, one book whose ``content``
    nests volumes and chapters; a chapter without an author of its own is
    titled ``book·chapter`` and takes the book's author.
    """
    if isinstance(node, list):
        for item in node:
            yield from poetry_entries(item, book, author)
        return
    if not isinstance(node, dict):
        return
    own_author = clean_author(node.get("author"))
    title = _title(node)
    lines = _text_lines(node)
    if lines is not None:
        full_title = f"{book}·{title}" if book and title and not own_author else (title or book)
        yield full_title, own_author or author, lines
    elif isinstance(node.get("content"), list):
        yield from poetry_entries(node["content"], book or title, own_author or author)


def _clean_poem_line(line: str) -> str:
    return _EDITOR_NOTE_RE.sub("", _EDITOR_FILL_RE.sub(r"\1", line)).strip()


def poem_document(title: str, author: str, lines: list[str]) -> str | None:
    """``author《title》`` and the lines, ``\\n``-joined; None when the text is
    empty or damaged (see ``_GARBLED_RE``). Editors' notes in brackets go."""
    body = [text for text in map(_clean_poem_line, lines) if text]
    if not body or any(_GARBLED_RE.search(text) for text in body):
        return None
    title = "" if _GARBLED_RE.search(title) else title.strip()
    if title:
        body.insert(0, f"{author}《{title}》" if author else f"《{title}》")
    return "\n".join(body)


def chinese_poetry(cache_dir: CacheDir = None) -> Iterator[str]:
    """Poems and classics of npm ``chinese-poetry`` 2.0.1 (~22 M chars), in simplified script."""
    archive = fetch_npm_package(*CHINESE_POETRY, cache_dir=cache_dir)
    convert = _t2s()
    for name, data in tar_members(archive, is_poetry_text):
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise CpmliveError(f"{archive}: {name} is not valid JSON ({exc}); delete it to fetch it again") from exc
        for title, author, lines in poetry_entries(value):
            document = poem_document(title, author, lines)
            if document is not None:
                yield from split_document(normalize_width(to_simplified(document, convert)).split("\n"))


# ---- LibreOffice help (Debian) ----------------------------------------------------------------------

HELP_PREFIX = "usr/share/libreoffice/help/zh-CN/text/"
_HELP_ROOT = tag_is("div", id="DisplayArea")
_HELP_SKIP = (tag_is("script"), tag_is("style"), tag_is("*", cls="howtogetheader"))


def help_page_lines(html: str) -> list[str]:
    """Title and paragraphs of one help page, mostly-English ones dropped."""
    texts = (normalize_width(text) for _, text in html_blocks(html, root=_HELP_ROOT, skip=_HELP_SKIP))
    return [text for text in texts if text and not mostly_foreign(text)]


def libreoffice_help(cache_dir: CacheDir = None) -> Iterator[str]:
    """LibreOffice 7.4 help in Chinese (2,561 pages), one document per page with more than a title."""
    deb = fetch_debian_package(*LIBREOFFICE_HELP, cache_dir=cache_dir)
    members = deb_members(deb, lambda name: name.startswith(HELP_PREFIX) and name.endswith(".html"))
    pages = [help_page_lines(data.decode("utf-8", "replace")) for _, data in members]
    for lines in drop_boilerplate(pages):
        if len(lines) > 1:
            yield from split_document(lines)


# ---- manpages-zh (Debian) ---------------------------------------------------------------------------

MAN_PREFIX = "usr/share/man/zh_CN/man"
_WORD_GAP_RE = re.compile(r"(?<=[\u4e00-\u9fff]) +(?=[\u4e00-\u9fff])")


def man_page_name(path: str) -> str:
    """``…/man1/ls.1.gz`` → ``ls(1)``."""
    stem = PurePosixPath(path).name.removesuffix(".gz")
    name, _, section = stem.rpartition(".")
    return f"{name}({section})" if name else stem


def _untranslated(line: str) -> bool:
    return mostly_foreign(line) and len(_LATIN_WORD_RE.findall(line)) >= UNTRANSLATED_WORDS


def man_page_sections(name: str, source: str) -> list[list[str]]:
    """Each section of a page as lines: ``name heading`` then its text.

    Untranslated English sentences go, and so do sections whose text is
    mostly not Chinese (synopses, lists of references). Older translations
    put spaces between words (``函数 返回 除去``); Chinese has none, so they go too.
    """
    sections = []
    for heading, lines in roff_sections(source):
        texts = (_WORD_GAP_RE.sub("", normalize_width(line)) for line in lines)
        body = [text for text in texts if text and not _untranslated(text)]
        if body and not mostly_foreign("\n".join(body)):
            sections.append([normalize_width(f"{name} {heading}"), *body])
    return sections


def is_man_source(name: str) -> bool:
    """A zh_CN roff page (symbolic links are not regular files, so they never get here)."""
    return name.startswith(MAN_PREFIX) and name.endswith(".gz")


def _man_sources(deb_path: Path) -> Iterator[tuple[str, str]]:
    for path, data in deb_members(deb_path, is_man_source):
        try:
            yield path, gzip.decompress(data).decode("utf-8", "replace")
        except (OSError, EOFError) as exc:
            raise CpmliveError(f"{deb_path}: {path} is not valid gzip ({exc}); "
                               "delete the .deb to fetch it again") from exc


def manpages_zh(cache_dir: CacheDir = None) -> Iterator[str]:
    """The zh_CN man pages of ``manpages-zh`` (704 pages, zh_TW copies and links skipped), one document a section."""
    deb = fetch_debian_package(*MANPAGES_ZH, cache_dir=cache_dir)
    sections = [section for path, source in _man_sources(deb)
                for section in man_page_sections(man_page_name(path), source)]
    for title, *body in drop_boilerplate(sections):
        if body:
            yield from split_document([title, *body])


# ---- Debian documentation (Debian) ------------------------------------------------------------------

_DOCBOOK_ROOT = tag_is("body")
_DOCBOOK_SKIP = tuple(tag_is("div", cls=name) for name in (
    "navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "list-of-examples", "table",
    "informaltable", "example", "informalexample",
)) + tuple(tag_is(name) for name in ("pre", "table", "sup", "script", "style"))
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_LIST_ITEMS = {"li", "dt", "dd"}


def docbook_paragraphs(html: str) -> Iterator[list[str]]:
    """Paragraphs of a DocBook HTML page as lines: the heading before it (if
    any), the paragraph, and the list items that follow it, since a list
    mostly completes the sentence that introduces it. Code, tables, tables of
    contents and mostly-English text are dropped."""
    heading = ""
    lines: list[str] = []
    for tag, raw in html_blocks(html, root=_DOCBOOK_ROOT, skip=_DOCBOOK_SKIP):
        text = normalize_width(raw)
        if not text or mostly_foreign(text):
            continue
        if tag in _LIST_ITEMS and lines:
            lines.append(text)
            continue
        if lines:
            yield lines
            lines = []
        if tag in _HEADINGS:
            heading = text
        else:
            lines = [heading, text] if heading else [text]
            heading = ""
    if lines:
        yield lines


def debian_docs_zh(cache_dir: CacheDir = None) -> Iterator[str]:
    """Paragraphs of the Debian reference, the new maintainers' guide and the Debian FAQ in Chinese."""
    for package in DEBIAN_DOCS_ZH:
        deb = fetch_debian_package(*package, cache_dir=cache_dir)
        for _, data in deb_members(deb, lambda name: name.endswith(".zh-cn.html")):
            for lines in docbook_paragraphs(data.decode("utf-8", "replace")):
                yield from split_document(lines)


# ---- fortunes-zh (Debian) ---------------------------------------------------------------------------

FORTUNE_FILES = ("usr/share/games/fortunes/chinese", "usr/share/games/fortunes/tang300",
                 "usr/share/games/fortunes/song100")
# Lines this wide (in terminal columns) were wrapped by the file's author.
FORTUNE_WRAP_COLUMNS = 64
_RECORD_SPLIT_RE = re.compile(r"^%[ \t]*$", re.MULTILINE)
_BOX_DRAWING_RE = re.compile(r"[\u2500-\u257f]")
_ATTRIBUTION_RE = re.compile(r"^\s+--\s*")


def _columns(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in line)


def _unwrap(lines: Iterable[str]) -> list[str]:
    """Re-join hard-wrapped prose: a line as wide as the wrap column continues on the next one."""
    joined: list[str] = []
    wrapped = False
    for line in lines:
        if wrapped and line.strip() and not _ATTRIBUTION_RE.match(line):
            joined[-1] = join_wrapped(f"{joined[-1]}\n{line}")
        else:
            joined.append(line)
        wrapped = _columns(line) >= FORTUNE_WRAP_COLUMNS
    return joined


def fortune_record(record: str) -> str:
    """One fortune as plain text: colours and box-drawn tables removed, wrapped
    lines re-joined, the ``-- source`` attribution written ``——source``."""
    lines = [line for line in strip_ansi(record).split("\n") if not _BOX_DRAWING_RE.search(line)]
    lines = [_ATTRIBUTION_RE.sub("——", line) if _ATTRIBUTION_RE.match(line) else line for line in _unwrap(lines)]
    return normalize_width("\n".join(lines))


def fortune_records(text: str, convert: Callable[[str], str]) -> Iterator[str]:
    """Records of a ``%``-separated fortune file, cleaned and in simplified
    script (some classics are traditional), mostly-English ones dropped."""
    for record in _RECORD_SPLIT_RE.split(text):
        cleaned = fortune_record(record)
        if cleaned and not mostly_foreign(cleaned):
            yield to_simplified(cleaned, convert)


def fortunes_zh(cache_dir: CacheDir = None) -> Iterator[str]:
    """Proverbs, classics and quotations (``chinese``), 唐诗三百首 and 宋词一百首 of fortunes-zh."""
    deb = fetch_debian_package(*FORTUNES_ZH, cache_dir=cache_dir)
    convert = _t2s()
    for _, data in deb_members(deb, lambda name: name in FORTUNE_FILES):
        for record in fortune_records(data.decode("utf-8", "replace"), convert):
            yield from split_document(record.split("\n"))
