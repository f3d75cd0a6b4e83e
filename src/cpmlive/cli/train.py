"""The pretraining verbs: ``pretrain`` and ``report`` (a run's training log)."""

from __future__ import annotations

import argparse
import os

from cpmlive.cli.common import Verbs, add_recipe_arguments, recipe_overrides


def add_pretrain(verbs: Verbs) -> None:
    pre = verbs.add_parser("pretrain", help="pretrain a model on a token store, with its family's objective")
    add_recipe_arguments(pre, {}, overrides_help="key=value overrides of the recipe")
    pre.set_defaults(run=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from cpmlive.train.launch import pretrain
    from cpmlive.train.pretrain import PretrainConfig

    config = PretrainConfig.from_file(args.config, recipe_overrides(args))
    state = pretrain(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {state.step} steps, {state.tokens} tokens -> {config.out}")


def add_report(verbs: Verbs) -> None:
    rep = verbs.add_parser("report", help="write a run's training log (markdown and plots)")
    rep.add_argument("run_dir")
    rep.add_argument("--out", default=None, help="output directory (default: RUN_DIR/reports)")
    rep.add_argument("--day", default=None, help="only this UTC day, YYYY-MM-DD (writes report-DAY.md)")
    rep.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    from cpmlive.train.report import write_report

    print(f"wrote {write_report(args.run_dir, out=args.out, day=args.day)}")
