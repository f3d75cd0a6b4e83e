"""Does DPO learn? Issue 28's experiment, point 15: ``align dpo ... max_steps=60`` on People's Daily
title pairs (the article's real title chosen, another article's rejected), from the shipped demo
model, one CPU thread, in one run for each setting:

* ``builtin``: ``AlignConfig``'s own defaults (lr 1e-3, warm-up 10, LoRA r 8 / alpha 16 on q and v);
* ``old-recipe``: ``recipes/align-dpo.yaml`` as it was (lr 5e-4, warm-up 20, the same LoRA);
* ``recipe``: ``recipes/align-dpo.yaml`` as it is now.

Each starts from the base model (no SFT adapter, so the reference is the base), trains on
``--train`` pairs and is measured before and after on those pairs and on ``--held-out`` pairs of
other articles: pair accuracy and mean margin of summed log-probabilities (``cpmlive evaluate
--pairs``), and the mean implicit reward margin ``β·Δ`` against the reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_learning.py --work runs/dpo-learning
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from cpmlive.align.evaluate import pair_metrics
from cpmlive.align.recipes import AlignConfig, DpoTrainer
from cpmlive.data.align import write_jsonl
from cpmlive.data.headlines import article_groups, people_daily_headlines
from cpmlive.data.instructions import Sources, build_items, split_items

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "builtin": None,
    "old-recipe": ["lr=0.0005", "warmup_steps=20", 'delta={"method": "lora"}'],
    "recipe": [],
}


def title_pairs(work: Path, train: int, held_out: int) -> dict[str, Path]:
    """Headline preference pairs from the train and test splits (split by article group)."""
    sources = Sources()
    for group in article_groups(people_daily_headlines()):
        sources.headlines += [(f"people-daily:{group[0].line}", pair.title, pair.body) for pair in group]
    split = split_items(build_items(sources, seed=0), {"train": train, "dev": 0, "test": held_out})
    paths = {"train": work / "train.jsonl", "held_out": work / "held_out.jsonl"}
    write_jsonl(paths["train"], [i.preference() for i in split["train"]])
    write_jsonl(paths["held_out"], [i.preference() for i in split["test"]])
    return paths


def config_of(setting: str, data: Path, out: Path, steps: int) -> AlignConfig:
    run = [f"data={data}", f"out={out}", "eval=", "adapter=", "model=demo", f"max_steps={steps}",
           f"save_every={steps}", f"eval_every={steps}", "progress=false"]
    if SETTINGS[setting] is None:
        return AlignConfig.from_file(None, ["method=dpo", "max_input_tokens=192", "max_output_tokens=40", *run])
    return AlignConfig.from_file(ROOT / "recipes" / "align-dpo.yaml", [*SETTINGS[setting], *run])


@torch.no_grad()
def measure(trainer: DpoTrainer, paths: dict[str, Path]) -> dict[str, float]:
    model = trainer.model.eval()
    try:
        out: dict[str, float] = {}
        for name, path in paths.items():
            figures = pair_metrics(model, trainer.tokenizer, str(path), trainer.template)
            out[f"{name}_accuracy"], out[f"{name}_margin"] = figures["pair_accuracy"], figures["mean_margin"]
        margins = [trainer.batch_loss(trainer.train_pairs[i:i + 8])[1]["rewards/margins"] * len(
            trainer.train_pairs[i:i + 8]) for i in range(0, len(trainer.train_pairs), 8)]
        out["train_reward_margin"] = sum(margins) / len(trainer.train_pairs)
        return out
    finally:
        model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/dpo-learning")
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--held-out", type=int, default=80)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = title_pairs(work, args.train, args.held_out)
    results = {}
    for setting in args.settings:
        out = work / setting
        shutil.rmtree(out, ignore_errors=True)
        config = config_of(setting, paths["train"], out, args.steps)
        trainer = DpoTrainer(config)
        before = measure(trainer, paths)
        started = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - started
        after = measure(trainer, paths)
        results[setting] = {"lr": config.lr, "warmup_steps": config.warmup_steps, "delta": trainer.delta.to_dict(),
                            "before": before, "after": after, "train_seconds": round(seconds, 1)}
        print(json.dumps({setting: results[setting]}), flush=True)
    print(f"\n{len(paths)} files, {args.train} train / {args.held_out} held-out title pairs, {args.steps} steps\n")
    print("| setting | train acc. before → after | train margin | held-out acc. before → after | held-out margin "
          "| implicit reward margin (train) |")
    print("|---|---|---|---|---|---|")
    for setting, row in results.items():
        b, a = row["before"], row["after"]
        print(f"| {setting} | {b['train_accuracy']:.3f} → {a['train_accuracy']:.3f} | {b['train_margin']:.2f} → "
              f"{a['train_margin']:.2f} | {b['held_out_accuracy']:.3f} → {a['held_out_accuracy']:.3f} | "
              f"{b['held_out_margin']:.2f} → {a['held_out_margin']:.2f} | {a['train_reward_margin']:.3f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
