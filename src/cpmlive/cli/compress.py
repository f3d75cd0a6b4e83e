"""The compression verbs: ``quantize`` and ``compress`` (a recipe of prune, distill, quantize... steps)."""

from __future__ import annotations

import argparse
import sys

from cpmlive.cli.common import Verbs, add_force, positive_int, warnings_as_lines
from cpmlive.errors import CpmliveError


def add_quantize(verbs: Verbs) -> None:
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


def add_compress(verbs: Verbs) -> None:
    comp = verbs.add_parser("compress", help="prune, distill and quantize a model, as a recipe's steps say")
    comp.add_argument("model", help="float checkpoint (any format) or 'demo'")
    comp.add_argument("out", help="output model directory (its run is kept in OUT.run/)")
    comp.add_argument("--recipe", required=True, help="YAML recipe: data, steps (prune / distill / quantize), ...")
    comp.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    comp.add_argument("--resume", choices=["auto"], default=None, help="continue the run in OUT.run/")
    add_force(comp)
    comp.set_defaults(run=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> None:
    from cpmlive.compress.pipeline import CompressRecipe, compress

    recipe = CompressRecipe.from_file(args.recipe, args.overrides)
    if recipe.run_time:
        print(f"cpmlive: {args.recipe} takes {recipe.run_time}", file=sys.stderr)
    with warnings_as_lines():
        out = compress(args.model, args.out, recipe, resume=args.resume, force=args.force)
    print(f"wrote {out}")
