"""IsoFLOP sweep: which model size (and vocabulary) a compute budget should buy, on this machine.

For every (vocabulary, size, budget) cell it trains with the real recipe (``cpmlive pretrain``,
both CPM-Ant objectives, cosine schedule over the run, resumable) for the number of steps the
budget pays for, then scores held-out documents (the same ones for every cell, an equal number
from each source) as bits per character, so vocabularies compare fairly. Per budget a parabola in
log(size) gives the best size; a power law through those optima gives the size for a larger
budget (``--target``). Writes ``results.jsonl`` (one line per finished cell; finished cells are
skipped when run again), ``isoflop.md`` (the table) and ``isoflop.png`` (the plot).

    python benchmarks/isoflop.py --data 8000=data/mix-8k --data 16000=data/mix-16k --out runs/isoflop

Training compute per token is Kaplan's ``6 N + 6 L T d``: N counts the weights every token
multiplies (all layers and the output projection, which CPM-Ant ties to the input embedding; the
lookup itself is free), L layers, T the row length, d the model width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpmlive.api import load
from cpmlive.data.store import TokenStore
from cpmlive.infer.score import score_texts
from cpmlive.utils import atomic_write_bytes, atomic_write_text

SEQ_LENGTH = 256
BATCH_SIZE = 16
DOCS_PER_SOURCE = 48
# A character the vocabulary lacks is charged as a uniform guess over the basic CJK block.
UNK_BITS = math.log2(0x9FFF - 0x4E00 + 1)


@dataclass(frozen=True)
class Size:
    name: str
    dim_model: int
    num_layers: int
    num_heads: int
    dim_ff: int

    def weights(self, vocab_size: int) -> int:
        """Weights each token multiplies: attention, gated FFN, the tied output projection."""
        layer = 4 * self.dim_model * self.num_heads * 64 + 3 * self.dim_model * self.dim_ff
        return self.num_layers * layer + vocab_size * self.dim_model

    def flops_per_token(self, vocab_size: int) -> float:
        return 6.0 * self.weights(vocab_size) + 6.0 * self.num_layers * SEQ_LENGTH * self.num_heads * 64

    def overrides(self, vocab_size: int) -> dict[str, int]:
        return {"vocab_size": vocab_size, "dim_model": self.dim_model, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "dim_head": 64, "dim_ff": self.dim_ff, "max_length": 512}


SIZES = {size.name: size for size in (
    Size("xxs", 64, 2, 1, 192),
    Size("xs", 96, 3, 2, 256),
    Size("s", 128, 4, 2, 352),
    Size("m", 192, 5, 3, 512),
    Size("l", 256, 6, 4, 704),
    Size("xl", 320, 8, 5, 896),
)}


def learning_rate(size: Size) -> float:
    """Peak rate shrinking with width (the demo recipe's 2e-3 at d=384 scaled as 1/sqrt(d))."""
    return round(2e-3 * math.sqrt(384 / size.dim_model), 5)


def tokens_per_step(data: str) -> float:
    """Average text tokens a packed training batch holds (rows are not always full)."""
    from cpmlive.data.stream import PretrainStream

    stream = PretrainStream(TokenStore(data, "train"), SEQ_LENGTH, BATCH_SIZE, seed=0)
    batches = [stream.next_batch() for _ in range(8)]
    return float(np.mean([int(batch.valid.sum()) for batch in batches]))


def eval_texts(data: str) -> dict[str, list[str]]:
    """The first ``DOCS_PER_SOURCE`` validation documents of each source, as text."""
    from cpmlive.tokenizer.ant import AntTokenizer

    store = TokenStore(data, "val")
    tokenizer = AntTokenizer.from_file(Path(data) / "vocab.txt")
    texts: dict[str, list[str]] = {name: [] for name in store.sources}
    for index in range(store.num_documents):
        name = store.sources[int(store.document_sources[index])]
        if len(texts[name]) < DOCS_PER_SOURCE:
            texts[name].append(tokenizer.decode(store.document(index).tolist()[1:-1]))
    return texts


def run_cell(out: Path, data: str, vocab_size: int, size: Size, budget: float, step_tokens: float,
             mixture: dict[str, float]) -> dict:
    steps = max(10, round(budget / size.flops_per_token(vocab_size) / step_tokens))
    run_dir = out / f"v{vocab_size}-{size.name}-{budget:g}"
    config = {
        "model": "tiny", "model_overrides": size.overrides(vocab_size), "data": data, "mixture": mixture,
        "out": str(run_dir), "seq_length": SEQ_LENGTH, "batch_size": BATCH_SIZE, "max_steps": steps,
        "lr": learning_rate(size), "min_lr": learning_rate(size) / 10, "warmup_steps": max(5, steps // 20),
        "schedule": "cosine", "weight_decay": 0.05, "grad_clip": 1.0, "precision": "fp32", "seed": 0,
        "eval_every": steps, "eval_batches": 8, "save_every": max(50, steps // 4), "inspect_every": steps,
        "keep_checkpoints": 1, "progress": False,
    }
    config_path = out / f"{run_dir.name}.json"
    atomic_write_text(config_path, json.dumps(config, indent=2))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "cpmlive", "pretrain", "--config", str(config_path), "--resume", "auto"],
                   check=True)
    seconds = time.monotonic() - started
    final = sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "model"
    return {"vocab": vocab_size, "size": size.name, "budget": budget, "steps": steps,
            "weights": size.weights(vocab_size), "tokens": round(steps * step_tokens),
            "train_seconds": round(seconds, 1), "checkpoint": str(final)}


def score_cell(row: dict, texts: dict[str, list[str]]) -> dict:
    """Held-out bits/char; a character outside the vocabulary costs ``UNK_BITS`` (it is not free)."""
    lm = load(row["checkpoint"], dtype="float32")
    per_source = {}
    bits = chars = unknown = 0.0
    for name, docs in texts.items():
        score = score_texts(lm.model, lm.tokenizer, docs, batch_size=16)
        source_bits = score.nats / math.log(2) + score.unk_dropped * UNK_BITS
        per_source[name] = source_bits / score.chars
        bits, chars, unknown = bits + source_bits, chars + score.chars, unknown + score.unk_dropped
    return {**row, "bits_per_char": bits / chars, "per_source": per_source, "unknown_share": unknown / chars}


def fit_optimum(rows: list[dict]) -> tuple[float, np.ndarray] | None:
    """(best weights, parabola coefficients in log10 weights) for one budget (rows sorted by size).

    None when there are fewer than 3 sizes or the best measured size is the smallest or the
    largest: then the optimum lies outside the sizes tried, and a parabola's vertex would be an
    extrapolation, not a measurement.
    """
    y = np.array([row["bits_per_char"] for row in rows])
    if len(rows) < 3 or int(np.argmin(y)) in (0, len(rows) - 1):
        return None
    x = np.log10([row["weights"] for row in rows])
    a, b, c = np.polyfit(x, y, 2)
    return float(10 ** (-b / (2 * a))), np.array([a, b, c])


def summarize(results: list[dict], target: float, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| vocab | size | weights | budget (FLOPs) | steps | tokens | train s | bits/char (all) | "
             + " | ".join(sorted(results[0]["per_source"])) + " |",
             "|---" * (8 + len(results[0]["per_source"])) + "|"]
    for row in sorted(results, key=lambda r: (r["vocab"], r["budget"], r["weights"])):
        sources = " | ".join(f"{row['per_source'][name]:.3f}" for name in sorted(row["per_source"]))
        lines.append(f"| {row['vocab']} | {row['size']} | {row['weights'] / 1e6:.2f} M | {row['budget']:.1e} | "
                     f"{row['steps']} | {row['tokens'] / 1e6:.2f} M | {row['train_seconds']:.0f} | "
                     f"{row['bits_per_char']:.3f} | {sources} |")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    optima = []
    unbracketed: list[str] = []
    for vocab in sorted({row["vocab"] for row in results}):
        for budget in sorted({row["budget"] for row in results if row["vocab"] == vocab}):
            cell = sorted((r for r in results if r["vocab"] == vocab and r["budget"] == budget),
                          key=lambda r: r["weights"])
            x = [row["weights"] for row in cell]
            y = [row["bits_per_char"] for row in cell]
            line, = left.plot(x, y, "o-", label=f"V={vocab}, C={budget:.1e}")
            fit = fit_optimum(cell)
            if fit is None:
                edge = min(cell, key=lambda r: r["bits_per_char"])
                unbracketed.append(f"V={vocab}, C={budget:.1e}: best measured is {edge['size']} "
                                   f"({edge['weights'] / 1e6:.2f} M weights, {edge['bits_per_char']:.3f} bits/char), "
                                   f"an end of the sizes tried: the optimum is not bracketed")
                right.plot([budget], [edge["weights"]], "v", color=line.get_color(), markersize=9,
                           label=f"V={vocab}, C={budget:.1e}: best measured (an end of the range)")
            else:
                best, coefficients = fit
                grid = np.linspace(math.log10(min(x)), math.log10(max(x)), 50)
                left.plot(10 ** grid, np.polyval(coefficients, grid), ":", color=line.get_color())
                optima.append((vocab, budget, best, float(np.polyval(coefficients, math.log10(best)))))
    left.set_xscale("log")
    left.set_xlabel("weights multiplied per token")
    left.set_ylabel("held-out bits per character")
    left.set_title("IsoFLOP curves")
    left.legend(fontsize=8)
    lines += ["", "| vocab | budget (FLOPs) | best weights (fit) | bits/char at best |", "|---|---|---|---|"]
    for vocab, budget, best, bpc in optima:
        lines.append(f"| {vocab} | {budget:.1e} | {best / 1e6:.2f} M | {bpc:.3f} |")
    lines += [""] + unbracketed
    for vocab in sorted({o[0] for o in optima}):
        points = [(budget, best) for v, budget, best, _ in optima if v == vocab]
        right.plot([p[0] for p in points], [p[1] for p in points], "o", label=f"V={vocab} optima")
        if len(points) >= 2:
            slope, intercept = np.polyfit(np.log10([p[0] for p in points]), np.log10([p[1] for p in points]), 1)
            predicted = 10 ** (slope * math.log10(target) + intercept)
            budgets = np.logspace(math.log10(min(p[0] for p in points)), math.log10(target), 20)
            right.plot(budgets, 10 ** (slope * np.log10(budgets) + intercept), "--")
            right.plot([target], [predicted], "*", markersize=12)
            lines.append(f"\nV={vocab}: best weights ∝ C^{slope:.2f}; at the target {target:.1e} FLOPs: "
                         f"{predicted / 1e6:.2f} M weights, {target / 6 / predicted / 1e6:.1f} M tokens")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training compute (FLOPs)")
    right.set_ylabel("best weights")
    right.set_title("Compute-optimal size")
    right.legend(fontsize=8)
    figure.tight_layout()
    buffer = out / "isoflop.png"
    import io

    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    atomic_write_bytes(buffer, image.getvalue())
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "isoflop.md", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="VOCAB=DIR, a store per vocabulary")
    parser.add_argument("--sizes", default="xs,s,m,l", help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument("--budgets", default="5e12,1.5e13", help="comma-separated FLOPs")
    parser.add_argument("--cells", default="", help="only these VOCAB:SIZE:BUDGET cells (comma-separated)")
    parser.add_argument("--mixture", default="{}", help="the recipe's mixture, as JSON")
    parser.add_argument("--target", type=float, default=2e14, help="budget of the final run (FLOPs)")
    parser.add_argument("--out", default="runs/isoflop")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    done = {(r["vocab"], r["size"], r["budget"]) for r in results}
    stores = dict(item.split("=", 1) for item in args.data)
    wanted = {tuple(cell.split(":")) for cell in args.cells.split(",") if cell}
    mixture = json.loads(args.mixture)
    for vocab_text, data in stores.items():
        vocab_size = int(vocab_text)
        step_tokens = tokens_per_step(data)
        texts = eval_texts(data)
        for budget in (float(b) for b in args.budgets.split(",")):
            for name in args.sizes.split(","):
                key = (vocab_size, name, budget)
                if key in done or (wanted and (vocab_text, name, f"{budget:g}") not in wanted):
                    continue
                row = score_cell(run_cell(out, data, vocab_size, SIZES[name], budget, step_tokens, mixture), texts)
                results.append(row)
                with results_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                print(f"V={vocab_size} {name} C={budget:.1e}: {row['bits_per_char']:.3f} bits/char "
                      f"({row['train_seconds']:.0f} s)", flush=True)
    if results:
        print(summarize(results, args.target, out))


if __name__ == "__main__":
    main()
