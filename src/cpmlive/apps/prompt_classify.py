"""Zero- and few-shot classification with templates and verbalizers (``tune.prompting``) on any
cpmlive model: what ``cpmlive classify`` runs.

* zero-shot: each label word's log-probability in the mask (``LM.score``), classes by the
  verbalizer, optionally calibrated;
* few-shot in context (``mode="icl"``): K examples per class, in the template with their class's
  word, before each query;
* few-shot by prompt tuning (``mode="tune"``): the template's soft tokens (and a soft verbalizer's
  weights) trained on the K examples per class, the model frozen;

each few-shot mode run once per seed (the shots drawn anew) and reported as OpenPrompt reports
few-shot results: accuracy, mean ± standard deviation over the seeds. CPM-Bee answers through its
choice task (the template's text as the input, each class's first word an option): it gives no
probabilities, so it takes neither calibration nor prompt tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from cpmlive.api import LM
from cpmlive.data.align import json_lines
from cpmlive.errors import CpmliveError
from cpmlive.tune import prompting
from cpmlive.tune.prompting import Template, Verbalizer

MODES = ("zero", "icl", "tune")
SUPPORT = 200  # unlabeled texts KPT refines and calibrates on, at most


@dataclass
class Report:
    """Accuracy per seed (one entry for zero-shot), and the first run's predictions."""

    mode: str
    shots: int
    calibration: str | None
    accuracies: list[float]
    predictions: list[str] = field(default_factory=list)
    truncated: int = 0  # test inputs cut to fit the model's window (the first run's)

    @property
    def mean_std(self) -> tuple[float, float]:
        return prompting.mean_std(self.accuracies)

    def to_dict(self) -> dict:
        mean, std = self.mean_std
        return {"mode": self.mode, "shots": self.shots, "calibration": self.calibration, "accuracy": mean,
                "std": std, "seeds": len(self.accuracies), "accuracies": self.accuracies, "truncated": self.truncated}


def read_examples(path: str | os.PathLike, label_field: str | None = "label", labels: Sequence[str] = ()) -> list[dict]:
    """A JSONL file of examples; with ``label_field``, each has a label the verbalizer knows."""
    examples = []
    for where, example in json_lines(path):
        if label_field is not None:
            if label_field not in example:
                raise CpmliveError(f"{where}: no {label_field!r} field")
            example[label_field] = str(example[label_field])
            if labels and example[label_field] not in labels:
                raise CpmliveError(f"{where}: label {example[label_field]!r} is not in the verbalizer "
                                   f"({', '.join(labels)})")
        examples.append(example)
    if not examples:
        raise CpmliveError(f"{path}: no examples")
    return examples


def scorer(lm: LM, batch_size: int = 16) -> prompting.Scorer:
    return lambda triples: [score for score, _ in lm.score(triples, batch_size=batch_size)]


def window(lm: LM) -> int:
    return lm.config.max_length - lm.config.prompt_length - 1


def fit_window(lm: LM, template: Template, verbalizer: Verbalizer, example: dict, context: str = "",
               limit: int | None = None) -> dict:
    """``example`` with its longest field cut at the end so that ``context``, the template, the
    longest label word and the template's rest fit ``limit`` tokens (default: the model's window;
    OpenPrompt truncates the text slots the same way); unchanged when it fits."""
    limit = window(lm) if limit is None else limit
    word = max(len(lm.tokenizer.encode(w)) for _, w in verbalizer.flat())

    def length(candidate: dict) -> int:
        prefix, after = template.pieces(candidate)
        soft = sum(1 for kind, text in prefix if kind == "soft" and not text)
        text = context + "".join(text for _, text in prefix)
        return len(lm.encode_context(text)) + soft + word + len(lm.tokenizer.encode(after))

    if length(example) <= limit:
        return example
    name = max(template.fields, key=lambda f: len(str(example.get(f, ""))))
    text, low, high = str(example[name]), 0, len(str(example[name]))
    while low < high:
        middle = (low + high + 1) // 2
        if length({**example, name: text[:middle]}) <= limit:
            low = middle
        else:
            high = middle - 1
    return {**example, name: text[:low]}


def _accuracy(predicted: Sequence[str], examples: Sequence[dict], label_field: str) -> float:
    return sum(p == e[label_field] for p, e in zip(predicted, examples)) / len(examples)


def predict(lm: LM, template: Template, verbalizer: Verbalizer, examples: Sequence[dict],
            calibration: str | None = None, demonstrations: str = "", support: Sequence[dict] = ()) -> list[str]:
    """Each example's class, zero-shot or after ``demonstrations``."""
    if lm.can("bee"):
        return _bee_predict(lm, template, verbalizer, examples, calibration, demonstrations)
    score = scorer(lm)
    pool = (list(support) or list(examples))[:SUPPORT]  # unlabeled support texts: given, else the inputs
    if verbalizer.kind == "knowledgeable":  # KPT: refined on the support texts
        verbalizer = verbalizer.refine(prompting.word_logprobs(score, template, verbalizer, pool, demonstrations))
    offset = prompting.calibrate(calibration, score, template, verbalizer, demonstrations, pool)
    words = prompting.word_logprobs(score, template, verbalizer, examples, demonstrations)
    chosen = prompting.classify_scores(words, verbalizer, offset).argmax(-1).tolist()
    return [verbalizer.labels[i] for i in chosen]


