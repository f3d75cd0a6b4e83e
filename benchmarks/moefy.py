"""MoEfication of the demo model: held-out bits/char against the share of FFN compute kept, for
each router, and how sparse the gated-GELU activations really are; one run.

Each FFN (1,152 neurons) is split into ``--experts`` balanced experts; ``top_k`` of them run per
token. Routers: ``oracle`` (the true activation norms: an upper bound), ``similarity`` (no
training) and ``mlp`` (trained per layer on calibration rows of the training split).

    python benchmarks/moefy.py --data data/demo-mix [--experts 16] [--max-docs 40]
"""

from __future__ import annotations

import argparse

import cpmlive
from cpmlive.compress.moefy import activation_sparsity, ffn_inputs, moefy, train_router
from cpmlive.compress.quantize import calibration_batches
from cpmlive.infer.score import score_texts
from demo_quality import split_texts
from quantize import store_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--max-docs", type=int, default=40)
    args = parser.parse_args()
    lm = cpmlive.load(args.model, dtype="float32")
    val = split_texts(args.data, "val", lm.tokenizer)
    texts = [t for docs in val.values() for t in docs[:args.max_docs]]
    batches = calibration_batches(store_rows(args.data, 64, 256), lm.tokenizer.bos_id, lm.config.prompt_length)
    dense = score_texts(lm.model, lm.tokenizer, texts, batch_size=16).bits_per_char
    sparsity = activation_sparsity(lm.model, batches)
    print("activation sparsity of the dense FFNs (calibration rows): "
          + ", ".join(f"{name}: {100 * share:.2f}%" for name, share in sparsity.items()))
    inputs = ffn_inputs(lm.model, batches)
    print(f"\n| router | experts kept (top-k / {args.experts}) | share of FFN compute | bits/char | vs dense "
          "| router recall |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | {args.experts} / {args.experts} | 100% | {dense:.4f} | | |")
    for k in args.top_k:
        for router in ("oracle", "similarity", "mlp"):
            model = cpmlive.load(args.model, dtype="float32").model
            layers = moefy(model, args.experts, k, router)
            recall = ""
            if router == "mlp":
                recalls = [train_router(layer, rows) for layer, rows in zip(layers, inputs)]
                recall = f"{100 * sum(recalls) / len(recalls):.1f}%"
            bits = score_texts(model, lm.tokenizer, texts, batch_size=16).bits_per_char
            print(f"| {router} | {k} / {args.experts} | {100 * k / args.experts:.1f}% | {bits:.4f} | "
                  f"{100 * (bits / dense - 1):+.1f}% | {recall} |", flush=True)


if __name__ == "__main__":
    main()
