"""The bilingual demo's data: pretraining objects and the five JSON task kinds, built from the
aligned LibreOffice help paragraphs and CC-CEDICT (``data.bilingual``), with a held-out split
that no training object shares a source text with.

Task kinds (the CPM-Bee documentation's forms):

* ``continuation``: ``{"input": first half, "prompt": "往后写", "<ans>": second half}``;
* ``zh2en`` / ``en2zh``: ``{"input": text, "prompt": "中翻英" | "英翻中", "<ans>": translation}``;
* ``qa``: three dictionary entries as context, ``{"input": ..., "question": "X的意思是什么？",
  "<ans>": gloss}`` (the answer is in the context);
* ``choice``: ``{"input": word, "question": "这个词的英文意思是？", "options": {"<option_0>": ...},
  "<ans>": "<option_k>"}`` (the word's gloss among three others). Every dictionary entry is in
  pretraining, so a held-out question asks for knowledge the model read but was never quizzed on.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Iterable

from cpmlive.data.bilingual import Entry
from cpmlive.tokenizer.bee import escape

KINDS = ("continuation", "zh2en", "en2zh", "qa", "choice")
_SPLIT = re.compile(r"(?<=[，。；：！？,;:.!?])")
_PAREN = re.compile(r"\([^)]*\)")


def held_out(text: str, share: float) -> bool:
    """Whether a source text is in the held-out split (a stable hash, not the RNG)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") < share * 2**32


def clean_gloss(gloss: str) -> str:
    return _SPAREN_SPACES.sub(" ", _PAREN.sub("", gloss)).strip(" ;,")


_SPAREN_SPACES = re.compile(r"\s+")


def usable_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Entries with a simplified headword of 2-4 Chinese characters and a short first gloss
    that is not a cross-reference (``variant of ...``, ``see ...``)."""
    out, seen = [], set()
    for entry in entries:
        word = entry.word
        if not (2 <= len(word) <= 4 and all("\u4e00" <= c <= "\u9fff" for c in word)) or word in seen:
            continue
        gloss = clean_gloss(entry.glosses[0]) if entry.glosses else ""
        if not gloss or len(gloss) > 40 or gloss.startswith(("variant of", "see ", "old variant", "CL:", "surname")):
            continue
        seen.add(word)
        out.append(Entry(word, entry.pinyin, (gloss,)))
    return out


def entry_text(entry: Entry) -> str:
    return f"{entry.word}：{entry.glosses[0]}"


def split_half(text: str) -> tuple[str, str] | None:
    """Text cut at the clause boundary nearest its middle (both halves at least 4 chars)."""
    cuts = [m.start() for m in _SPLIT.finditer(text) if 4 <= m.start() <= len(text) - 4]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(c - len(text) / 2))
    return text[:cut], text[cut:]


@dataclass
class TaskData:
    """Training objects (pretraining and tasks) and the held-out tasks by kind."""

    pretrain: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)
    held_out: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    train_by_kind: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in KINDS})


def _masked(text: str, rng: random.Random) -> dict:
    """An infilling object: one or two spans of the text replaced by ``<mask_k>``."""
    spans, pieces, answers, position = rng.choice((1, 2)), [], {}, 0
    length = len(text)
    starts = sorted(rng.sample(range(1, max(length - 2, 2)), min(spans, max(length - 3, 1))))
    for k, start in enumerate(starts):
        if start < position:
            continue
        end = min(length, start + rng.randint(1, max(2, length // 6)))
        pieces.append(escape(text[position:start]))
        pieces.append(f"<mask_{k}>")
        answers[f"<mask_{k}>"] = escape(text[start:end])
        position = end
    pieces.append(escape(text[position:]))
    return {"document": "".join(pieces), "<ans>": answers}


def build(pairs: list[tuple[str, str]], entries: list[Entry], share: float = 0.05, seed: int = 0) -> TaskData:
    rng = random.Random(seed)
    data = TaskData()

    def add(kind: str, obj: dict, source: str) -> None:
        if held_out(source, share):
            data.held_out[kind].append(obj)
        else:
            data.tasks.append(obj)
            data.train_by_kind[kind].append(obj)

    for zh, en in pairs:
        zh_e, en_e = escape(zh), escape(en)
        if not held_out(zh, share):
            data.pretrain += [{"<ans>": zh_e}, {"<ans>": en_e}, _masked(zh, rng)]
        add("zh2en", {"input": zh_e, "prompt": "中翻英", "<ans>": en_e}, zh)
        add("en2zh", {"input": en_e, "prompt": "英翻中", "<ans>": zh_e}, zh)
        halves = split_half(zh) if len(zh) >= 12 else None
        if halves is not None:
            add("continuation", {"input": escape(halves[0]), "prompt": "往后写", "<ans>": escape(halves[1])}, zh)
    words = usable_entries(entries)
    glosses = [entry.glosses[0] for entry in words]
    for index, entry in enumerate(words):
        data.pretrain.append({"<ans>": escape(entry_text(entry))})  # the knowledge choice questions test
        others = rng.sample(range(len(words)), 3)
        if index in others:
            continue
        context = [words[i] for i in others[:2]] + [entry]
        rng.shuffle(context)
        add("qa", {"input": escape("；".join(entry_text(e) for e in context)),
                   "question": f"{entry.word}的意思是什么？", "<ans>": escape(entry.glosses[0])}, entry.word)
        options = [glosses[i] for i in others] + [entry.glosses[0]]
        rng.shuffle(options)
        answer = options.index(entry.glosses[0])
        add("choice", {"input": entry.word, "question": "这个词的英文意思是？",
                       "options": {f"<option_{k}>": escape(text) for k, text in enumerate(options)},
                       "<ans>": f"<option_{answer}>"}, entry.word)
    return data


__all__ = ["KINDS", "TaskData", "build", "held_out", "split_half", "usable_entries"]
