"""2:4 sparsity on the demo model: held-out bits/char of the dense model, of unstructured 50%
magnitude pruning, and of 2:4 by magnitude and by wanda (one-shot, no fine-tuning), in one run.

Speed: 2:4 only runs faster on NVIDIA sm80+ GPUs (torch's semi-structured kernels); on a CPU
there is no such kernel, so this reports quality only.

    python benchmarks/sparse24.py --data data/demo-mix [--max-docs 40]
"""

from __future__ import annotations

import argparse

import torch

import cpmlive
from cpmlive.compress.sparsity import block_linears, sparsify_2of4
from cpmlive.infer.score import score_texts
from demo_quality import split_texts
from quantize import store_rows
from cpmlive.compress.quantize import calibration_batches


@torch.no_grad()
def unstructured_half(model) -> None:
    for layer in block_linears(model).values():
        weight = layer.weight
        threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
        weight.mul_(weight.abs() > threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-docs", type=int, default=40)
    args = parser.parse_args()
    lm = cpmlive.load(args.model, dtype="float32")
    val = split_texts(args.data, "val", lm.tokenizer)
    texts = [t for docs in val.values() for t in docs[:args.max_docs]]
    news = val.get("people-daily-1998", [])[:args.max_docs]
    batches = calibration_batches(store_rows(args.data, 64, 256), lm.tokenizer.bos_id, lm.config.prompt_length)
    variants = {
        "dense": lambda m: None,
        "unstructured 50% (magnitude)": unstructured_half,
        "2:4 magnitude": lambda m: sparsify_2of4(m, "magnitude"),
        "2:4 wanda": lambda m: sparsify_2of4(m, "wanda", batches),
    }
    print("| block weights | bits/char (all domains) | vs dense | bits/char (news) |")
    print("|---|---|---|---|")
    dense = None
    for name, apply in variants.items():
        model = cpmlive.load(args.model, dtype="float32").model
        apply(model)
        bits = score_texts(model, lm.tokenizer, texts, batch_size=16).bits_per_char
        news_bits = score_texts(model, lm.tokenizer, news, batch_size=16).bits_per_char
        dense = dense or bits
        print(f"| {name} | {bits:.4f} | {100 * (bits / dense - 1):+.1f}% | {news_bits:.4f} |", flush=True)
    print("\nspeed: not measured (2:4 kernels need an NVIDIA sm80+ GPU; none was available)")


if __name__ == "__main__":
    main()
