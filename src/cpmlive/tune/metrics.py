"""Scores for fine-tuned tasks, in percent (0–100).

``rouge`` and ``classification_scores`` return plain dicts; ``accuracy`` and
``macro_f1`` return one float each (the numbers a training loop logs and
compares).

* Generation: ROUGE-1/2/L F-measure computed on *characters* (Chinese has no
  spaces, so word-level ROUGE would compare whole lines), averaged over pairs.
  The counting is the maintained ``rouge-score`` package's; only its
  tokenizer is replaced by ``CharTokenizer``. ROUGE-L is the sentence-level
  LCS variant (``rougeL``, not ``rougeLsum``).
* Classification: accuracy and macro-F1 (the unweighted mean of per-label F1
  over every label seen in the references or the predictions, as
  scikit-learn's ``f1_score(average="macro")``; a label never predicted and
  never true cannot occur, and one with no true positives scores 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cpmlive.errors import CpmliveError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class CharTokenizer:
    """``rouge-score`` tokenizer: the non-space characters of the text, unchanged."""

    def tokenize(self, text: str) -> list[str]:
        return [char for char in text if not char.isspace()]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise CpmliveError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise CpmliveError("nothing to score: no references")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean character-level ROUGE-1/2/L F-measure over pairs, in percent."""
    from rouge_score import rouge_scorer  # imports nltk: only when scoring, not with every fine-tuning import

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(references) for name, total in totals.items()}


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of exact label matches."""
    _check_pairs(predictions, references)
    hits = sum(prediction == reference for prediction, reference in zip(predictions, references))
    return 100.0 * hits / len(references)


def per_label_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """F1 of each label, in percent, over the labels of both sequences."""
    _check_pairs(predictions, references)
    true_pos = Counter(p for p, r in zip(predictions, references) if p == r)
    predicted, actual = Counter(predictions), Counter(references)
    labels = sorted(set(predicted) | set(actual))
    # F1 = 2TP / (2TP + FP + FN), where TP + FP = predicted and TP + FN = actual.
    return {label: 200.0 * true_pos[label] / (predicted[label] + actual[label]) for label in labels}


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Unweighted mean of the per-label F1, in percent."""
    scores = per_label_f1(predictions, references)
    return sum(scores.values()) / len(scores)


def classification_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, object]:
    """``{"accuracy", "macro_f1", "f1": {label: F1}}``, all in percent."""
    return {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references),
            "f1": per_label_f1(predictions, references)}
