"""Headline quality on the People's Daily test split: lead baseline vs the untuned demo model
vs the demo model with the headline adapter, character ROUGE-1/2/L (F, %), one run.

    python benchmarks/headline_quality.py [--data data/headlines] [--adapter headline] [--limit N]

``--data`` is a directory made by ``cpmlive data headlines`` (made under a temp dir if absent).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cpmlive
from cpmlive.api import resolve_adapter
from cpmlive.data.headlines import lead_baseline, write_headlines
from cpmlive.data.tasks import read_examples
from cpmlive.infer.evaluate import generate_outputs
from cpmlive.tune.metrics import rouge


def test_examples(data: str | None, limit: int | None):
    directory = Path(data) if data else Path(tempfile.mkdtemp()) / "headlines"
    if not (directory / "test.jsonl").is_file():
        write_headlines(directory, seed=0)
    examples = read_examples(directory / "test.jsonl", "generate")
    return examples[:limit] if limit else examples


def row(name: str, predictions: list[str], references: list[str], seconds: float) -> dict:
    scores = rouge(predictions, references)
    return {"system": name, **{k: round(v, 2) for k, v in scores.items()}, "seconds": round(seconds, 1),
            "example": predictions[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--adapter", default="headline")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--skip-untuned", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    examples = test_examples(args.data, args.limit)
    inputs, references = [e.input for e in examples], [e.target for e in examples]
    rows = [row("lead baseline (first clause)", [lead_baseline(t) for t in inputs], references, 0.0)]
    tuned = cpmlive.load(args.model, adapter=resolve_adapter(args.adapter))
    spec = tuned.task
    if not args.skip_untuned:
        with tuned.using(None):
            started = time.perf_counter()
            rows.append(row(f"{args.model}, untuned (beam {args.num_beams})",
                            generate_outputs(tuned, spec, inputs, args.num_beams, progress=True), references,
                            time.perf_counter() - started))
    started = time.perf_counter()
    rows.append(row(f"{args.model} + {args.adapter} LoRA (beam {args.num_beams})",
                    generate_outputs(tuned, spec, inputs, args.num_beams, progress=True), references,
                    time.perf_counter() - started))
    started = time.perf_counter()
    rows.append(row(f"{args.model} + {args.adapter} LoRA (`cpmlive title` top-1)",
                    generate_outputs(tuned, spec, inputs, args.num_beams, progress=True, titles=True), references,
                    time.perf_counter() - started))
    print(f"\n{len(examples)} test articles; input cut to {spec.max_input_tokens} tokens\n")
    print("| system | ROUGE-1 | ROUGE-2 | ROUGE-L | seconds | first test title |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {r['seconds']} | "
              f"{r['example']} |")
    print(f"\nreference of the first: {references[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
