"""Speculative decoding (``infer/speculative.py``): what verifying drafts costs, and what it buys.

1. **Verify cost** at the ~450M CPM-Ant shape (dim 1280, 22 layers, vocabulary 30720, random
   weights) in float32 and int8: one engine step of a single row with 1 position (plain decoding)
   against 1 + k positions (k = 4, 8, 16 drafted tokens), KV row of a 64-token prompt, head
   included, alternated and best of ``--repeats``. Beside each: the bound of that step on this CPU,
   the larger of reading the weights once at the measured read bandwidth and the step's FLOPs
   (2 x matrix parameters x positions) at the measured float32 matrix-product peak.
2. **Prompt lookup on the demo**: batch-1 greedy decoding of 64 tokens through the engine, plain and
   with ``prompt_lookup_num_tokens`` 3 / 5 / 8, on prompts that quote their context (a People's
   Daily paragraph, then its first words again: the answer copies a passage), outputs checked equal.
3. **An assistant for the demo**: its int8 twin (``quantize --bits 8``) and a half-depth twin (its
   first half of the blocks, untrained: a crude pruned draft), acceptance and tokens/s.
4. **A 70% draft at ~450M**: the speed-up the measured verify costs give with a per-token acceptance
   of 0.7 (Leviathan et al.'s expected tokens per step (1 - a^(k+1)) / (1 - a)), for a draft costing
   0 (prompt lookup) or 10% of a target step.

    python benchmarks/speculative.py [--repeats 5] [--skip-450m]

Run by hand on an otherwise idle machine (it is not a test).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_llama_cpp import DIM, FFN, HEAD_DIM, HEADS, LAYERS, VOCAB, read_bandwidth  # noqa: E402

DRAFTS = (4, 8, 16)
PROMPT_TOKENS = 64


def matmul_peak(seconds: float = 1.5) -> float:
    """FLOP/s of a float32 1024 x 4096 x 4096 product on this process's threads."""
    a, b = torch.randn(1024, 4096), torch.randn(4096, 4096)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * 1024 * 4096 * 4096 / (time.perf_counter() - start)


def ant_450m(kind: str) -> torch.nn.Module:
    from cpmlive.compress.quantize import quantize_model
    from cpmlive.config import QuantConfig
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model

    config = AntConfig(vocab_size=VOCAB, dim_model=DIM, num_heads=HEADS, dim_head=HEAD_DIM, dim_ff=FFN,
                       num_layers=LAYERS, half=False, max_length=512)
    model = build_model(config, seed=0).eval()
    return quantize_model(model, QuantConfig(bits=8)) if kind == "int8" else model


def one_row_pool(model: torch.nn.Module):
    """An engine KV pool holding one row: a prefilled prompt of ``PROMPT_TOKENS`` tokens."""
    from cpmlive.data.layout import GENERATION, build_batch
    from cpmlive.infer.generate import prefill
    from cpmlive.infer.kv import KVPool

    ids = [1] + torch.randint(10, VOCAB, (PROMPT_TOKENS - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = build_batch([ids], GENERATION, model.config.prompt_length, "cpu")
    cache = model.new_cache(1, batch.input_ids.size(1))
    prefill(model, batch, cache, [len(ids)])
    pool = KVPool(model.config.num_layers, model.config.max_length)
    pool.reserve(1, batch.input_ids.size(1) + 64)
    pool.insert(cache, 0, batch.input_ids.size(1))
    return pool


def step_seconds(model: torch.nn.Module, pool, positions: int) -> float:
    """One engine step of ``positions`` new tokens (head included); the pool's row is put back."""
    from cpmlive.infer.speculative import text_inputs

    length = int(pool.lengths[0])
    ids = torch.randint(10, VOCAB, (1, positions))
    start = time.perf_counter()
    model.logits(model(**text_inputs(ids), cache=pool.view()))
    elapsed = time.perf_counter() - start
    pool.lengths[0] = length
    return elapsed


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if "prompt_embedding" not in name and "segment_embedding" not in name)


def matrix_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.state_dict().items() if p.dim() == 2 and "prompt" not in name
               and "segment" not in name and "position_bias" not in name)


def verify_costs(repeats: int, bandwidth: float, peak: float) -> dict[str, dict[int, float]]:
    print(f"\n## Verify cost at ~450M (read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 product peak "
          f"{peak / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads)\n")
    print("| weights | positions (1 + k) | step ms | x plain step | bound ms (memory / compute) | of the bound |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for kind in ("float32", "int8"):
        model = ant_450m(kind)
        widths = (1, *(1 + k for k in DRAFTS))
        best = {w: float("inf") for w in widths}
        with torch.inference_mode():
            pool = one_row_pool(model)
            for _ in range(repeats):
                for width in widths:
                    step_seconds(model, pool, width)  # warm this shape
                    best[width] = min(best[width], min(step_seconds(model, pool, width) for _ in range(3)))
        read, flops = weight_bytes(model) / bandwidth, 2 * matrix_parameters(model) / peak
        ratios[kind] = {w - 1: best[w] / best[1] for w in widths}
        for width in widths:
            bound = max(read, flops * width)
            print(f"| {kind} | {width} | {best[width] * 1e3:.1f} | {best[width] / best[1]:.2f}x | "
                  f"{bound * 1e3:.1f} ({read * 1e3:.1f} / {flops * width * 1e3:.1f}) | {bound / best[width]:.0%} |")
        del model, pool
    return ratios


def engine_rate(lm, ids: list[int], tokens: int, **options) -> tuple[list[int], float, int, int]:
    """Greedy decoding of ``tokens`` tokens through the engine: ids, tokens/s, drafted and kept."""
    from cpmlive.infer.engine import Request
    from cpmlive.infer.generate import GenerationConfig

    assistant = options.pop("assistant", None)
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, **options)
    before = lm.engine.stats()
    start = time.perf_counter()
    result = lm.engine.submit(Request(ids, config, assistant=assistant)).result()
    seconds = time.perf_counter() - start
    after = lm.engine.stats()
    return (result.ids, tokens / seconds, after["drafted_tokens"] - before["drafted_tokens"],
            after["kept_tokens"] - before["kept_tokens"])


