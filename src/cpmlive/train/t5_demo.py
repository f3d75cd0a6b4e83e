"""The T5 demo (``t5-demo``): a small T5 v1.1 pretrained with T5's span corruption on the embedded
corpora (People's Daily 1998, Hongloumeng), over an 8000-token T5-style Unigram tokenizer.

Span corruption as T5 does it: 15% of a document's tokens are dropped in spans of mean length 3;
the encoder reads the rest with each span replaced by a sentinel (``<extra_id_0>``, ``<extra_id_1>``
...), the decoder writes ``<extra_id_0> span0 <extra_id_1> span1 ... </s>``. The run saves its
state every ``--save-every`` steps (atomically) and ``--resume auto`` continues it exactly.

    python -m cpmlive.train.t5_demo --vocab data/t5-demo-vocab --out runs/t5-demo --steps 3000 --resume auto
    python -m cpmlive.train.t5_demo --vocab data/t5-demo-vocab --out runs/t5-demo --export DIR
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.model.loss import seq2seq_loss
from cpmlive.model.t5.config import PRESETS
from cpmlive.model.t5.model import build_t5
from cpmlive.tokenizer.hf import HFTokenizer
from cpmlive.tokenizer.hf_train import T5_SENTINELS, train_tokenizer
from cpmlive.train.cpm1_demo import CORPORA, corpus_texts, held_out

VOCAB_SIZE = 8000
SHAPE = dict(vocab_size=VOCAB_SIZE, dim_model=256, dim_ff=640, num_layers=4, num_encoder_layers=4, num_heads=4,
             dim_head=64, max_length=512)
INPUT_TOKENS = 128
NOISE, MEAN_SPAN = 0.15, 3.0
STATE_NAME = "state.pt"
SHIPPED_SHARD_BYTES = 18 * 2**20  # a shipped demo's files stay under 20 MiB each (bee-demo's rule)


def demo_config():
    return replace(PRESETS["t5-tiny"](), **SHAPE)


def corrupt(ids: list[int], sentinel: Callable[[int], int], rng: random.Random) -> tuple[list[int], list[int]]:
    """T5's span corruption of ``ids``: the encoder's ids (each span replaced by its sentinel) and
    the decoder's targets (each sentinel followed by its span), no end token yet."""
    count = max(1, round(len(ids) * NOISE))
    spans = max(1, min(T5_SENTINELS - 1, round(count / MEAN_SPAN)))
    starts = sorted(rng.sample(range(len(ids)), spans))
    masked: dict[int, int] = {}
    for number, start in enumerate(starts):
        length = max(1, min(round(rng.expovariate(1 / MEAN_SPAN)), len(ids) - start))
        for position in range(start, start + length):
            masked.setdefault(position, number)
    encoder, target, previous, seen = [], [], None, 0
    for position, token in enumerate(ids):
        span = masked.get(position)
        if span is None:
            encoder.append(token)
        else:
            if span != previous:
                encoder.append(sentinel(seen))
                target.append(sentinel(seen))
                seen += 1
            target.append(token)
        previous = span
    return encoder, target


def t5_example(ids: list[int], tokenizer: HFTokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """T5's layout: ``</s>`` ends both the encoder's row and the targets."""
    encoder, target = corrupt(ids, lambda i: tokenizer.token_to_id(f"<extra_id_{i}>"), rng)
    return encoder + [tokenizer.eos_id], target + [tokenizer.eos_id]


def pieces_of(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Pieces of up to :data:`INPUT_TOKENS` tokens of every text (longer than 16)."""
    pieces = []
    for text in texts:
        ids = tokenizer.encode(text)
        chunks = (ids[i:i + INPUT_TOKENS] for i in range(0, len(ids), INPUT_TOKENS))
        pieces += [chunk for chunk in chunks if len(chunk) > 16]
    return pieces


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def loss_of(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    return seq2seq_loss(model, rows, pad_id)[0]


def train(model: Any, example: Callable, pieces: list[list[int]], pad_id: int, out: Path, steps: int, batch: int,
          lr: float, save_every: int, resume: bool, name: str, loss: Callable | None = None) -> Path:
    """Train ``model`` on examples made of ``pieces`` (``example`` lays one out, ``loss`` scores a
    batch of them: span corruption's by default) for ``steps`` steps, saving the run's whole state
    every ``save_every`` (atomically) and resuming it exactly."""
    loss = loss or (lambda model, rows: loss_of(model, rows, pad_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng, step = random.Random(0), 0
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / STATE_NAME).is_file():
        state = torch.load(out / STATE_NAME, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    model.train()
    bar = tqdm(total=steps, initial=step, desc=name, unit="step")
    while step < steps:
        scale = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.1)
        value = loss(model, [example(rng.choice(pieces), rng) for _ in range(batch)])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value.item():.3f}")
        if step % save_every == 0 or step == steps:
            temporary = out / f".{STATE_NAME}"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "step": step, "loss": value.item()}, temporary)
            temporary.replace(out / STATE_NAME)
    bar.close()
    return out / STATE_NAME


def training_texts() -> list[str]:
    """The embedded corpora less the documents held out for evaluation."""
    kept_out = set(held_out(CORPORA))
    return [text for text in corpus_texts(CORPORA) if text not in kept_out]


def export(run: Path, config: Any, vocab: Path, target: Path) -> Path:
    """The run's model as a float16 checkpoint in our layout, with its vocabulary."""
    state = torch.load(run / STATE_NAME, weights_only=False)
    weights = {name: tensor.half() for name, tensor in state["model"].items()}
    save_checkpoint(weights, replace(config, half=True), target, vocab=vocab, shard_bytes=SHIPPED_SHARD_BYTES)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.t5_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        vocab = args.vocab / "tokenizer.json"
        if not vocab.is_file():
            train_tokenizer(corpus_texts(CORPORA), VOCAB_SIZE, args.vocab, style="t5", model_max_length=512)
        if args.export is not None:
            print(f"wrote {export(args.out, demo_config(), vocab, args.export)}")
            return 0
        tokenizer = HFTokenizer(vocab)
        torch.manual_seed(0)
        train(build_t5(demo_config()), lambda ids, rng: t5_example(ids, tokenizer, rng),
              pieces_of(tokenizer, training_texts()), tokenizer.pad_id, args.out, args.steps, args.batch, args.lr,
              args.save_every, args.resume == "auto", "t5-demo")
    except CpmliveError as exc:
        print(f"t5_demo: {exc}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=Path, required=True, help="the tokenizer directory (made when absent)")
    parser.add_argument("--out", type=Path, required=True, help="the run directory")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto")
    parser.add_argument("--export", type=Path, help="write the run's model as a checkpoint here instead")


if __name__ == "__main__":
    sys.exit(main())
