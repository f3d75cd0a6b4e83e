"""``cpmlive align sft|rm|dpo|ppo|grpo``."""

from __future__ import annotations

import argparse

from cpmlive.cli.common import Verbs, add_recipe_arguments, recipe_overrides


def add_align(verbs: Verbs) -> None:
    al = verbs.add_parser("align", help="align a model: sft, rm (reward model), dpo, ppo or grpo (TRL's data formats)")
    methods = al.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method, what in (("sft", "instruction tuning on {prompt, completion} or {messages}"),
                         ("rm", "a reward model on {prompt, chosen, rejected}"),
                         ("dpo", "direct preference optimisation (sigmoid, robust or ipo loss)"),
                         ("ppo", "PPO against a reward model (reward_model=DIR)"),
                         ("grpo", "GRPO: group-relative advantages over num_samples rollouts")):
        sub = methods.add_parser(method, help=what)
        add_recipe_arguments(sub, {
            "model": {"help": "base checkpoint directory or 'demo'"}, "data": {"help": "training JSONL"},
            "eval": {"help": "validation JSONL"}, "out": {"help": "run directory (its best/ is the adapter)"},
            "adapter": {"help": "start from this adapter (its frozen copy is the reference)"},
        }, overrides_help="key=value overrides (beta=0.1, max_steps=60, ...)")
        sub.set_defaults(run=cmd_align)


def cmd_align(args: argparse.Namespace) -> None:
    from cpmlive.align.recipes import AlignConfig, align

    overrides = [f"method={args.method}", *recipe_overrides(args)]
    config = AlignConfig.from_file(args.config, overrides)
    best = align(config, resume=args.resume)
    print(f"best adapter -> {best}")
