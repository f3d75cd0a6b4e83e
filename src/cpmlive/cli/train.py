"""The pretraining verbs: ``pretrain``, ``report`` (a run's training log) and ``plan`` (memory)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cpmlive.cli.common import Verbs, add_recipe_arguments, print_json, recipe_overrides


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


def add_plan(verbs: Verbs) -> None:
    plan = verbs.add_parser("plan", help="memory per device to train or serve a model, and which layouts fit")
    plan.add_argument("model", help="a preset (cpmlive info lists them) or a checkpoint directory")
    plan.add_argument("--gpus", type=int, default=1)
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one device (80GB, 24GiB, 6GB)")
    plan.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: every size that fits)")
    plan.add_argument("--seq", type=int, default=None, help="tokens per row (default: the model's max_length, "
                      "at most 4096)")
    plan.add_argument("--batch", type=int, default=1, help="rows per device (micro-batch), and sequences served")
    plan.add_argument("--offload", action="store_true", help="parameter, gradient and optimizer shards in host memory")
    plan.add_argument("--adapter", choices=["lora"], default=None, help="train a LoRA adapter over frozen weights")
    plan.add_argument("--lora-rank", type=int, default=8)
    plan.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    plan.add_argument("--json", action="store_true", help="per layout, the per-device byte counts as JSON")
    plan.set_defaults(run=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import ALL_PRESETS, family_of, preset
    from cpmlive.train.plan import PlanRequest, as_json, parse_bytes, plan, table

    if args.model in ALL_PRESETS and not Path(args.model).exists():
        config = preset(args.model)
    else:
        family = family_of(args.model)
        config = family.config.from_dict(family.info(args.model)["config"])
    seq = args.seq if args.seq is not None else min(config.max_length, 4096)
    request = PlanRequest(gpus=args.gpus, gpu_memory=parse_bytes(args.gpu_memory), tp=args.tp, seq=seq,
                          batch=args.batch, offload=args.offload, adapter=args.adapter, lora_rank=args.lora_rank,
                          precision=args.precision)
    layouts = plan(config, request)
    if args.json:
        print_json(as_json(config, request, layouts))
    else:
        print(table(config, request, layouts))
