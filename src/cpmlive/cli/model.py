"""The model verbs: ``convert``, ``download``, ``info`` and ``tokenize``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cpmlive.cli.common import Verbs, add_force, print_json, prompt_from, warnings_as_lines
from cpmlive.errors import CpmliveError

if TYPE_CHECKING:
    from cpmlive.model.registry import Family


class TargetFormats(Sequence[str]):
    """The formats ``convert --to`` writes: every registered family's ``FORMATS`` (declared in its
    package's ``__init__``, which imports nothing), in registry order. Read when argparse first
    checks or shows them, so that building the parser imports no model code."""

    @cached_property
    def names(self) -> tuple[str, ...]:
        from cpmlive.model.registry import FAMILY_PACKAGES

        found: dict[str, None] = {}
        for package in FAMILY_PACKAGES:
            found.update(dict.fromkeys(importlib.import_module(f"cpmlive.model.{package}").FORMATS))
        return tuple(found)

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)


def add_convert(verbs: Verbs) -> None:
    conv = verbs.add_parser("convert", help="convert OpenBMB .pt / HF / our checkpoints")
    conv.add_argument("src")
    conv.add_argument("dst")
    # given after add_argument, which formats the flag's usage (and so would read the formats) at once
    conv.add_argument("--to", default="ours").choices = TargetFormats()
    conv.add_argument("--config", help="config json for an OpenBMB .pt (default: inferred from the shapes)")
    conv.add_argument("--vocab", help="vocabulary file to include")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (--to gguf: f32 | f16 | q8_0)")
    conv.add_argument("--dequantize", action="store_true",
                      help="write a quantized checkpoint with float weights (always done for --to hf/openbmb)")
    add_force(conv)
    conv.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import family_of
    from cpmlive.train.sharded import consolidate, is_sharded
    from cpmlive.utils import parse_dtype

    if is_sharded(Path(args.src)):  # a training checkpoint several ranks wrote: one model directory
        if args.to != "ours":
            raise CpmliveError(f"{args.src} is a sharded training checkpoint: convert it to ours first, "
                               "then to --to " + args.to)
        print(f"wrote {consolidate(Path(args.src), Path(args.dst), dtype=parse_dtype(args.dtype), force=args.force)}")
        return
    with warnings_as_lines():
        out = family_of(args.src).convert(args.src, args.dst, to=args.to, config_path=args.config,
                                          vocab_path=args.vocab, dtype=args.dtype, force=args.force,
                                          dequantize=args.dequantize)
    print(f"wrote {out}")


def add_download(verbs: Verbs) -> None:
    down = verbs.add_parser("download", help="download a published model repository from the Hugging Face Hub")
    down.add_argument("repo", help="owner/name, e.g. openbmb/cpm-ant-10b (README: Getting the published models)")
    down.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    down.add_argument("--out", default=None, help="write the files here (default: the hub's cache, HF_HOME)")
    down.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                      help="only the files matching these glob patterns (e.g. config.json '*.bin' vocab.txt)")
    add_force(down)
    down.set_defaults(run=cmd_download)


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


def add_info(verbs: Verbs) -> None:
    info = verbs.add_parser("info", help="describe a checkpoint or preset")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)


def cmd_info(args: argparse.Namespace) -> None:
    from cpmlive.model.registry import ALL_PRESETS, family_of

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


def add_tokenize(verbs: Verbs) -> None:
    tok = verbs.add_parser("tokenize", help="show the token ids and pieces of a text")
    tok.add_argument("model_or_vocab")
    tok.add_argument("text", nargs="?")
    tok.add_argument("--prompt-file")
    tok.add_argument("--hf", action="store_true", help="HF CpmAntTokenizer behaviour (HMM off, <s> added)")
    tok.add_argument("--json", action="store_true")
    tok.set_defaults(run=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> None:
    text = prompt_from(args)
    from cpmlive.model.registry import DEFAULT
    from cpmlive.resources import vocab_path

    kind = vocabulary_family(args.model_or_vocab)
    path = vocab_path(args.model_or_vocab, kind.vocab_name)
    tokenizer = kind.tokenizer.from_file(path)
    if args.hf:
        try:  # the family's tokenizer says whether it has an HF mode
            tokenizer = kind.tokenizer.for_model(path, tokenizer.vocab_size, hf_compat=True)
        except CpmliveError:
            raise CpmliveError(f"--hf is {DEFAULT.name}'s (HF CpmAntTokenizer's behaviour); "
                               f"{kind.name}'s tokenizer has no HF mode") from None
    encoded = tokenizer.encode(text)
    # a tokenizer with an ext table (CPM-Bee's: pieces beyond its vocabulary) gives it beside the ids
    ids, ext = encoded if isinstance(encoded, tuple) else (encoded, {})
    pieces = [ext[i] if i in ext else tokenizer.id_to_token(i) for i in ids]
    if args.json:
        print_json({"ids": ids, "pieces": pieces, **({"ext_table": ext} if ext else {})})
    else:
        print(" ".join(f"{p!r}:{i}" for p, i in zip(pieces, ids)))


def vocabulary_family(model_or_vocab: str) -> Family:
    """The family of a checkpoint directory; for a bare vocabulary file, the family whose
    vocabulary has its suffix where they all read it with one tokenizer (a SentencePiece ``.model``
    is CPM-1's, a ``tokenizer.json`` HF's), else the default family."""
    from cpmlive.model.registry import DEFAULT, families, family_of
    from cpmlive.resources import model_path

    if model_path(model_or_vocab).is_dir():
        return family_of(model_or_vocab)
    suffix = Path(model_or_vocab).suffix
    owners = [kind for kind in families().values() if Path(kind.vocab_name).suffix == suffix]
    return owners[0] if owners and len({kind.tokenizer for kind in owners}) == 1 else DEFAULT
