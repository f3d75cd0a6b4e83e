"""Choose the headline ranking priors (``generated_penalty``, ``length_bonus``) on the dev split.

The candidates of every dev article and their model scores are computed once; each pair of
priors only re-ranks them, so a whole grid costs one pass of the model. For each pair: ROUGE-1/2/L
(F, %) of the top title and how often it is a generated title rather than one of the lead's
clauses. The best pair by ROUGE-L is printed last; ``TitleOptions`` should carry it.

    python benchmarks/headline_priors.py [--data data/headlines] [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import time

import cpmlive
from cpmlive.apps.headline import TitleOptions, apply_priors, clean_article, lead_baseline, title_candidates
from cpmlive.resources import adapter_path
from cpmlive.tune.metrics import rouge
from headline_quality import test_examples

PENALTIES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 1e9)
BONUSES = (0.0, 0.1, 0.2, 0.3, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/headlines")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--adapter", default="headline")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the grid to this file")
    args = parser.parse_args()
    examples = test_examples(args.data, args.limit, "dev")
    lm = cpmlive.load(args.model, adapter=adapter_path(args.adapter))
    options = TitleOptions(n=1)
    started = time.perf_counter()
    pools = [title_candidates(lm, example.input, options) for example in examples]
    seconds = time.perf_counter() - started
    references = [example.target for example in examples]
    grid = []
    for penalty in PENALTIES:
        for bonus in BONUSES:
            priors = TitleOptions(n=1, generated_penalty=penalty, length_bonus=bonus)
            tops = [apply_priors(pool, priors)[0] if pool else None for pool in pools]
            predictions = [top.title if top else "" for top in tops]
            generated = sum(1 for top in tops if top is not None and not top.from_lead)
            scores = rouge(predictions, references)
            grid.append({"generated_penalty": penalty, "length_bonus": bonus, **scores,
                         "generated_top": generated, "articles": len(examples)})
    lead = rouge([lead_baseline(clean_article(e.input)) for e in examples], references)
    print(f"{len(examples)} dev articles, candidates scored in {seconds:.0f} s; lead baseline ROUGE-1/2/L "
          f"{lead['rouge1']:.2f} / {lead['rouge2']:.2f} / {lead['rougeL']:.2f}\n")
    print("| generated_penalty | length_bonus | ROUGE-1 | ROUGE-2 | ROUGE-L | top title generated |")
    print("|---|---|---|---|---|---|")
    for cell in grid:
        penalty = "clauses only" if cell["generated_penalty"] >= 1e9 else f"{cell['generated_penalty']:g}"
        print(f"| {penalty} | {cell['length_bonus']:g} | {cell['rouge1']:.2f} | {cell['rouge2']:.2f} | "
              f"{cell['rougeL']:.2f} | {cell['generated_top']}/{cell['articles']} |")
    best = max((c for c in grid if c["generated_penalty"] < 1e9), key=lambda c: (c["rougeL"], c["rouge1"]))
    print(f"\nbest by dev ROUGE-L: generated_penalty={best['generated_penalty']:g}, "
          f"length_bonus={best['length_bonus']:g} (ROUGE-L {best['rougeL']:.2f}, "
          f"{best['generated_top']}/{best['articles']} generated)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(grid, handle, indent=2)


if __name__ == "__main__":
    main()
