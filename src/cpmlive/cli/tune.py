"""The delta-tuning verbs: ``finetune`` and ``merge`` (an adapter folded into its base)."""

from __future__ import annotations

import argparse

from cpmlive.cli.common import Verbs, add_force, add_recipe_arguments, recipe_overrides


def add_finetune(verbs: Verbs) -> None:
    tune = verbs.add_parser("finetune", help="delta-tune a model on a JSONL task (LoRA, soft prompt, norms)")
    add_recipe_arguments(tune, {
        "model": {"help": "base checkpoint directory or 'demo'"}, "task": {"choices": ("generate", "classify")},
        "data": {"help": "training JSONL"}, "eval": {"help": "validation JSONL"}, "out": {"help": "run directory"},
    }, overrides_help="key=value overrides (delta.r=16, lr=5e-4, ...)")
    tune.set_defaults(run=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> None:
    from cpmlive.tune.finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_file(args.config, recipe_overrides(args))
    best = finetune(config, resume=args.resume)
    print(f"best adapter -> {best}")


def add_merge(verbs: Verbs) -> None:
    mrg = verbs.add_parser("merge", help="fold a LoRA/prompt/bitfit adapter into its base checkpoint")
    mrg.add_argument("base", help="base checkpoint directory or 'demo'")
    mrg.add_argument("adapter", help="adapter directory (ours or HF PEFT's)")
    mrg.add_argument("out", help="output checkpoint directory")
    mrg.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as the base)")
    add_force(mrg)
    mrg.set_defaults(run=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> None:
    from cpmlive.utils import parse_dtype
    from cpmlive.tune.delta import merge_checkpoint

    out = merge_checkpoint(args.base, args.adapter, args.out, dtype=parse_dtype(args.dtype), force=args.force)
    print(f"wrote {out}")
