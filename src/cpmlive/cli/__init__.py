"""``cpmlive <verb>``: each verb is a thin function over one stage's API. Each stage's module
here holds its verbs' parsers beside their handlers (:mod:`cpmlive.cli.infer`: generate, fill,
bee, chat, title; :mod:`~cpmlive.cli.model`: convert, download, info, tokenize; ...); shared
flags and helpers are in :mod:`cpmlive.cli.common`. No verb names a model family: each asks the
checkpoint's family (:mod:`cpmlive.model.registry`) what it can do.

Bad input prints one line on stderr and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from cpmlive.cli import align, classify, compress, data, evaluate, infer, model, serve, train, tune
from cpmlive.cli.common import EXIT_BAD_INPUT, Parser, Verbs
from cpmlive.errors import CpmliveError
from cpmlive.model.runtime import threads

# The verbs that train (their steps run OpenMP's default waits: model/runtime/threads.py).
TRAINING_MODULES = frozenset({train.__name__, tune.__name__, align.__name__, compress.__name__})

# Every verb, in the order `cpmlive --help` lists them: each adds its parser to the verbs.
VERBS: tuple[Callable[[Verbs], None], ...] = (
    infer.add_generate, infer.add_fill, infer.add_bee, model.add_convert, model.add_download, compress.add_quantize,
    compress.add_compress, model.add_info, model.add_tokenize, data.add_vocab, data.add_data, evaluate.add_evaluate,
    train.add_pretrain, tune.add_finetune, align.add_align, infer.add_chat, infer.add_title, serve.add_dashboard,
    serve.add_serve, train.add_report, tune.add_merge, train.add_plan, classify.add_classify,
)


def build_parser() -> Parser:
    parser = Parser(prog="cpmlive", description="CPM-Live: CPM models of every family, end to end")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for add_verb in VERBS:
        add_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse cannot match an optional positional that follows a flag: take it here.
    if len(extras) == 1 and getattr(args, "text", "") is None and not extras[0].startswith("--"):
        args.text, extras = extras[0], []
    if len(extras) == 1 and getattr(args, "task", "") is None and not extras[0].startswith("--"):
        args.task, extras = extras[0], []
    # argparse fills a `key=value ...` positional once: overrides after a flag (--recipe R a=1) arrive here.
    if isinstance(getattr(args, "overrides", None), list) and extras and not any(e.startswith("-") for e in extras):
        args.overrides, extras = [*args.overrides, *extras], []
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    run: Callable[[argparse.Namespace], None] = args.run
    if run.__module__ in TRAINING_MODULES:
        threads.for_training()  # before torch starts OpenMP (model/runtime/threads.py)
    try:
        run(args)
    except CpmliveError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"cpmlive: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a destination that cannot be written, a full disk, a vanished file...
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cpmlive: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("cpmlive: error: out of memory (try a smaller batch, model or max_new_tokens)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cpmlive: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "main"]