def quoting_prompts(count: int) -> list[str]:
    """People's Daily paragraphs of 100-200 characters, each followed by its first eight again."""
    from cpmlive.data.corpora import people_daily_1998

    chosen = []
    for text in people_daily_1998():
        if 100 <= len(text) <= 200:
            chosen.append(f"{text}\n{text[:8]}")
        if len(chosen) == count:
            return chosen
    return chosen


def report_rates(title: str, lm, prompts: list[str], variants: dict[str, dict], tokens: int = 64) -> None:
    print(f"\n## {title} (batch 1, {tokens} greedy tokens, {len(prompts)} prompts, best of 3 each)\n")
    print("| drafts | tokens/s | x plain | acceptance | same ids as plain |")
    print("|---|---|---|---|---|")
    rows = [lm.encode_prompt(p) for p in prompts]
    plain_rates, plain_ids = [], []
    for ids in rows:
        runs = [engine_rate(lm, ids, tokens) for _ in range(3)]
        plain_ids.append(runs[0][0])
        plain_rates.append(max(r[1] for r in runs))
    plain = sum(plain_rates) / len(plain_rates)
    print(f"| none | {plain:.1f} | 1.00x | - | - |")
    for name, options in variants.items():
        rates, drafted, kept, same = [], 0, 0, True
        for ids, expected in zip(rows, plain_ids):
            runs = [engine_rate(lm, ids, tokens, **dict(options)) for _ in range(3)]
            rates.append(max(r[1] for r in runs))
            drafted, kept = drafted + runs[0][2], kept + runs[0][3]
            same &= all(r[0] == expected for r in runs)
        rate = sum(rates) / len(rates)
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f}x | {kept / max(drafted, 1):.2f} | {same} |")


def half_depth(lm):
    """The demo with only its first half of the blocks (untrained: a crude pruned draft)."""
    model = copy.deepcopy(lm.model)
    model.layers = model.layers[:len(model.layers) // 2]
    model.config = copy.deepcopy(model.config)
    model.config.num_layers = len(model.layers)
    return model


def projection(ratios: dict[str, dict[int, float]], acceptance: float = 0.7) -> None:
    print(f"\n## A draft with per-token acceptance {acceptance} at ~450M (measured verify costs)\n")
    print("| weights | k | tokens per step | speed-up, free draft (lookup) | speed-up, draft at 10% of a step |")
    print("|---|---|---|---|---|")
    for kind, by_k in ratios.items():
        for k in DRAFTS:
            expected = (1 - acceptance ** (k + 1)) / (1 - acceptance)
            print(f"| {kind} | {k} | {expected:.2f} | {expected / by_k[k]:.2f}x | "
                  f"{expected / (by_k[k] + 0.1 * k):.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--skip-450m", action="store_true")
    parser.add_argument("--skip-lookup", action="store_true")
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                        help="also draft the demo with this checkpoint (a pruned or distilled twin: cpmlive compress)")
    args = parser.parse_args()
    torch.manual_seed(0)
    import cpmlive
    from cpmlive.compress.quantize import quantize_model
    from cpmlive.config import QuantConfig
    from cpmlive.infer.speculative import Assistant

    if not args.skip_450m:
        ratios = verify_costs(args.repeats, read_bandwidth() * 1e9, matmul_peak())
        projection(ratios)
    lm = cpmlive.load("demo")
    prompts = quoting_prompts(args.prompts)
    if not args.skip_lookup:
        report_rates("Prompt lookup on the demo, prompts that quote their context", lm, prompts,
                     {f"lookup k={k}": {"prompt_lookup_num_tokens": k} for k in (3, 5, 8)})
    twin = quantize_model(copy.deepcopy(lm.model), QuantConfig(bits=8))
    drafts = {"int8 twin, k from 4": {"assistant": Assistant(twin, lm.tokenizer, "int8")},
              "half-depth twin, k from 4": {"assistant": Assistant(half_depth(lm), lm.tokenizer, "half")}}
    for spec in args.draft:
        name, _, path = spec.partition("=")
        draft = cpmlive.load(path)
        drafts[f"{name} ({draft.model.num_parameters() / 1e6:.1f}M), k from 4"] = {
            "assistant": Assistant(draft.model, draft.tokenizer, name)}
    report_rates("An assistant for the demo", lm, prompts, drafts)


if __name__ == "__main__":
    main()
