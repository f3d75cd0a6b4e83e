"""The CPM-2 demo (``cpm2-demo``): a tiny CPM-2 pretrained as CPM-2 was, with span corruption in the
original's layout, on the embedded corpora (People's Daily 1998, Hongloumeng), over a 4096-token
vocabulary laid out as CPM-2's (:func:`~cpmlive.tokenizer.vocab.build_cpm2_vocab`).

The original's layout (``src/data/enc_dec_dataset.py`` of CPM-2-Pretrain): the encoder reads the
text with each dropped span replaced by ``<s_k>``; the decoder starts from ``<s_0>`` and writes
``span0 <s_1> span1 ... <s_n>``. So a prompt that ends with ``<s_0>`` gets its continuation.

    python -m cpmlive.train.cpm2_demo --vocab data/cpm2-demo-vocab --out runs/cpm2-demo --steps 1500
    python -m cpmlive.train.cpm2_demo --vocab data/cpm2-demo-vocab --out runs/cpm2-demo --export DIR
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace

import torch

from cpmlive.errors import CpmliveError
from cpmlive.model.cpm2.config import PRESETS
from cpmlive.model.cpm2.model import build_cpm2
from cpmlive.tokenizer.cpm2 import Cpm2Tokenizer
from cpmlive.tokenizer.vocab import build_cpm2_vocab
from cpmlive.train.cpm1_demo import CORPORA, corpus_texts
from cpmlive.train.t5_demo import add_arguments, corrupt, export, pieces_of, train, training_texts

VOCAB_SIZE = 4096
SHAPE = dict(dim_model=128, dim_ff=320, num_layers=3, num_encoder_layers=3, num_heads=4, dim_head=32)


def demo_config():
    return replace(PRESETS["cpm2-tiny"](), **SHAPE)


def cpm2_example(ids: list[int], tokenizer: Cpm2Tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """The original's layout: the decoder (from ``<s_0>``) writes each span, then the next sentinel."""
    encoder, target = corrupt(ids, tokenizer.sentinel, rng)
    spans = sum(1 for token in target if token in tokenizer.sentinels)
    return encoder, target[1:] + [tokenizer.sentinel(spans)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.cpm2_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        vocab = args.vocab / "vocab.txt"
        if not vocab.is_file():
            args.vocab.mkdir(parents=True, exist_ok=True)
            Cpm2Tokenizer(build_cpm2_vocab(corpus_texts(CORPORA), VOCAB_SIZE)).save(vocab)
        if args.export is not None:
            print(f"wrote {export(args.out, demo_config(), vocab, args.export)}")
            return 0
        tokenizer = Cpm2Tokenizer.from_file(vocab)
        torch.manual_seed(0)
        train(build_cpm2(demo_config()), lambda ids, rng: cpm2_example(ids, tokenizer, rng),
              pieces_of(tokenizer, training_texts()), tokenizer.pad_id, args.out, args.steps, args.batch, args.lr,
              args.save_every, args.resume == "auto", "cpm2-demo")
    except CpmliveError as exc:
        print(f"cpm2_demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
