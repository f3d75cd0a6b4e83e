"""Pruned + distilled demo models against models of the same shape trained from scratch on the
same number of tokens (CPM-Ant's published comparison), in one run, with each model's
parameters, size on disk, held-out bits/char and batch-1 decode / 1 x 256 prefill tokens/s.

For each target share of the projection parameters: ``cpmlive compress`` with one ``prune`` step
(distilling from the demo model) of ``--steps`` batches; then a freshly initialised model of the
pruned shape trained with the LM loss on as many batches of the same stream. Both are scored on
the store's held-out split (every domain pooled).

    python benchmarks/compress.py --data data/demo-mix [--targets 0.5 0.25 0.1] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cpmlive
from cpmlive.compress.pipeline import CompressRecipe, TrainingRun, TrainingStep, compress
from cpmlive.infer.score import score_texts
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import load_model, save_checkpoint
from demo_quality import split_texts
from quantize import decode_rate, prefill_rate


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument("--max-docs", type=int, default=40)
    args = parser.parse_args()
    lm = cpmlive.load(args.model, dtype="float32")
    val = split_texts(args.data, "val", lm.tokenizer)
    texts = [t for docs in val.values() for t in docs[:args.max_docs]]
    base_bits = score_texts(lm.model, lm.tokenizer, texts, batch_size=16).bits_per_char
    tokens = args.steps * args.batch_size * args.seq_length
    prompt = [lm.tokenizer.encode_for_model("新华社北京1月5日电，国务院总理今天")]

    def speed(model) -> list[str]:
        return [f"{decode_rate(model, prompt, 32, 3):.1f}", f"{prefill_rate(model, 256, 3):.0f}"]

    with tempfile.TemporaryDirectory() as tmp:  # float32, as the pruned models are written
        teacher_bytes = directory_bytes(save_checkpoint(lm.model.state_dict(), lm.config, Path(tmp) / "m"))
        teacher_size = f"{teacher_bytes / 1e6:.1f} MB"
    rows = [["demo (teacher)", f"{lm.model.num_parameters() / 1e6:.2f}M", teacher_size, "", f"{base_bits:.4f}",
             *speed(lm.model), "", ""]]
    for target in args.targets:
        with tempfile.TemporaryDirectory() as tmp:
            recipe = CompressRecipe.from_dict({
                "data": args.data, "seq_length": args.seq_length, "batch_size": args.batch_size,
                "save_every": args.steps, "steps": [{"prune": {
                    "target": target, "steps": args.steps, "target_warmup_steps": args.steps // 2,
                    "lr": 2e-4, "multiple_of": 64, "distill": {"temperature": 2.0, "alpha": 0.5}}}]})
            started = time.perf_counter()
            pruned_dir = compress(args.model, Path(tmp) / "pruned", recipe)
            pruned_seconds = time.perf_counter() - started
            pruned = load_model(pruned_dir)
            pruned_bits = score_texts(pruned, lm.tokenizer, texts, batch_size=16).bits_per_char
            scratch = build_model(pruned.config, seed=1)
            settings = TrainingStep(steps=args.steps, lr=args.scratch_lr)
            started = time.perf_counter()
            scratch = TrainingRun(scratch, scratch, settings, recipe, Path(tmp) / "scratch", "scratch").run()
            scratch_seconds = time.perf_counter() - started
            scratch_bits = score_texts(scratch, lm.tokenizer, texts, batch_size=16).bits_per_char
            size = f"{pruned.num_parameters() / 1e6:.2f}M"
            disk = f"{directory_bytes(pruned_dir) / 1e6:.1f} MB"
            shape = f"{pruned.config.num_heads} heads, FFN {pruned.config.dim_ff}, mask {pruned.config.mask_modules}"
            pruned_speed = speed(pruned.eval())
            rows.append([f"pruned + distilled to {target:g}", size, disk, shape, f"{pruned_bits:.4f}", *pruned_speed,
                         f"{pruned_seconds:.0f} s", ""])
            rows.append(["same shape from scratch", size, disk, shape, f"{scratch_bits:.4f}", *pruned_speed,
                         f"{scratch_seconds:.0f} s", "pruned wins" if pruned_bits < scratch_bits else "scratch wins"])
            print(" | ".join(rows[-2]), "\n", " | ".join(rows[-1]), flush=True)
    print(f"\n{args.steps} steps of {args.batch_size} x {args.seq_length} tokens ({tokens / 1e6:.2f}M tokens) each; "
          f"held-out bits/char over {len(texts)} documents\n")
    print("| model | parameters | size on disk | shape | bits/char | decode tok/s (batch 1) | prefill tok/s (1 x 256) "
          "| training time | |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
