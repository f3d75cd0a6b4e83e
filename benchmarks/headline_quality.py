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
from cpmlive.infer.headline import TitleOptions
from cpmlive.tune.metrics import rouge


def test_examples(data: str | None, limit: int | None, split: str = "test"):
    directory = Path(data) if data else Path(tempfile.mkdtemp()) / "headlines"
    if not (directory / f"{split}.jsonl").is_file():
        write_headlines(directory, seed=0)
    examples = read_examples(directory / f"{split}.jsonl", "generate")
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
    parser.add_argument("--samples", type=int, default=0, help="sampled candidates for the `title` row")
    parser.add_argument("--copy-bias", type=float, default=TitleOptions.copy_bias)
    parser.add_argument("--copy-spans", action=argparse.BooleanOptionalAction, default=TitleOptions.copy_spans)
    parser.add_argument("--span-bonus", type=float, default=TitleOptions.span_bonus)
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--skip-untuned", action="store_true")
    parser.add_argument("--titles-only", action="store_true", help="skip the plain beam-search rows")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    examples = test_examples(args.data, args.limit, args.split)
    options = TitleOptions(n=1, num_beams=max(args.num_beams, 2), samples=args.samples, copy_bias=args.copy_bias,
                           copy_spans=args.copy_spans, span_bonus=args.span_bonus, min_chars=2)
    inputs, references = [e.input for e in examples], [e.target for e in examples]
    rows = [row("lead baseline (first clause)", [lead_baseline(t) for t in inputs], references, 0.0)]
    tuned = cpmlive.load(args.model, adapter=resolve_adapter(args.adapter))
    spec = tuned.task
    if not args.skip_untuned:
        with tuned.using(None):
            started = time.perf_counter()
            if not args.titles_only:
                rows.append(row(f"{args.model}, untuned (beam {args.num_beams})",
                                generate_outputs(tuned, spec, inputs, args.num_beams, progress=True), references,
                                time.perf_counter() - started))
            started = time.perf_counter()
            rows.append(row(f"{args.model}, untuned (`cpmlive title` top-1)",
                            generate_outputs(tuned, spec, inputs, progress=True, titles=options), references,
                            time.perf_counter() - started))
    started = time.perf_counter()
    if not args.titles_only:
        rows.append(row(f"{args.model} + {args.adapter} LoRA (beam {args.num_beams})",
                        generate_outputs(tuned, spec, inputs, args.num_beams, progress=True), references,
                        time.perf_counter() - started))
    started = time.perf_counter()
    rows.append(row(f"{args.model} + {args.adapter} LoRA (`cpmlive title` top-1)",
                    generate_outputs(tuned, spec, inputs, progress=True, titles=options), references,
                    time.perf_counter() - started))
    print(f"\n{len(examples)} {args.split} articles; input cut to {spec.max_input_tokens} tokens; title options "
          f"{options}\n")
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
