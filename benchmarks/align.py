"""Alignment at demo scale, one run: the instruction data from the corpora, then SFT → reward
model → DPO → PPO and GRPO on the shipped demo model (LoRA), each measured on held-out splits.

* SFT: per-task ROUGE-L (characters) and exact match of greedy answers, before (the base demo
  model, prompted with the same chat layout) and after;
* reward model (from the SFT adapter): held-out pair accuracy and mean margin, untrained head and trained;
* DPO (from the SFT adapter): held-out pair accuracy and mean log-probability margin before/after;
* PPO and GRPO (from the SFT adapter, on headline prompts, the reward model's score): reward and
  KL curves (PNG), and the headline ROUGE-L of the policy before and after RL.

Each stage is a run directory under ``--work``; a finished stage is reused when the script is run
again, and an interrupted one resumes (``--resume auto``), so the script can be stopped at any point.

    .venv/bin/python benchmarks/align.py --work runs/align-bench   # figures and curves into docs/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cpmlive
from cpmlive.align.evaluate import pair_metrics, reward_head_of
from cpmlive.align.recipes import AlignConfig, align, rouge_l
from cpmlive.data.chat import ChatTemplate
from cpmlive.data.instructions import build_items, load_sources, split_items, write_items
from cpmlive.train.metrics import read_records

TEMPLATE = ChatTemplate()
ROOT = Path(__file__).resolve().parents[1]
DECODING = {"repetition_penalty": 1.2}  # greedy; the demo model loops without it


def stage(name: str, config: AlignConfig) -> Path:
    best = Path(config.out) / "best"
    if (Path(config.out) / "done").is_file():
        return best
    started = time.time()
    resume = "auto" if Path(config.out).exists() else None
    align(config, resume=resume)
    (Path(config.out) / "done").write_text(f"{time.time() - started:.0f}\n")
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    return best


def answers(lm, items, adapter: Path | None, max_new_tokens: int) -> list[str]:
    """Greedy answers, cut at the first line break (the template's turns are lines)."""
    if adapter is None:
        texts = lm.generate([TEMPLATE.render([{"role": "user", "content": i.prompt}]) for i in items],
                            max_new_tokens=max_new_tokens, **DECODING)
    else:
        texts = lm.generate([i.prompt for i in items], max_new_tokens=max_new_tokens, **DECODING)
    return [t.split("\n")[0].strip() for t in texts]


def task_metrics(model: str, items, adapter: Path | None, max_new_tokens: int = 32) -> dict[str, dict[str, float]]:
    lm = cpmlive.load(model, adapter=adapter) if adapter else cpmlive.load(model)
    out: dict[str, dict[str, float]] = {}
    predictions = answers(lm, items, adapter, max_new_tokens)
    for task in sorted({i.task for i in items}):
        pairs = [(p, i.answer) for p, i in zip(predictions, items) if i.task == task]
        out[task] = {"rouge_l": sum(rouge_l(p, a) for p, a in pairs) / len(pairs),
                     "exact": sum(p == a.strip() for p, a in pairs) / len(pairs), "n": len(pairs)}
    return out


def pair_figures(model: str, path: Path, adapter: Path | None, reward: bool = False) -> dict[str, float]:
    lm = cpmlive.load(model, adapter=adapter) if adapter else cpmlive.load(model)
    head = reward_head_of(adapter, lm.model) if reward else None
    if reward and head is None:  # an untrained head on the SFT policy: where the reward model starts
        from cpmlive.align.policy import ScalarHead

        torch.manual_seed(0)
        head = ScalarHead(lm.model.config.dim_model)
    return pair_metrics(lm.model, lm.tokenizer, str(path), lm.chat_templates.get(lm.active), head)


def plot_curves(runs: dict[str, Path], out: Path, reward_title: str = "reward-model score of sampled answers") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        train = [r for r in read_records(run) if r["type"] == "train"]
        evals = [r for r in read_records(run) if r["type"] == "eval"]
        key = "objective/scores" if name.startswith("PPO") else "reward"
        axes[0].plot([r["step"] for r in train], [r[key] for r in train], alpha=0.5, label=f"{name} train reward")
        axes[0].plot([r["step"] for r in evals], [r["val_reward"] for r in evals], marker="o",
                     label=f"{name} dev reward")
        axes[1].plot([r["step"] for r in train], [r["objective/kl"] for r in train], label=f"{name} KL (train)")
        axes[1].plot([r["step"] for r in evals], [r["val_kl"] for r in evals], marker="o", label=f"{name} KL (dev)")
    axes[0].set(title=reward_title, xlabel="step")
    axes[1].set(title="KL to the SFT policy (nats per answer)", xlabel="step")
    for axis in axes:
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def markdown(results: dict) -> str:
    """The README's tables."""
    sft = results["sft"]
    lines = ["| task (test, n) | base: ROUGE-L / exact | SFT: ROUGE-L / exact |", "|---|---|---|"]
    for task, after in sft["after"].items():
        before = sft["before"][task]
        lines.append(f"| {task} ({after['n']}) | {before['rouge_l']:.3f} / {before['exact']:.3f} | "
                     f"{after['rouge_l']:.3f} / {after['exact']:.3f} |")
    lines += ["", "| preference pairs (test) | pair accuracy | mean margin |", "|---|---|---|"]
    for label, row in (("reward model at the start (SFT + untrained head)", results["rm"]["before"]),
                       ("reward model, trained", results["rm"]["after"]),
                       ("SFT policy (log-probability)", results["dpo"]["before"]),
                       ("DPO policy (log-probability)", results["dpo"]["after"])):
        lines.append(f"| {label} | {row['pair_accuracy']:.3f} | {row['mean_margin']:.3f} |")
    rl = results["rl"]
    lines += ["", "| headline policy (test) | ROUGE-L | exact | dev reward: start → end "
              "| dev answer tokens: start → end | dev KL at the end |", "|---|---|---|---|---|---|",
              f"| SFT | {rl['sft']['rouge_l']:.3f} | {rl['sft']['exact']:.3f} | | | |"]
    labels = {"ppo": "SFT + PPO", "ppo_eos": "SFT + PPO, missing_eos_penalty 1", "grpo": "SFT + GRPO",
              "grpo_rouge": "SFT + GRPO, reward = ROUGE-L (no reward model)"}
    for name, label in labels.items():
        row = rl[name]
        lines.append(f"| {label} | {row['rouge_l']:.3f} | {row['exact']:.3f} | "
                     f"{row['first_dev_reward']:.3f} → {row['last_dev_reward']:.3f} | "
                     f"{row['first_dev_length']:.1f} → {row['last_dev_length']:.1f} | {row['last_dev_kl']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--work", default="runs/align-bench")
    parser.add_argument("--out", default="docs", help="where align-rl.png and align-results.json go")
    parser.add_argument("--per-task", type=int, default=600, help="training items per task")
    parser.add_argument("--eval-size", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None, help="SFT / RM / DPO steps (default: the recipes')")
    parser.add_argument("--rl-steps", type=int, default=None, help="PPO / GRPO rollout batches (default: the recipes')")
    parser.add_argument("--report", action="store_true", help="print the tables of OUT/align-results.json and stop")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads((Path(args.out) / "align-results.json").read_text())))
        return
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    split = split_items(build_items(load_sources(), seed=0),
                        {"train": args.per_task, "dev": args.eval_size, "test": args.eval_size})
    write_items(work / "sft", split, "sft")
    write_items(work / "pairs", split, "preference")
    headline = {name: [i for i in items if i.task == "headline"] for name, items in split.items()}
    write_items(work / "headline", headline, "sft")
    results: dict = {"counts": {name: len(items) for name, items in split.items()}}

    def recipe(method: str, data: str, **extra: object) -> AlignConfig:
        """``recipes/align-METHOD.yaml`` on this run's data and directories."""
        overrides = [f"data={work / data}/train.jsonl", f"eval={work / data}/dev.jsonl",
                     f"out={work / f'run-{method}'}", f"model={args.model}", *[f"{k}={v}" for k, v in extra.items()]]
        return AlignConfig.from_file(ROOT / "recipes" / f"align-{method}.yaml", overrides)

    steps = {} if args.steps is None else {"max_steps": args.steps}
    rl_steps = {} if args.rl_steps is None else {"max_steps": args.rl_steps}
    sft = stage("sft", recipe("sft", "sft", **steps))
    results["sft"] = {"before": task_metrics(args.model, split["test"], None),
                      "after": task_metrics(args.model, split["test"], sft)}
    print(json.dumps(results["sft"], ensure_ascii=False), flush=True)

    rm = stage("rm", recipe("rm", "pairs", adapter=sft, **steps))
    results["rm"] = {"before": pair_figures(args.model, work / "pairs/test.jsonl", sft, reward=True),
                     "after": pair_figures(args.model, work / "pairs/test.jsonl", rm, reward=True)}
    print(json.dumps(results["rm"]), flush=True)

    dpo = stage("dpo", recipe("dpo", "pairs", adapter=sft, **steps))
    results["dpo"] = {"before": pair_figures(args.model, work / "pairs/test.jsonl", sft),
                      "after": pair_figures(args.model, work / "pairs/test.jsonl", dpo)}
    print(json.dumps(results["dpo"]), flush=True)

    ppo = stage("ppo", recipe("ppo", "headline", adapter=sft, reward_model=rm, **rl_steps))
    grpo = stage("grpo", recipe("grpo", "headline", adapter=sft, reward_model=rm, **rl_steps))
    # The same PPO with TRL's missing_eos_penalty: the reward model likes long answers, and
    # without it the policy learns to run to the token limit.
    eos = recipe("ppo", "headline", adapter=sft, reward_model=rm, missing_eos_penalty=1.0, **rl_steps)
    eos.out = str(work / "run-ppo-eos")
    ppo_eos = stage("ppo-eos", eos)
    # GRPO on a reward that cannot be gamed that way: ROUGE-L against the reference title.
    rouge = recipe("grpo", "headline", adapter=sft, reward="rouge", **rl_steps)
    rouge.out = str(work / "run-grpo-rouge")
    grpo_rouge = stage("grpo-rouge", rouge)
    runs = {"ppo": (ppo, work / "run-ppo"), "ppo_eos": (ppo_eos, work / "run-ppo-eos"),
            "grpo": (grpo, work / "run-grpo"), "grpo_rouge": (grpo_rouge, work / "run-grpo-rouge")}
    results["rl"] = {"sft": task_metrics(args.model, headline["test"], sft)["headline"],
                     **{name: task_metrics(args.model, headline["test"], best)["headline"]
                        for name, (best, _) in runs.items()}}
    for name, (_, run) in runs.items():
        evals = [r for r in read_records(run) if r["type"] == "eval"]
        results["rl"][name].update({"first_dev_reward": evals[0]["val_reward"],
                                    "last_dev_reward": evals[-1]["val_reward"],
                                    "last_dev_kl": evals[-1]["val_kl"], "first_dev_length": evals[0]["val_length"],
                                    "last_dev_length": evals[-1]["val_length"]})
    plot_curves({"PPO": work / "run-ppo", "PPO, missing_eos_penalty 1": work / "run-ppo-eos",
                 "GRPO": work / "run-grpo"}, out / "align-rl.png")
    plot_curves({"GRPO, reward = ROUGE-L": work / "run-grpo-rouge"}, out / "align-grpo-rouge.png",
                "ROUGE-L of sampled titles against the reference")
    (out / "align-results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
