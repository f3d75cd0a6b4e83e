"""Quantized models against their float original, in one run: size, held-out bits/char, speed.

On the demo model: fp32, int8 (weight-only), W8A8 (int8 weights and per-token int8 inputs),
int4 round-to-nearest, GPTQ and AWQ (group 64), all made by ``cpmlive.compress.quantize`` from
the same fp32 weights, GPTQ and AWQ calibrated on training-split rows of the token store. For each:
size of its checkpoint directory, held-out bits/char on the store's validation split (every
domain pooled, and the news domain alone), batch-1 greedy decode tokens/s and prefill tokens/s.

At a ~450M random-weight shape (speed only): the same formats' batch-1 decode and prefill, the
weight bytes each decoded token reads, and that rate against the memory roofline (the read
bandwidth of this machine, measured in the same run by summing a 1 GiB tensor).

    python benchmarks/quantize.py --data data/demo-mix [--max-docs 60] [--skip-large | --skip-demo]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cpmlive
from cpmlive.model.runtime import native
from cpmlive.compress.quantize import calibration_batches, quantize_model
from cpmlive.config import QuantConfig
from cpmlive.data.layout import GENERATION, build_batch
from cpmlive.data.store import TokenStore
from cpmlive.infer.score import score_texts
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.model.runtime.quant import QuantizedLinear
from decode import build_ours, compare, ours_decode, random_rows, table
from demo_quality import split_texts

VARIANTS = {
    "fp32": None,
    "int8": QuantConfig(bits=8),
    "w8a8": QuantConfig(bits=8, activations="int8"),
    "int4-g64 RTN": QuantConfig(bits=4, group_size=64),
    "int4-g64 GPTQ": QuantConfig(bits=4, group_size=64, method="gptq"),
    "int4-g64 AWQ": QuantConfig(bits=4, group_size=64, method="awq"),
}
# Coarser groups, where round-to-nearest starts to cost and calibration has something to recover
# (384 is the coarsest size that divides every layer of the demo model: one group per row of the
# attention projections).
COARSE = {f"int4-g384 {method.upper() if method != 'rtn' else 'RTN'}":
          QuantConfig(bits=4, group_size=384, method=method) for method in ("rtn", "gptq", "awq")}


def read_bandwidth() -> float:
    """GB/s of summing a 1 GiB float32 tensor (median of 5, after a warm-up)."""
    big = torch.ones(256 * 1024 * 1024)
    big.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times) / 1e9


def store_rows(data: str, samples: int, length: int, seed: int = 0) -> list[list[int]]:
    """Calibration rows: ``samples`` windows of ``length`` tokens from random training documents."""
    store = TokenStore(data, "train")
    order = list(range(store.num_documents))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for index in order:
        ids = store.document(index).tolist()[1:-1]
        rows += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
        if len(rows) >= samples:
            break
    return rows[:samples]


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every product's weight (codes and scales, or floats) one decoded token reads:
    the blocks' linear layers and the tied head."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in module.buffers())
        elif type(module) is torch.nn.Linear:
            total += module.weight.numel() * module.weight.element_size()
    embedding = model.input_embedding
    if not isinstance(embedding, QuantizedLinear):
        total += embedding.weight.numel() * embedding.weight.element_size()
    return total


def decode_rate(model, rows: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Decode-phase tokens/s at batch 1 (the prefill left out: ``(N - 1) / (t(N) - t(1))``)."""
    full = compare({"m": lambda: ours_decode(model, rows, new_tokens)}, repeats)["m"]
    first = compare({"m": lambda: ours_decode(model, rows, 1)}, repeats)["m"]
    return (new_tokens - 1) / max(statistics.median(full) - statistics.median(first), 1e-9)


