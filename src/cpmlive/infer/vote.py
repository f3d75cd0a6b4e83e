"""Sample several answers and keep the most frequent (self-consistency).

The CPM-1 porting article samples a few continuations of a few-shot prompt and answers with the
one that comes up most often; Wang et al. (2022) later named this self-consistency. An answer is
normalised before it is counted: cut at its first line break or stop string, then stripped, so
that "北京\n问：…" and "北京" are one vote.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from cpmlive.errors import CpmliveError

INPUT_SLOT = "{input}"


def normalise_answer(text: str, stops: Sequence[str] = ()) -> str:
    """``text`` up to its first line break or stop string, without surrounding whitespace."""
    end = len(text)
    for marker in ("\n", *stops):
        if marker:
            found = text.find(marker)
            if found != -1:
                end = min(end, found)
    return text[:end].strip()


@dataclass
class Vote:
    """The winning answer, how many samples gave it, and every answer's count (most frequent first;
    ties go to the answer sampled first)."""

    answer: str
    count: int
    total: int
    distribution: list[tuple[str, int]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"answer": self.answer, "count": self.count, "total": self.total,
                "distribution": [{"answer": a, "count": c} for a, c in self.distribution], "samples": self.samples}


def vote(samples: Sequence[str], stops: Sequence[str] = ()) -> Vote:
    """Count the normalised answers of ``samples``; empty answers are counted but never win
    while any non-empty one exists."""
    if not samples:
        raise CpmliveError("no samples to vote on")
    answers = [normalise_answer(s, stops) for s in samples]
    counts = Counter(answers)
    first_seen = {answer: answers.index(answer) for answer in counts}
    ranked = sorted(counts.items(), key=lambda item: (item[0] == "", -item[1], first_seen[item[0]]))
    winner, count = ranked[0]
    return Vote(winner, count, len(answers), ranked, list(samples))


def fill_template(template: str, text: str | None) -> str:
    """A few-shot prompt file's text with its ``{input}`` slot(s) filled (other braces are kept)."""
    if text is None:
        if INPUT_SLOT in template:
            raise CpmliveError(f"the prompt has an {INPUT_SLOT} slot: give the text to put there (--input)")
        return template
    if INPUT_SLOT not in template:
        raise CpmliveError(f"--input given, but the prompt has no {INPUT_SLOT} slot")
    return template.replace(INPUT_SLOT, text)


__all__ = ["INPUT_SLOT", "Vote", "fill_template", "normalise_answer", "vote"]
