"""Scoring CPM-Bee on filled JSON tasks: every ``<ans>`` leaf is blanked, decoded and compared
with the given answer; and the simple baselines the bilingual demo is measured against.

Metrics: exact match for every task; ROUGE-L F1 (``rouge-score``) over characters for Chinese
answers and over words for English ones.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

from rouge_score import rouge_scorer

from cpmlive.api import LM
from cpmlive.data.bee import answers_of, blank_answers
from cpmlive.data.bilingual import Entry
from cpmlive.tokenizer.bee import unescape

_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[A-Za-z0-9]+|[\u4e00-\u9fff]|[^\sA-Za-z0-9\u4e00-\u9fff]")


class _UnitTokenizer:
    """``rouge-score`` units: characters of Chinese text, lower-cased words of other text."""

    def tokenize(self, text: str) -> list[str]:
        return [unit.lower() for unit in _WORD.findall(text)]


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnitTokenizer())


def rouge_l(prediction: str | None, reference: str) -> float:
    if not prediction:
        return 0.0
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def scores(predictions: Sequence[str | None], references: Sequence[str]) -> dict[str, float]:
    exact = [float((p or "").strip() == r.strip()) for p, r in zip(predictions, references)]
    rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
    count = max(len(references), 1)
    return {"exact_match": sum(exact) / count, "rougeL": sum(rouge) / count, "answers": len(references)}


def predict(lm: LM, tasks: Sequence[dict], batch_size: int = 8, progress: bool = False,
            **options: object) -> list[list[str | None]]:
    """The decoded answer leaves of each task (blanked first), in ``answers_of`` order."""
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(tasks), desc="bee", unit="task", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(tasks), batch_size):
        chunk = [blank_answers(task) for task in tasks[start:start + batch_size]]
        for filled in lm.bee(chunk, **options):
            out.append([unescape(text) if text is not None else None for _, text in answers_of(filled)])
        bar.update(len(chunk))
    bar.close()
    return out


def evaluate_tasks(lm: LM, tasks: Sequence[dict], batch_size: int = 8, progress: bool = False,
                   **options: object) -> dict:
    """``{"metrics": ..., "predictions": ...}`` over every answer leaf of ``tasks``."""
    predictions = predict(lm, tasks, batch_size, progress, **options)
    references = [[unescape(text) for _, text in answers_of(task)] for task in tasks]
    flat_p = [p for row in predictions for p in row]
    flat_r = [r for row in references for r in row]
    return {"metrics": scores(flat_p, flat_r), "predictions": predictions}


# ---- baselines ------------------------------------------------------------------------------------


class Dictionary:
    """CC-CEDICT both ways: a word's first gloss, and the shortest headword glossed as a word."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        import jieba

        jieba.setLogLevel(60)
        self._cut = jieba.lcut
        self.gloss: dict[str, str] = {}
        candidates: dict[str, Counter[str]] = {}
        for entry in entries:
            if not entry.glosses:
                continue
            self.gloss.setdefault(entry.word, entry.glosses[0])
            for gloss in entry.glosses:
                key = gloss.lower().removeprefix("to ").strip()
                if key and " " not in key:
                    candidates.setdefault(key, Counter())[entry.word] += 1
        self.headword = {key: min(words, key=lambda w: (len(w), -words[w])) for key, words in candidates.items()}

    def zh_to_en(self, text: str) -> str:
        return " ".join(self.gloss.get(word, word) for word in self._cut(text) if word.strip())

    def en_to_zh(self, text: str) -> str:
        return "".join(self.headword.get(word.lower(), "") for word in re.findall(r"[A-Za-z]+", text))


def baseline_answer(kind: str, task: dict, dictionary: Dictionary) -> str:
    """The simple baseline of each task kind (``data.bee_tasks.KINDS``)."""
    text = unescape(task.get("input", ""))
    if kind == "continuation":
        return text  # repeat the input
    if kind == "zh2en":
        return dictionary.zh_to_en(text)  # word-by-word dictionary lookup
    if kind == "en2zh":
        return dictionary.en_to_zh(text)
    if kind == "qa":
        return text.split("；")[0].split("：", 1)[-1]  # the first entry's gloss
    if kind == "choice":
        return "<option_0>"  # always the first option (chance: 1 in 4)
    raise ValueError(kind)


__all__ = ["Dictionary", "baseline_answer", "evaluate_tasks", "predict", "rouge_l", "scores"]


# ---- the demo's per-task table -------------------------------------------------------------------


def kind_table(lm: LM, held_out: dict[str, list[dict]], dictionary: Dictionary, per_kind: int,
               batch_size: int = 16, progress: bool = True, **options: object) -> dict[str, dict]:
    """For each task kind, the model's and the baseline's scores on ``per_kind`` held-out tasks
    drawn with a fixed seed (ROUGE-L for the text kinds, exact match for QA and choice)."""
    import random

    table = {}
    for kind, tasks in held_out.items():
        chosen = random.Random(0).sample(tasks, min(per_kind, len(tasks)))
        predictions = [row[0] for row in predict(lm, chosen, batch_size, progress, **options)]
        references = [unescape(next(answers_of(task))[1]) for task in chosen]
        baseline = [baseline_answer(kind, task, dictionary) for task in chosen]
        table[kind] = {"tasks": len(chosen), "model": scores(predictions, references),
                       "baseline": scores(baseline, references),
                       # decoded again as one batch of five, as a test re-runs them (a product's
                       # rounding can depend on how many rows it has)
                       "examples": [{"task": t, "prediction": p[0]} for t, p in
                                    zip(chosen[:5], predict(lm, chosen[:5], 5, False, **options))]}
    return table


HEADLINE = {"continuation": "rougeL", "zh2en": "rougeL", "en2zh": "rougeL", "qa": "exact_match",
            "choice": "exact_match"}
BASELINES = {"continuation": "repeat the input", "zh2en": "CC-CEDICT word by word",
             "en2zh": "CC-CEDICT word by word", "qa": "first entry's gloss", "choice": "always option 0"}


def markdown(table: dict[str, dict]) -> str:
    lines = ["| task | held-out tasks | metric | cpmlive bee-demo | baseline | baseline is |",
             "|---|---|---|---|---|---|"]
    for kind, row in table.items():
        metric = HEADLINE[kind]
        lines.append(f"| {kind} | {row['tasks']} | {metric} | {row['model'][metric]:.3f} | "
                     f"{row['baseline'][metric]:.3f} | {BASELINES[kind]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    import cpmlive
    from cpmlive.data.bilingual import cedict_entries
    from cpmlive.errors import CpmliveError

    parser = argparse.ArgumentParser(prog="python -m cpmlive.apps.bee_eval",
                                     description="the bilingual demo's per-task table against simple baselines")
    parser.add_argument("model", nargs="?", default="bee-demo")
    parser.add_argument("--held-out", type=Path, required=True, help="held_out.json of the demo's build")
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        lm = cpmlive.load(args.model)
        held_out = json.loads(args.held_out.read_text(encoding="utf-8"))
        table = kind_table(lm, held_out, Dictionary(cedict_entries()), args.per_kind, num_beams=args.num_beams,
                           repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
    except CpmliveError as exc:
        print(f"bee_eval: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(table, ensure_ascii=False, indent=2) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