def prefill_rate(model, length: int, repeats: int) -> float:
    row = random_rows([length], seed=3)[0]
    row = [min(t, model.config.vocab_size - 1) for t in row]
    inputs = build_batch([row], GENERATION, model.config.prompt_length).as_inputs()

    def run() -> None:
        with torch.inference_mode():
            model.logits(model(**inputs, last=1))

    return length / statistics.median(compare({"m": run}, repeats)["m"])


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def demo_rows(args: argparse.Namespace) -> list[list[str]]:
    lm = cpmlive.load(args.model, dtype="float32")
    val = split_texts(args.data, "val", lm.tokenizer)
    val = {name: docs[:args.max_docs] for name, docs in val.items() if docs}
    texts = [text for docs in val.values() for text in docs]
    news = val.get("people-daily-1998", [])
    calibration = calibration_batches(store_rows(args.data, args.calibration_rows, args.calibration_tokens),
                                      lm.tokenizer.bos_id, lm.config.prompt_length)
    prompt = [lm.tokenizer.encode_for_model("新华社北京1月5日电，国务院总理今天")]
    out, reference = [], {}
    variants = {**VARIANTS, **(COARSE if args.coarse else {})}
    for name, config in variants.items():
        model = cpmlive.load(args.model, dtype="float32").model
        started = time.perf_counter()
        if config is not None:
            quantize_model(model, config, calibration if config.method != "rtn" else None)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            size = directory_bytes(save_checkpoint(model.state_dict(), model.config, Path(tmp) / "m"))
        bits = score_texts(model, lm.tokenizer, texts, batch_size=16).bits_per_char
        news_bits = score_texts(model, lm.tokenizer, news, batch_size=16).bits_per_char if news else math.nan
        decode = decode_rate(model, prompt, args.new_tokens, args.repeats)
        prefill = prefill_rate(model, 256, args.repeats)
        reference = reference or {"size": size, "bits": bits, "decode": decode}
        out.append([name, f"{size / 1e6:.1f} MB", f"{size / reference['size']:.3f}x", f"{bits:.4f}",
                    f"{100 * (bits / reference['bits'] - 1):+.2f}%", f"{news_bits:.4f}", f"{decode:.1f}",
                    f"{decode / reference['decode']:.2f}x", f"{prefill:.0f}", f"{seconds:.1f}"])
        print(" | ".join(out[-1]), flush=True)
    return out


def large_rows(args: argparse.Namespace, bandwidth: float) -> list[list[str]]:
    out, base = [], None
    rows = random_rows([16], seed=0)
    for name, config in VARIANTS.items():
        if config is not None and config.method != "rtn":
            continue  # the same format and speed as RTN
        model = build_ours("450m")
        if config is not None:
            quantize_model(model, config)
        nbytes = weight_bytes_per_token(model)
        decode = decode_rate(model, rows, args.new_tokens, args.repeats)
        with native.switched_off():
            torch_decode = decode_rate(model, rows, args.new_tokens, args.repeats)
        prefill = prefill_rate(model, 256, args.repeats)
        roofline = bandwidth * 1e9 / nbytes
        base = base or decode
        out.append([name, f"{nbytes / 1e6:.0f} MB", f"{decode:.2f}", f"{torch_decode:.2f}", f"{decode / base:.2f}x",
                    f"{roofline:.1f}", f"{100 * decode / roofline:.0f}%", f"{prefill:.0f}"])
        print(" | ".join(out[-1]), flush=True)
        del model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", help="the token store the model was trained on (the demo rows)")
    parser.add_argument("--max-docs", type=int, default=60, help="validation documents per domain")
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument("--calibration-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="skip the ~450M speed rows")
    parser.add_argument("--skip-demo", action="store_true", help="only the ~450M speed rows")
    parser.add_argument("--coarse", action="store_true", help="also int4 in groups of 384 on the demo model")
    args = parser.parse_args()
    if not (args.data or args.skip_demo):
        parser.error("--data is needed for the demo rows (or --skip-demo)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU {torch.backends.cpu.get_cpu_capability()}, native kernels {'on' if native.available() else 'off'}")
    if not args.skip_demo:
        demo = demo_rows(args)
        print("\n## Demo model\n")
        print(table(["format", "size", "vs fp32", "bits/char (all domains)", "vs fp32", "bits/char (news)",
                     "decode tok/s (batch 1)", "vs fp32", "prefill tok/s (1 x 256)", "quantize s"], demo))
    if args.skip_large:
        return
    bandwidth = read_bandwidth()
    large = large_rows(args, bandwidth)
    print(f"\n## ~450M random weights (read bandwidth {bandwidth:.1f} GB/s, measured in this run)\n")
    print(table(["format", "weight bytes / token", "decode tok/s (batch 1)", "same, PyTorch products only",
                 "vs fp32", "roofline tok/s",
                 "share of roofline", "prefill tok/s (1 x 256)"], large))


if __name__ == "__main__":
    main()
