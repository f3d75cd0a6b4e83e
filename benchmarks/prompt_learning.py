"""Prompt learning and lm-eval on the demo models, one run: the README's results table.

    python benchmarks/prompt_learning.py [--models demo,llama-demo,cpm1-demo] [--limit 200]
        [--choice-limit 100] [--shots 16] [--seeds 3] [--steps 30] [--data data]

Sentiment (``cpmlive data sentiment``'s test split, the first ``--limit`` reviews; shots drawn
from its train split, which the shipped ``sentiment`` adapter was trained on): the majority
class, zero-shot, zero-shot with contextual calibration, in-context few-shot (``--shots`` per
class, or the most that fit: the demonstrations share half the model's window, a demo model
reads 256 or 512 tokens, and each keeps at least 24 tokens, cut at its end, as OpenPrompt cuts
text slots), prompt
tuning with ``--shots`` per class (soft template tokens and a soft verbalizer, the model
frozen), mean ± std over ``--seeds``, and the demo model with the ``sentiment`` adapter.

The local lm-eval tasks (``cpmlive data tasks``: headline, poem, gloss; four choices each) through
the harness: chance, zero-shot ``acc``, ``acc_mutual_info`` (lm-eval's calibrated score: each
choice's log-probability less its log-probability without the question) and ``--shots``-shot
in context (lm-eval's sampler; contexts beyond the window lose their oldest tokens, as lm-eval's
``hf`` backend cuts them); the demo model with the ``headline`` adapter on the headline task.
Prompt tuning needs a verbalizer (fixed classes), which these tasks do not have.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cpmlive
from cpmlive.apps import harness, prompt_classify
from cpmlive.data.choice_tasks import write_choice_tasks
from cpmlive.data.sentiment import write_sentiment
from cpmlive.resources import adapter_path
from cpmlive.tune.prompting import Template, Verbalizer

TEMPLATE = "{text_a}。总之很{mask}。"
TUNED_TEMPLATE = "{text_a}{soft:总之}很{mask}。"
WORDS = {"正面": ["好", "棒"], "负面": ["差", "糟糕"]}
CHOICE_TASKS = ("headline", "poem", "gloss")
SHARE = 24  # tokens an in-context example keeps at least (it is cut at its end to its share)


def sentiment_split(directory: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"text_a": row["input"], "label": row["label"]} for row in rows]


def cell(report: prompt_classify.Report) -> str:
    mean, std = report.mean_std
    return f"{100 * mean:.1f}" if len(report.accuracies) == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"


def icl(lm, template, verbalizer, test, train, shots: int, seeds: int) -> tuple[str, int]:
    """In-context few-shot with ``shots`` per class, or the most (halving) that leave each
    example at least ``SHARE`` tokens of the half window the demonstrations share."""
    while shots >= 1 and prompt_classify.window(lm) // 2 // (shots * len(verbalizer.labels)) < SHARE:
        shots //= 2
    if shots < 1:
        return "does not fit", 0
    report = prompt_classify.run(lm, template, verbalizer, test, train, shots, "icl", range(seeds))
    return cell(report), shots


def sentiment_rows(models: list[str], args: argparse.Namespace, directory: Path) -> None:
    test, train = sentiment_split(directory, "test")[:args.limit], sentiment_split(directory, "train")
    seen = {e["text_a"] for e in test}
    train = [e for e in train if e["text_a"] not in seen]
    template, verbalizer = Template.parse(TEMPLATE), Verbalizer(WORDS)
    tuned_template, soft_verbalizer = Template.parse(TUNED_TEMPLATE), Verbalizer(WORDS, "soft")
    print(f"\nSentiment: {len(test)} test reviews, accuracy % (template {TEMPLATE!r}, "
          f"verbalizer {json.dumps(WORDS, ensure_ascii=False)})\n")
    print(f"| model | majority | zero-shot | calibrated | in-context ({args.shots}/class or what fits) | "
          f"prompt tuning ({args.shots}/class) | fine-tuned adapter | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        started = time.perf_counter()
        lm = cpmlive.load(name)
        zero = cell(prompt_classify.run(lm, template, verbalizer, test))
        calibrated = cell(prompt_classify.run(lm, template, verbalizer, test, calibration="contextual"))
        in_context, fitted = icl(lm, template, verbalizer, test, train, args.shots, args.seeds)
        tuned = cell(prompt_classify.run(lm, tuned_template, soft_verbalizer, test, train, args.shots, "tune",
                                         range(args.seeds), steps=args.steps, lr=args.lr))
        adapter = "—"
        if name == "demo":
            tuned_lm = cpmlive.load(name, adapter=adapter_path("sentiment"))
            predicted = [label for start in range(0, len(test), 64)
                         for label in tuned_lm.classify([e["text_a"] for e in test[start:start + 64]])]
            adapter = f"{100 * sum(p == e['label'] for p, e in zip(predicted, test)) / len(test):.1f} (LoRA)"
        majority = 100 * prompt_classify.majority(train, test)
        shots_note = f" ({fitted}/class)" if fitted != args.shots else ""
        print(f"| {name} | {majority:.1f} | {zero} | {calibrated} | {in_context}{shots_note} | {tuned} | {adapter} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


def choice_rows(models: list[str], args: argparse.Namespace, directory: Path) -> None:
    tasks = [f"cpmlive_{t}" for t in CHOICE_TASKS]
    print(f"\nlm-eval local tasks: the first {args.choice_limit} items each, accuracy % "
          "(zero-shot acc / acc_mutual_info / in-context)\n")
    print("| model | " + " | ".join(f"{t} (chance 25.0)" for t in CHOICE_TASKS) + " | seconds |")
    print("|---|" + "---|" * (len(CHOICE_TASKS) + 1))
    runs = [(name, None) for name in models] + [("demo", "headline")]
    for name, adapter in runs:
        started = time.perf_counter()
        lm = cpmlive.load(name, adapter=adapter_path(adapter) if adapter else None)
        chosen = tasks if adapter is None else ["cpmlive_headline"]
        zero = harness.run_tasks(lm, chosen, limit=args.choice_limit, data_dir=directory)["results"]
        few = harness.run_tasks(lm, chosen, limit=args.choice_limit, data_dir=directory,
                                num_fewshot=args.shots)["results"]
        cells = []
        for task in tasks:
            if task not in zero:
                cells.append("—")
                continue
            z, f = zero[task], few[task]
            cells.append(f"{100 * z['acc,none']:.1f} / {100 * z['acc_mutual_info,none']:.1f} / "
                         f"{100 * f['acc,none']:.1f}")
        label = name if adapter is None else f"{name} + {adapter} adapter"
        print(f"| {label} | " + " | ".join(cells) + f" | {time.perf_counter() - started:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,llama-demo,cpm1-demo")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--choice-limit", type=int, default=100)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--data", default="data")
    parser.add_argument("--only", choices=("sentiment", "choice"), default=None)
    args = parser.parse_args()
    models = args.models.split(",")
    data = Path(args.data)
    if args.only != "choice":
        if not (data / "sentiment" / "test.jsonl").is_file():
            write_sentiment(data / "sentiment", seed=0)
        sentiment_rows(models, args, data / "sentiment")
    if args.only != "sentiment":
        if not all((data / "tasks" / f"{t}.jsonl").is_file() for t in CHOICE_TASKS):
            write_choice_tasks(data / "tasks", force=True)
        choice_rows(models, args, data / "tasks")


if __name__ == "__main__":
    main()
