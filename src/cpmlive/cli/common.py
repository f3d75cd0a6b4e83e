"""What every verb's module shares: the parser class, argument types that refuse a bad value in
one line, the flags of the model verbs, reading the text and loading the model, printing."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from cpmlive.errors import CpmliveError

EXIT_BAD_INPUT = 2
# What ``add_subparsers`` returns: each verb's module adds its parsers to it.
Verbs = argparse._SubParsersAction


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
    "num_assistant_tokens": int, "prompt_lookup_num_tokens": int, "max_matching_ngram_size": int,
}


def add_generation_flags(parser: argparse.ArgumentParser, default_new_tokens: int | None) -> None:
    parser.add_argument("model", help="checkpoint directory, 'demo', or a preset name")
    parser.add_argument("text", nargs="?", help="the prompt, or - to read stdin")
    parser.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    add_decoding_flags(parser, default_new_tokens)
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    add_model_flags(parser)


def add_decoding_flags(parser: argparse.ArgumentParser, default_new_tokens: int | None) -> None:
    """``--max-new-tokens``, ... (:data:`GENERATION_FLAGS`), ``--do-sample`` and ``--greedy``
    (``default_new_tokens`` None: the model's generation config, else the API's default)."""
    for name, kind in GENERATION_FLAGS.items():
        default = default_new_tokens if name == "max_new_tokens" else None
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--greedy", action="store_true",
                        help="decode greedily even where the model's generation_config.json samples")


def add_structure_flags(parser: argparse.ArgumentParser) -> None:
    """Structured output (``infer.structured``): JSON, a JSON Schema, a regex or a Lark grammar."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-object", action="store_true", help="the text is one JSON object")
    group.add_argument("--json-schema", metavar="SCHEMA", help="the text is JSON valid against SCHEMA "
                       "(a .json file, or the schema itself)")
    group.add_argument("--regex", metavar="PATTERN", help="the text matches PATTERN")
    group.add_argument("--grammar", metavar="FILE", help="the text follows the Lark grammar in FILE")


def structure_kwargs(args: argparse.Namespace) -> dict:
    """The structured-output options of :func:`add_structure_flags` as the API takes them."""
    if getattr(args, "json_object", False):
        return {"response_format": {"type": "json_object"}}
    if getattr(args, "json_schema", None):
        text = args.json_schema
        if not text.lstrip().startswith("{") and Path(text).suffix == ".json":
            text = read_text_file(text)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CpmliveError(f"--json-schema: not valid JSON ({exc})") from None
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}}
    if getattr(args, "regex", None):
        return {"guided_regex": args.regex}
    if getattr(args, "grammar", None):
        return {"guided_grammar": read_text_file(args.grammar)}
    return {}


def add_assistant_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assistant-model", default=None, metavar="MODEL",
                        help="speculative decoding: a smaller model with the same vocabulary drafts tokens "
                             "(a pruned, distilled or quantized twin); --num-assistant-tokens K drafts K at first")


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
    parser.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE", help="keep at most SIZE "
                        "of weights resident (e.g. 4GB); other blocks stream from the checkpoint")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line (what is left out the model's generation
    config or the API's defaults decide)."""
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    if args.do_sample and args.greedy:
        raise CpmliveError("give --do-sample or --greedy, not both")
    if args.do_sample or args.greedy:
        kwargs["do_sample"] = bool(args.do_sample)
    if getattr(args, "assistant_model", None):
        kwargs["assistant_model"] = args.assistant_model
    return {**kwargs, **structure_kwargs(args)}


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


def print_json(data: object) -> None:
    print(json.dumps(data, ensure_ascii=False))


def print_metrics(metrics: dict, as_json: bool) -> None:
    """Metrics as a JSON object, or ``name value`` pairs on one line (floats to 4 places)."""
    if as_json:
        print_json(metrics)
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


# ---- the training recipes' verbs (pretrain, finetune, align) ------------------------------------


def add_recipe_arguments(parser: argparse.ArgumentParser, flags: dict[str, dict], overrides_help: str) -> None:
    """``--config``, the recipe keys that have a flag of their own (``--data F`` is ``data=F``),
    ``--resume``, then ``key=value`` overrides."""
    parser.add_argument("--config", help="YAML recipe (see recipes/)")
    for key, options in flags.items():
        parser.add_argument(f"--{key}", default=None, **options)
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run) or a checkpoint dir")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.set_defaults(recipe_flags=tuple(flags))


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides given, then one per recipe flag given (``--data F``: ``data=F``)."""
    given = (key for key in args.recipe_flags if getattr(args, key) is not None)
    return [*args.overrides, *(f"{key}={getattr(args, key)}" for key in given)]
