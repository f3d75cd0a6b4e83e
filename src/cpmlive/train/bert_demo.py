"""The BERT demo (``bert-demo``): a small Chinese BERT pretrained with BERT's masked-token objective
on the embedded corpora (People's Daily 1998, Hongloumeng), over a 4000-token WordPiece tokenizer
in bert-base-chinese's pipeline (every CJK character a word).

Masking as BERT's: 15% of the tokens are chosen, 80% of those become ``[MASK]``, 10% a random
token, 10% stay; the loss is over the chosen ones. The run resumes exactly (``--resume auto``).

    python -m cpmlive.train.bert_demo --vocab data/bert-demo-vocab --out runs/bert-demo --steps 1500
    python -m cpmlive.train.bert_demo --vocab data/bert-demo-vocab --out runs/bert-demo --export DIR
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from cpmlive.errors import CpmliveError
from cpmlive.model.bert.config import PRESETS
from cpmlive.model.bert.model import Bert, build_bert
from cpmlive.tokenizer.hf import HFTokenizer
from cpmlive.tokenizer.hf_train import train_tokenizer
from cpmlive.train.cpm1_demo import CORPORA, corpus_texts
from cpmlive.train.t5_demo import add_arguments, export, pad, pieces_of, train, training_texts

VOCAB_SIZE = 4000
SHAPE = dict(dim_model=128, dim_ff=512, num_layers=3, num_heads=4, dim_head=32,
             max_length=160)
CHOSEN = 0.15


def demo_config(tokenizer: HFTokenizer):
    """The demo's shape, its embedding as large as the tokenizer (WordPiece keeps every character
    it saw beside the pieces it learned)."""
    return replace(PRESETS["bert-tiny"](), **{**SHAPE, "vocab_size": tokenizer.vocab_size})


def masked_example(ids: list[int], tokenizer: HFTokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input ids with ``[CLS]``/``[SEP]`` and BERT's masking, targets: -100 where not chosen)."""
    row = [tokenizer.token_to_id("[CLS]"), *ids, tokenizer.eos_id]
    inputs, targets = list(row), [-100] * len(row)
    for position in range(1, len(row) - 1):
        if rng.random() >= CHOSEN:
            continue
        targets[position] = row[position]
        roll = rng.random()
        if roll < 0.8:
            inputs[position] = tokenizer.mask_id
        elif roll < 0.9:
            inputs[position] = rng.randrange(len(tokenizer.tokens))
    return inputs, targets


def masked_loss(model: Bert, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    inputs, targets = pad([r for r, _ in rows], pad_id), pad([t for _, t in rows], -100)
    valid = pad([[1] * len(r) for r, _ in rows], 0).bool()
    logits = model.logits(model(inputs, valid=valid))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.bert_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        vocab = args.vocab / "tokenizer.json"
        if not vocab.is_file():
            train_tokenizer(corpus_texts(CORPORA), VOCAB_SIZE, args.vocab, style="wordpiece", model_max_length=158)
        tokenizer = HFTokenizer(vocab)
        if args.export is not None:
            print(f"wrote {export(args.out, demo_config(tokenizer), vocab, args.export)}")
            return 0
        torch.manual_seed(0)
        train(build_bert(demo_config(tokenizer)), lambda ids, rng: masked_example(ids, tokenizer, rng),
              pieces_of(tokenizer, training_texts()), tokenizer.pad_id, args.out, args.steps, args.batch, args.lr,
              args.save_every, args.resume == "auto", "bert-demo",
              loss=lambda model, rows: masked_loss(model, rows, tokenizer.pad_id))
    except CpmliveError as exc:
        print(f"bert_demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
