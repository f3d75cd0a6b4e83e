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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.model.t5.config import PRESETS
from cpmlive.model.t5.model import T5, build_t5
from cpmlive.tokenizer.hf import HFTokenizer
from cpmlive.tokenizer.hf_train import T5_SENTINELS, train_tokenizer
from cpmlive.train.cpm1_demo import CORPORA, corpus_texts, held_out

VOCAB_SIZE = 8000
SHAPE = dict(vocab_size=VOCAB_SIZE, dim_model=256, dim_ff=640, num_layers=4, num_encoder_layers=4, num_heads=4,
             dim_head=64, max_length=512)
INPUT_TOKENS = 128
NOISE, MEAN_SPAN = 0.15, 3.0
STATE_NAME = "state.pt"


def demo_config():
    return replace(PRESETS["t5-tiny"](), **SHAPE)


def corrupt(ids: list[int], tokenizer: HFTokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """T5's span corruption of ``ids``: (encoder ids, decoder targets), both ending with ``</s>``."""
    count = max(1, round(len(ids) * NOISE))
    spans = max(1, min(T5_SENTINELS, round(count / MEAN_SPAN)))
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
                sentinel = tokenizer.token_to_id(f"<extra_id_{seen}>")
                encoder.append(sentinel)
                target.append(sentinel)
                seen += 1
            target.append(token)
        previous = span
    return encoder + [tokenizer.eos_id], target + [tokenizer.eos_id]


def batches(tokenizer: HFTokenizer, texts: list[str], batch: int, rng: random.Random):
    """Endless batches of span-corrupted pieces of ``texts``."""
    pieces = []
    for ids in (encoding.ids for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False)):
        chunks = (ids[i:i + INPUT_TOKENS] for i in range(0, len(ids), INPUT_TOKENS))
        pieces += [chunk for chunk in chunks if len(chunk) > 16]
    while True:
        rows = [corrupt(rng.choice(pieces), tokenizer, rng) for _ in range(batch)]
        yield rows


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def loss_of(model: T5, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    encoder = pad([e for e, _ in rows], pad_id)
    targets = pad([t for _, t in rows], -100)
    decoder = torch.cat([torch.full((len(rows), 1), model.config.decoder_start_id), targets[:, :-1]], 1)
    decoder_valid = decoder != -100
    decoder = decoder.masked_fill(~decoder_valid, pad_id)
    logits = model.logits(model.seq2seq(encoder, decoder, encoder != pad_id, decoder_valid | (decoder == pad_id)))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def train(vocab: Path, out: Path, steps: int, batch: int, lr: float, save_every: int, resume: bool) -> Path:
    tokenizer = HFTokenizer(vocab)
    torch.manual_seed(0)
    model = build_t5(demo_config())
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
    kept_out = set(held_out(CORPORA))
    texts = [t for t in corpus_texts(CORPORA) if t not in kept_out]
    stream = batches(tokenizer, texts, batch, rng)
    model.train()
    bar = tqdm(total=steps, initial=step, desc="t5-demo", unit="step")
    while step < steps:
        scale = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.1)
        loss = loss_of(model, next(stream), tokenizer.pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % save_every == 0 or step == steps:
            temporary = out / f".{STATE_NAME}"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "step": step, "loss": loss.item()}, temporary)
            temporary.replace(out / STATE_NAME)
    bar.close()
    return out / STATE_NAME


def export(vocab: Path, out: Path, target: Path) -> Path:
    state = torch.load(out / STATE_NAME, weights_only=False)
    config = replace(demo_config(), half=True)
    weights = {name: tensor.half() for name, tensor in state["model"].items()}
    save_checkpoint(weights, config, target, vocab=vocab)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.t5_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, required=True, help="the tokenizer directory (made when absent)")
    parser.add_argument("--out", type=Path, required=True, help="the run directory")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto")
    parser.add_argument("--export", type=Path, help="write the run's model as a checkpoint here instead")
    args = parser.parse_args(argv)
    try:
        vocab = args.vocab / "tokenizer.json"
        if not vocab.is_file():
            train_tokenizer(corpus_texts(CORPORA), VOCAB_SIZE, args.vocab, style="t5", model_max_length=512)
        if args.export is not None:
            print(f"wrote {export(vocab, args.out, args.export)}")
            return 0
        train(vocab, args.out, args.steps, args.batch, args.lr, args.save_every, args.resume == "auto")
    except CpmliveError as exc:
        print(f"t5_demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
