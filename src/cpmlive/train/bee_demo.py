"""The bilingual CPM-Bee demo, built here end to end:

1. a 12k vocabulary from the Chinese and English LibreOffice help and CC-CEDICT;
2. pretraining on those texts as JSON objects (whole texts under ``<ans>``, and infilling
   with ``<mask_k>``);
3. multi-task tuning on the five task kinds (``data.bee_tasks``), with pretraining objects
   mixed in; held-out tasks never share a source text with training.

``python -m cpmlive.train.bee_demo --run-dir runs/bee-demo --resume auto`` (interruptible:
every checkpoint is atomic and a resumed run draws the same batches).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from cpmlive.model.bee.config import BeeConfig
from cpmlive.data.bee_tasks import KINDS, build, entry_text, usable_entries
from cpmlive.data.bilingual import cedict_entries, libreoffice_pairs
from cpmlive.errors import CpmliveError
from cpmlive.model.bee.model import build_bee
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.tokenizer.bee import BeeTokenizer, build_vocab
from cpmlive.train.bee import LoopConfig, examples_of, train

VOCAB_SIZE = 12000
ENTRIES = 24000  # CC-CEDICT entries used (of ~70k usable), to keep the pretraining mix balanced
MODEL = dict(dim_model=256, dim_ff=768, num_layers=6, num_heads=4, dim_head=64, half=False, max_length=512)
PRETRAIN_SHARE = 0.4  # of all steps
REPLAY = 0.25  # share of pretraining objects in the task phase


def corpus(seed: int = 0) -> tuple[list[tuple[str, str]], list]:
    pairs = libreoffice_pairs()
    entries = usable_entries(cedict_entries())
    random.Random(seed).shuffle(entries)
    return pairs, entries[:ENTRIES]


def vocabulary(run_dir: Path, pairs: list[tuple[str, str]], entries: list) -> BeeTokenizer:
    path = run_dir / "vocab.txt"
    if not path.is_file():
        texts = [text for pair in pairs for text in pair] + [entry_text(e) for e in entries]
        BeeTokenizer(build_vocab(texts, VOCAB_SIZE)).save(path)
    return BeeTokenizer.from_file(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.bee_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bee-demo"))
    parser.add_argument("--resume", default=None, help="auto or a checkpoint directory")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this model directory: every step is then a task-phase step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="where the final model goes (default RUN_DIR/final)")
    parser.add_argument("--focus", nargs="*", default=[], choices=KINDS, metavar="KIND",
                        help=f"task kinds drawn --focus-weight times as often in the task phase ({', '.join(KINDS)})")
    parser.add_argument("--focus-weight", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CpmliveError as exc:
        print(f"bee_demo: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    pairs, entries = corpus()
    tokenizer = vocabulary(args.run_dir, pairs, entries)
    data = build(pairs, entries)
    (args.run_dir / "held_out.json").write_text(json.dumps(data.held_out, ensure_ascii=False), encoding="utf-8")
    config = BeeConfig(vocab_size=tokenizer.vocab_size, **MODEL)
    pretrain = examples_of(tokenizer, data.pretrain, args.row_length)
    rng = random.Random(1)
    tasks = examples_of(tokenizer, data.tasks, args.row_length)
    focused = examples_of(tokenizer, [task for kind in args.focus for task in data.train_by_kind[kind]],
                          args.row_length) * (args.focus_weight - 1)
    mixed = tasks + focused + rng.sample(pretrain, int(len(tasks) * REPLAY / (1 - REPLAY)))
    print(f"vocab {tokenizer.vocab_size}, {len(pretrain)} pretraining and {len(tasks)} task examples, "
          f"held out: {', '.join(f'{k} {len(v)}' for k, v in data.held_out.items())}", file=sys.stderr)
    model = build_bee(config, seed=0)
    switch = int(args.steps * PRETRAIN_SHARE)
    if args.init is not None:
        from cpmlive.model.bee.convert import load_pretrained

        model = load_pretrained(args.init, dtype=torch.float32)[0]
        switch = 0
    print(f"{model.num_parameters() / 1e6:.1f}M parameters", file=sys.stderr)
    loop = LoopConfig(steps=args.steps, rows=args.rows, row_length=args.row_length,
                      warmup_steps=100 if args.init is None else 20, lr=args.lr, min_lr=args.lr / 10)

    def save(m, directory: Path) -> None:
        save_checkpoint(m, config, directory / "model", vocab=args.run_dir / "vocab.txt")

    run_name = "run" if args.init is None else "run-continued"
    train(model, tokenizer, lambda step: pretrain if step <= switch else mixed, loop, args.run_dir / run_name,
          args.resume, save, desc="bee demo")
    final = args.out or args.run_dir / "final"
    # shards below 20 MB, as the package ships them
    save_checkpoint(model, config, final, vocab=args.run_dir / "vocab.txt", shard_bytes=18 * 2**20)
    print(f"wrote {final}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