def _bee_predict(lm: LM, template: Template, verbalizer: Verbalizer, examples: Sequence[dict],
                 calibration: str | None, demonstrations: str) -> list[str]:
    if calibration is not None:
        raise CpmliveError("CPM-Bee chooses an option without probabilities: calibration does not apply")
    options = {f"<option_{i}>": verbalizer.words[label][0] for i, label in enumerate(verbalizer.labels)}
    tasks = []
    for example in examples:
        prefix, after = template.render(example)
        tasks.append({"input": demonstrations + prefix + "____" + after, "options": options, "<ans>": ""})
    answers = lm.bee(tasks, max_new_tokens=8)
    names = list(options)
    return [verbalizer.labels[names.index(a["<ans>"])] if a.get("<ans>") in names else verbalizer.labels[0]
            for a in answers]


def run(lm: LM, template: Template, verbalizer: Verbalizer, test: Sequence[dict], train: Sequence[dict] = (),
        shots: int = 0, mode: str = "zero", seeds: Sequence[int] = (0,), calibration: str | None = None,
        label_field: str = "label", steps: int = 30, lr: float = 0.05, support: Sequence[dict] = ()) -> Report:
    """Accuracy on ``test`` for each seed (see the module docstring)."""
    if mode not in MODES:
        raise CpmliveError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "zero" and shots < 1:
        raise CpmliveError(f"{mode} needs shots (examples per class) of at least 1")
    if mode != "zero" and not train:
        raise CpmliveError("few-shot needs training examples to draw the shots from (--train)")
    report = Report(mode, shots if mode != "zero" else 0, calibration, [])
    fitted_by_context: dict[str, list[dict]] = {}  # (one entry unless in-context examples change by seed)
    for seed in (seeds if mode != "zero" else seeds[:1]):
        shots_drawn = prompting.sample_shots(train, verbalizer.labels, shots, seed, label_field) if mode != "zero" \
            else []
        context = _demonstrations(lm, template, verbalizer, shots_drawn, label_field) if mode == "icl" else ""
        if context not in fitted_by_context:
            fitted_by_context[context] = list(test) if lm.can("bee") else \
                [fit_window(lm, template, verbalizer, e, context) for e in test]
        fitted = fitted_by_context[context]
        if mode == "tune":
            predicted = _tuned_predict(lm, template, verbalizer, shots_drawn, fitted, calibration, label_field, steps,
                                       lr, seed)
        else:
            predicted = predict(lm, template, verbalizer, fitted, calibration, context, support)
        report.accuracies.append(_accuracy(predicted, test, label_field))
        if not report.predictions:
            report.predictions, report.truncated = predicted, sum(a != b for a, b in zip(fitted, test))
    return report


def _demonstrations(lm: LM, template: Template, verbalizer: Verbalizer, shots: Sequence[dict],
                    label_field: str) -> str:
    """In-context examples sharing half the window (the query keeps the rest), each cut at the
    end of its longest field to its share."""
    share = window(lm) // 2 // max(1, len(shots))
    fitted = shots if lm.can("bee") else [fit_window(lm, template, verbalizer, s, limit=share) for s in shots]
    return prompting.demonstrations(template, verbalizer, fitted, label_field)


def _tuned_predict(lm: LM, template: Template, verbalizer: Verbalizer, shots: Sequence[dict], test: Sequence[dict],
                   calibration: str | None, label_field: str, steps: int, lr: float, seed: int) -> list[str]:
    if lm.can("bee"):
        raise CpmliveError("CPM-Bee answers its choice task without scores: prompt tuning does not apply")
    if calibration is not None:
        raise CpmliveError("prompt tuning learns from the shots what calibration corrects: drop --calibrate")
    lm.require("generate")
    torch.manual_seed(seed)
    learned = Verbalizer(dict(verbalizer.words), verbalizer.kind, verbalizer.min_prior)
    tuner = prompting.PromptTuner(lm.model, lm.encode_context, lm.tokenizer.encode, lm.tokenizer.eos_id, template,
                                  learned, seed)
    shots = [fit_window(lm, template, verbalizer, e) for e in shots]
    try:
        with lm.lock:
            tuner.fit(shots, label_field, steps, lr)
            chosen = learned.class_scores(tuner.word_scores(test)).argmax(-1).tolist()
    finally:
        tuner.close()
    return [learned.labels[i] for i in chosen]


def majority(train: Sequence[dict], test: Sequence[dict], label_field: str = "label") -> float:
    """Accuracy of always answering the training data's most frequent class."""
    labels = [e[label_field] for e in train] or [e[label_field] for e in test]
    top = max(set(labels), key=labels.count)
    return sum(e[label_field] == top for e in test) / len(test)


__all__ = ["MODES", "Report", "fit_window", "majority", "predict", "read_examples", "run", "scorer"]
