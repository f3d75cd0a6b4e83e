"""Text normalisation shared by every corpus reader.

It lives apart from ``corpora`` (which re-exports ``normalize_width``) so that
the readers of packaged corpora can use it while ``corpora`` registers them,
without an import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Full-width forms U+FF01..U+FF5E map to ASCII by subtracting 0xFEE0, except
# the five sentence marks Chinese text keeps full-width (and which the CPM-Ant
# vocabulary has, while it lacks every other full-width form).
KEPT_FULL_WIDTH = "！，：；？"
WIDTH_TABLE = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F) if chr(code) not in KEPT_FULL_WIDTH}
WIDTH_TABLE[0x3000] = ord(" ")
# Marks the CPM-Ant vocabulary lacks, mapped to the forms it has.
_PUNCT_FORMS = {"…": "...", "『": "“", "』": "”", "「": "“", "」": "”", "∶": ":", "─": "—"}
WIDTH_TABLE.update({ord(mark): form for mark, form in _PUNCT_FORMS.items()})
_BLANKS_RE = re.compile(r"[^\S\n]+")
_CJK_MARKS = "，。！？：；、“”‘’《》【】"
_SPACE_BY_MARK_RE = re.compile(f" ?([{_CJK_MARKS}]) ?")

# Ideographs of the basic block, the range the corpus survey counts as "CJK".
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")
MAX_DOC_CHARS = 2000


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
    text = text.translate(WIDTH_TABLE)
    lines = (_clean_line(line) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_line(line: str) -> str:
    line = _BLANKS_RE.sub(" ", line).strip()
    return _SPACE_BY_MARK_RE.sub(r"\1", line)


def cjk_count(text: str) -> int:
    """Number of CJK ideographs (U+4E00..U+9FFF) in ``text``."""
    return len(_CJK_RE.findall(text))


def cjk_share(text: str) -> float:
    """Share of ideographs among the non-space characters (0 for blank text).

    Untranslated English help text, option tables and code have a low share,
    translated prose a high one, so one threshold separates them.
    """
    visible = sum(1 for char in text if not char.isspace())
    return cjk_count(text) / visible if visible else 0.0


def split_document(lines: Iterable[str], max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """``\\n``-joined runs of ``lines`` of at most ``max_chars`` each (a longer
    single line stands alone), so one long chapter or page becomes several
    documents of a size a training window takes whole."""
    piece: list[str] = []
    size = 0
    for line in lines:
        if piece and size + 1 + len(line) > max_chars:
            yield "\n".join(piece)
            piece, size = [], 0
        size += len(line) + (1 if piece else 0)
        piece.append(line)
    if piece:
        yield "\n".join(piece)
