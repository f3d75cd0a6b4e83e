"""Headline quality on the People's Daily test split: lead baseline vs the untuned demo model
vs the demo model with the headline adapter, character ROUGE-1/2/L (F, %), one run.

The `cpmlive title` rows rank generated titles and the lead's clauses together (see
``cpmlive.apps.headline``); the last row ranks the generated titles alone, to show what the
model writes by itself.

    python benchmarks/headline_quality.py [--data data/headlines] [--adapter headline] [--limit N]

``--data`` is a directory made by ``cpmlive data headlines`` (made under a temp dir if absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import cpmlive
from cpmlive.resources import adapter_path
from cpmlive.data.headlines import write_headlines
from cpmlive.data.tasks import read_examples
from cpmlive.apps.evaluate import generate_outputs
from cpmlive.apps.headline import TitleOptions, clean_article, lead_baseline, lead_clauses
from cpmlive.tune.metrics import rouge


def test_examples(data: str | None, limit: int | None, split: str = "test"):
    directory = Path(data) if data else Path(tempfile.mkdtemp()) / "headlines"
    if not (directory / f"{split}.jsonl").is_file():
        write_headlines(directory, seed=0)
    examples = read_examples(directory / f"{split}.jsonl", "generate")
    return examples[:limit] if limit else examples


def row(name: str, predictions: list[str], references: list[str], seconds: float,
        inputs: list[str] | None = None) -> dict:
    """ROUGE of one system; with ``inputs``, also how many top titles are not one of the lead's clauses."""
    scores = rouge(predictions, references)
    result = {"system": name, **{k: round(v, 2) for k, v in scores.items()}, "seconds": round(seconds, 1),
              "example": predictions[0]}
    if inputs is not None:
        defaults = TitleOptions()
        clauses = [set(lead_clauses(clean_article(text), defaults.lead_sentences, defaults.lead_clauses))
                   for text in inputs]
        result["generated_top"] = sum(p not in c for p, c in zip(predictions, clauses))
    return result


def systems(args, options: TitleOptions) -> list[tuple[str, bool, TitleOptions | None, int]]:
    """(row name, adapter on, title options or None for plain beam search, beams)."""
    free_form = dataclasses.replace(options, lead_sentences=0, generated_penalty=0.0)
    tuned = f"{args.model} + {args.adapter} LoRA"
    rows = []
    for name, adapter in ((f"{args.model}, untuned", False), (tuned, True)):
        if not adapter and args.skip_untuned:
            continue
        if not args.titles_only:
            rows.append((f"{name} (beam {args.num_beams})", adapter, None, args.num_beams))
        rows.append((f"{name} (`cpmlive title` top-1)", adapter, options, args.num_beams))
    if not args.skip_free_form:
        rows.append((f"{tuned} (`cpmlive title` top-1, generated titles only)", True, free_form, args.num_beams))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--adapter", default="headline")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=TitleOptions.num_beams)
    parser.add_argument("--samples", type=int, default=TitleOptions.samples, help="sampled candidates")
    parser.add_argument("--copy-bias", type=float, default=TitleOptions.copy_bias)
    parser.add_argument("--copy-spans", action=argparse.BooleanOptionalAction, default=TitleOptions.copy_spans)
    parser.add_argument("--span-bonus", type=float, default=TitleOptions.span_bonus)
    parser.add_argument("--lead-sentences", type=int, default=TitleOptions.lead_sentences)
    parser.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=TitleOptions.contrast)
    parser.add_argument("--generated-penalty", type=float, default=TitleOptions.generated_penalty)
    parser.add_argument("--length-bonus", type=float, default=TitleOptions.length_bonus)
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--skip-untuned", action="store_true")
    parser.add_argument("--titles-only", action="store_true", help="skip the plain beam-search rows")
    parser.add_argument("--skip-free-form", action="store_true", help="skip the generated-titles-only row")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    examples = test_examples(args.data, args.limit, args.split)
    options = TitleOptions(n=1, num_beams=args.num_beams, samples=args.samples, copy_bias=args.copy_bias,
                           copy_spans=args.copy_spans, span_bonus=args.span_bonus,
                           lead_sentences=args.lead_sentences, contrast=args.contrast,
                           generated_penalty=args.generated_penalty, length_bonus=args.length_bonus)
    inputs, references = [e.input for e in examples], [e.target for e in examples]
    rows = [row("lead baseline (first clause)", [lead_baseline(t) for t in inputs], references, 0.0)]
    lm = cpmlive.load(args.model, adapter=adapter_path(args.adapter))
    spec = lm.task
    for name, adapter, titles, beams in systems(args, options):
        with lm.using(lm.active if adapter else None):
            started = time.perf_counter()
            predictions = generate_outputs(lm, spec, inputs, beams, progress=True, titles=titles)
            rows.append(row(name, predictions, references, time.perf_counter() - started,
                            inputs if titles is not None else None))
    print(f"\n{len(examples)} {args.split} articles; input cut to {spec.max_input_tokens} tokens; title options "
          f"{options}\n")
    print("| system | ROUGE-1 | ROUGE-2 | ROUGE-L | top title generated | seconds | first title |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        generated = f"{r['generated_top']}/{len(examples)}" if "generated_top" in r else ""
        print(f"| {r['system']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {generated} | "
              f"{r['seconds']} | {r['example']} |")
    print(f"\nreference of the first: {references[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
