"""Plain text out of the markup packaged corpora come in: HTML, roff and ANSI colours.

Everything is done in Python (``html.parser``, a small roff reader), so
preparing a corpus needs neither groff nor a browser engine. The goal is
readable running text, not a faithful rendering: code listings, tables of
contents and layout requests are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

Attrs = list[tuple[str, str | None]]
Match = Callable[[str, dict[str, str]], bool]

# A line break between two ideographs (or ideographic marks) is layout, not a
# word gap: Chinese has no spaces, so the break goes; elsewhere it is a space.
_CJK = r"\u3000-\u303f\u4e00-\u9fff\uff00-\uffef"
_BROKEN_CJK_RE = re.compile(f"(?<=[{_CJK}])[^\\S\\n]*\\n\\s*(?=[{_CJK}])")
_SPACES_RE = re.compile(r"\s+")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]?|\x1b")

HTML_BLOCKS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "li", "dt", "dd"})
HTML_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                       "track", "wbr"})


def strip_ansi(text: str) -> str:
    """Remove ANSI colour/cursor escape sequences (fortune files colour their attributions)."""
    return _ANSI_RE.sub("", text)


def join_wrapped(text: str) -> str:
    """Collapse HTML/roff whitespace: breaks between ideographs vanish, other runs become one space."""
    return _SPACES_RE.sub(" ", _BROKEN_CJK_RE.sub("", text)).strip()


def _classes(attrs: dict[str, str]) -> set[str]:
    return set(attrs.get("class", "").split())


def tag_is(tag: str, *, id: str | None = None, cls: str | None = None) -> Match:
    """A matcher for ``<tag id=…>``/``<tag class=…>`` (``tag="*"``: any tag), for ``html_blocks``."""
    def match(name: str, attrs: dict[str, str]) -> bool:
        return (tag in ("*", name) and (id is None or attrs.get("id") == id)
                and (cls is None or cls in _classes(attrs)))
    return match


@dataclass
class _Subtree:
    """An open element whose end is found by counting the nested tags of its name."""
    tag: str
    depth: int = 1

    def close(self, tag: str) -> _Subtree | None:
        """Self after end tag ``tag``, or None once the element itself has ended."""
        if tag == self.tag:
            self.depth -= 1
        return self if self.depth > 0 else None


class _BlockParser(HTMLParser):
    """Collects block texts; keeps only the open blocks, the root and the skipped subtree
    (void elements are never pushed, so unclosed ``<br>``/``<meta>`` cannot upset it)."""

    def __init__(self, root: Match | None, skip: tuple[Match, ...]) -> None:
        super().__init__(convert_charrefs=True)
        self.root = root
        self.skip = skip
        self.blocks: list[tuple[str, str]] = []
        self._root: _Subtree | None = None
        self._skipped: _Subtree | None = None
        self._open: list[tuple[str, list[str]]] = []

    def _inside(self) -> bool:
        return (self.root is None or self._root is not None) and self._skipped is None

    def handle_starttag(self, tag: str, attrs: Attrs) -> None:
        if tag in HTML_VOID:
            if tag == "br" and self._open:
                self._open[-1][1].append(" ")
            return
        values = {name: value or "" for name, value in attrs}
        if self.root is not None and self._root is None:
            if self.root(tag, values):
                self._root = _Subtree(tag)
            return
        for subtree in (self._root, self._skipped):
            if subtree is not None and subtree.tag == tag:
                subtree.depth += 1
        if self._skipped is None and any(match(tag, values) for match in self.skip):
            self._skipped = _Subtree(tag)
        elif self._inside() and tag in HTML_BLOCKS:
            self._flush_top()
            self._open.append((tag, []))

    def handle_startendtag(self, tag: str, attrs: Attrs) -> None:
        if tag in HTML_VOID:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if self._skipped is not None:
            self._skipped = self._skipped.close(tag)
        elif self._inside() and any(name == tag for name, _ in self._open):
            self._close_blocks(tag)
        if self._root is not None:
            self._root = self._root.close(tag)
            if self._root is None:
                self._close_blocks(None)

    def _close_blocks(self, tag: str | None) -> None:
        """Close open blocks up to the innermost ``tag`` (all of them for None)."""
        while self._open:
            name = self._open[-1][0]
            self._flush_top()
            self._open.pop()
            if name == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._open and self._inside():
            self._open[-1][1].append(data)

    def _flush_top(self) -> None:
        """Emit the text gathered so far by the innermost open block (a nested
        block starts a new one, so ``<li>a<p>b</p>c</li>`` gives a, b, c in order),
        tagged with the outermost open block: ``li`` for all three."""
        if not self._open:
            return
        parts = self._open[-1][1]
        text = join_wrapped("".join(parts))
        parts.clear()
        if text:
            self.blocks.append((self._open[0][0], text))


def html_blocks(html: str, root: Match | None = None, skip: tuple[Match, ...] = ()) -> list[tuple[str, str]]:
    """``(tag, text)`` of each text block (p, h1–h6, td, th, li, dt, dd) in document order;
    ``tag`` is the outermost block around the text (``li`` for ``<li><p>…``).

    Only what lies inside the first element ``root`` matches counts (all of it
    when ``root`` is None); elements any of ``skip`` matches are left out with
    everything inside them (code listings, tables of contents, navigation).
    """
    parser = _BlockParser(root=root, skip=skip)
    parser.feed(html)
    parser.close()
    return parser.blocks


# ---- roff -------------------------------------------------------------------------------------------

ROFF_GLYPHS = {
    "bu": "•", "em": "—", "en": "–", "hy": "-", "mi": "-", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "aq": "'", "dq": '"', "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "+-": "±",
    "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "ua": "↑", "da": "↓", "ti": "~", "ha": "^",
    "sl": "/", "rs": "\\", "ba": "|", "bv": "|", "br": "|", "ul": "_", "ru": "_", "ci": "○", "sq": "□",
    "fm": "′", "sd": "″", "pl": "+", "eq": "=", "**": "*", "L\"": "“", "R\"": "”", "Tm": "™", "R": "®",
    "--": "—",
}
_ROFF_PLAIN = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", ".": ".", "'": "'",
               "`": "`"}
_ROFF_ESCAPE_RE = re.compile(
    r"""\\(?:
      ["#].*                                  # comment to the end of the line
    | \((?P<two>..)                           # \(xx glyph
    | \[(?P<long>[^\]]*)\]                    # \[name] glyph
    | \*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))    # predefined string
    | [fFnmMgkY](?:\(..|\[[^\]]*\]|.)         # font, register, colour: no text
    | s[-+]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d\d?)?   # size change
    | [hvwlLoDbxXNRZSHC]'[^']*'               # motions, widths, drawing, overstrike
    | (?P<char>.)
    | $
    )""",
    re.VERBOSE,
)
_ROFF_ARG_RE = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')

_SECTION_MACROS = {"SH", "Sh"}
_SUBSECTION_MACROS = {"SS", "Ss"}
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_NOFILL_START = {"nf", "EX", "Vb", "CS", "DS", "Bd"}
_NOFILL_END = {"fi", "EE", "Ve", "CE", "DE", "Ed"}
_BLOCKS_UNTIL = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": ".TE", "EQ": ".EN"}
_BREAK_ONLY = {
    "PP", "LP", "P", "Pp", "Lp", "sp", "Sp", "br", "HP", "RS", "RE", "Bl", "El", "ne", "in", "ti", "bp",
    "TH", "Dd", "Dt", "Os", "PD", "IX", "UR", "UE", "MT", "ME", "ad", "na", "hy", "nh", "ft", "ps", "vs",
    "ll", "ta", "nr", "ds", "so", "mk", "ev", "rm", "rn", "tr", "cs", "ss", "pc", "lt", "ns", "rs", "ce",
    "fl", "AS", "BS", "BE", "VS", "VE", "SE", "SO", "if", "ie", "el", "TE", "EN", "cu", "ul",
    "wh", "ch", "it", "tm", "ab", "ex", "pl", "pn", "po", "ls", "lf", "hw", "hc", "nx", "rd", "pm", "fp",
    "Bk", "Ek", "Ns", "Sm", "Ud", "Ux", "An", "Rs", "Re", "%A", "%T", "%D", "%J", "%N", "%O", "%P", "%V",
}
# mdoc macros that may appear as words inside other mdoc lines; they are markup, not text.
_MDOC_CALLABLE = {
    "Ac", "Ao", "Ad", "Ar", "Aq", "Bc", "Bo", "Bq", "Cm", "Dc", "Do", "Dq", "Dv", "Ec", "Em", "Eo", "Er",
    "Ev", "Fa", "Fc", "Fl", "Fn", "Fo", "Ft", "Ic", "Li", "Nm", "No", "Ns", "Oc", "Oo", "Op", "Pa", "Pc",
    "Pf", "Po", "Pq", "Qc", "Ql", "Qo", "Qq", "Sc", "So", "Sq", "Sx", "Sy", "Tn", "Va", "Xc", "Xo", "Xr",
}


def _glyph(name: str) -> str:
    if name.startswith(("u", "U")) and re.fullmatch(r"[uU][0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    return ROFF_GLYPHS.get(name, "")


def _roff_escape(match: re.Match[str]) -> str:
    groups = match.groupdict()
    if groups["two"] is not None or groups["long"] is not None:
        return _glyph(groups["two"] or groups["long"])
    for string in ("s2", "sl", "s1"):
        if groups[string] is not None:
            return ROFF_GLYPHS.get(groups[string], "")
    char = groups["char"]
    if char is None:
        return ""
    if char in _ROFF_PLAIN:
        return _ROFF_PLAIN[char]
    return "" if char in "&|^,/%:cpardurzjE{}!?" else char


def roff_unescape(text: str) -> str:
    """Text with roff escapes resolved: glyphs (``\\(em`` → —, ``\\[u4E2D]`` → 中),
    ``\\-`` → ``-``, ``\\e`` → ``\\``; fonts, sizes, motions, comments and
    zero-width marks (``\\&``, ``\\|``) removed."""
    return _ROFF_ESCAPE_RE.sub(_roff_escape, text)


def _roff_args(line: str) -> list[str]:
    args = []
    for quoted, bare in _ROFF_ARG_RE.findall(line.replace("\\ ", "\0")):
        raw = quoted.replace('""', '"') if quoted or not bare else bare
        args.append(roff_unescape(raw).replace("\0", " "))
    return args


def _mdoc_text(name: str, args: list[str]) -> str:
    """The words of an mdoc line: ``Fl a`` → ``-a``, ``Xr ls 1`` → ``ls(1)``, markup words dropped."""
    words: list[str] = []
    flag = name == "Fl"
    for index, arg in enumerate(args):
        if arg in _MDOC_CALLABLE:
            flag = arg == "Fl"
            continue
        words.append(f"-{arg}" if flag else arg)
        flag = False
        if name == "Xr" and index == 1 and len(words) == 2:
            words = [f"{words[0]}({words[1]})"]
    text = " ".join(words)
    if name == "Nd":
        return f"- {text}"
    return f"[{text}]" if name == "Op" else text


@dataclass
class RoffPage:
    """Sections of a man page: ``(heading, lines)``, the lines being filled paragraphs."""
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    _heading: str = ""
    _lines: list[str] = field(default_factory=list)
    _words: list[str] = field(default_factory=list)
    nofill: bool = False
    heading_next: bool = False
    tag_next: bool = False

    def words(self, text: str) -> None:
        if self.heading_next:
            self.heading_next = False
            self.section(text)
        elif self.nofill:
            self.line(text)
        else:
            self._words.append(text)
            if self.tag_next:
                self.tag_next = False
                self.flush()

    def line(self, text: str) -> None:
        self.flush()
        if text.strip():
            self._lines.append(text.strip())

    def flush(self) -> None:
        text = join_wrapped("\n".join(self._words))
        self._words.clear()
        if text:
            self._lines.append(text)

    def heading(self, text: str) -> None:
        """``.SH text`` starts a section; a bare ``.SH`` takes its heading from the next line."""
        if text.strip():
            self.section(text)
        else:
            self.heading_next = True

    def section(self, heading: str) -> None:
        self.end()
        self._heading = join_wrapped(heading)

    def end(self) -> None:
        self.flush()
        if self._lines:
            self.sections.append((self._heading, list(self._lines)))
        self._lines.clear()


def _skip_block(lines: Iterator[str], first: str, end: str | None) -> None:
    """Consume a macro definition / ignored block (until ``end``) or a ``\\{ … \\}`` conditional body."""
    if end is not None:
        for line in lines:
            if line.rstrip() == end or line.startswith(end + " "):
                return
        return
    depth = first.count("\\{") - first.count("\\}")
    while depth > 0:
        line = next(lines, None)
        if line is None:
            return
        depth += line.count("\\{") - line.count("\\}")


def _control(page: RoffPage, lines: Iterator[str], line: str) -> None:
    name, _, rest = line[1:].strip().partition(" ")
    name = name.strip()
    if name in _BLOCKS_UNTIL:
        _skip_block(lines, line, _BLOCKS_UNTIL[name])
        return
    if name in {"if", "ie", "el"} and "\\{" in line:
        _skip_block(lines, line, None)
        return
    args = _roff_args(rest)
    if name in _SECTION_MACROS:
        page.heading(" ".join(args))
    elif name in _SUBSECTION_MACROS:
        page.line(" ".join(args))
    elif name in _NOFILL_START or name in _NOFILL_END:
        page.flush()
        page.nofill = name in _NOFILL_START
    elif name in _BREAK_ONLY or name.startswith("\\"):
        page.flush()
    elif name == "TP":
        page.flush()
        page.tag_next = True
    elif name in ("IP", "It", "Ip"):
        page.flush()
        tag = _mdoc_text(name, args) if name == "It" else (args[0] if args else "")
        if tag.strip() not in ("", "•", "-", "*", "o", "·"):
            page.line(tag)
    elif name in _ALTERNATING:
        page.words("".join(args))
    elif name[:1].isupper() and name[1:2].islower() and len(name) == 2:
        page.words(_mdoc_text(name, args))
    else:
        page.words(" ".join(args))


def roff_sections(source: str) -> list[tuple[str, list[str]]]:
    """``(heading, lines)`` for each ``.SH`` section of a man page, roff removed.

    Filled text is joined into one line per paragraph (line breaks between
    ideographs dropped), no-fill blocks keep their lines; macro definitions,
    conditionals, tables (``.TS``) and equations are skipped; text macros
    (``.B``, ``.BR``, mdoc ``.Fl``/``.Xr``…) keep their words.
    """
    page = RoffPage()
    lines = iter(source.splitlines())
    for line in lines:
        if line.startswith((".", "'")):
            _control(page, lines, line)
        elif not line.strip():
            page.flush()
        else:
            page.words(roff_unescape(line))
    page.end()
    return page.sections
