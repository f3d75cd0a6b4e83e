"""CPM-1 and CPM-Bee decoding in the native step against PyTorch on the same weights, one run.

1. CPM-1 at a ~350M GPT-2 shape (24 x 1024, 16 heads, 30,000 pieces, random float32 weights):
   batch-1 greedy decoding of ``--tokens`` tokens by HF ``GPT2LMHeadModel.generate``, by our
   blocks in PyTorch (``native.switched_off()``) and by the native step; the ids must agree.
2. CPM-Bee at a ~500M shape (24 x 1024, 16 heads, FFN 2816, its 86,583-token vocabulary, random
   weights): a task's ``<ans>`` decoded greedily (beam width 1) and with 3 beams, tokens/s of the
   decoded positions, by our blocks in PyTorch, by the native step, and (greedy) by the HF release's
   remote-code computation (``bee_hf_style.py``: HF has no CPM-Bee class of its own).

Alternated, best of ``--repeats``. Run by hand on an otherwise idle machine.

    python benchmarks/native_families.py [--tokens 32] [--repeats 3] [--families cpm1 bee]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bee_hf_style import HfStyleBee, greedy_answer  # noqa: E402
from cpm1 import SHAPE_350M, hf_model, ours_from  # noqa: E402

from cpmlive.infer.generate import GenerationConfig, generate_ids  # noqa: E402
from cpmlive.model.runtime import native  # noqa: E402


def best_rate(run, tokens: int, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def cpm1_rows(tokens: int, repeats: int) -> list[str]:
    hf = hf_model(SHAPE_350M)
    ours = ours_from(hf, SHAPE_350M)
    prompt = torch.randint(10, SHAPE_350M.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    options = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    ids = {}

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        ids["hf"] = out[0, 16:].tolist()

    def run_ours(name):
        def run():
            with torch.inference_mode():
                ids[name] = generate_ids(ours, [prompt[0].tolist()], options, 7)[0]
        return run

    def run_pytorch():
        with native.switched_off():
            run_ours("pytorch")()

    rates = {"hf": [], "pytorch": [], "native": []}
    for _ in range(repeats):  # alternated
        rates["hf"].append(best_rate(run_hf, tokens, 1))
        rates["pytorch"].append(best_rate(run_pytorch, tokens, 1))
        rates["native"].append(best_rate(run_ours("native"), tokens, 1))
    hf_rate, pt_rate, nat_rate = (max(rates[k]) for k in ("hf", "pytorch", "native"))
    same = ids["hf"] == ids["pytorch"] == ids["native"]
    return [f"| CPM-1 ~350M fp32, greedy | {hf_rate:.1f} (HF GPT2) | {pt_rate:.1f} | {nat_rate:.1f} | "
            f"**{nat_rate / hf_rate:.2f}x** HF, {nat_rate / pt_rate:.2f}x ours in PyTorch | {same} |"]


def bee_rows(tokens: int, repeats: int) -> list[str]:
    from cpmlive.infer.bee import fill_tasks
    from cpmlive.model.bee.config import BeeConfig
    from cpmlive.model.bee.model import CpmBee
    from cpmlive.tokenizer.bee import BeeTokenizer

    tokenizer = BeeTokenizer.from_file(ROOT.parent / "shared" / "fixtures" / "cpm-bee-vocab.txt")
    config = BeeConfig(vocab_size=86583, dim_model=1024, dim_ff=2816, num_layers=24, num_heads=16, dim_head=64,
                       half=False)
    model = CpmBee(config)
    model.init_weights(0)
    model.eval()
    hf_style = HfStyleBee(model)
    task = {"input": "今天天气很好，我们去公园散步，看到很多人在放风筝。", "prompt": "续写", "<ans>": ""}
    rows = []
    for beams in (1, 3):
        options = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams)
        answers, counts, raw_columns = {}, {}, {}

        def run(name):
            def go():
                with torch.inference_mode():
                    filled, raw = fill_tasks(model, tokenizer, [task], options)
                answers[name], counts[name] = filled, len(raw[0])
                raw_columns[name] = [column for column, _ in raw[0]]
            return go

        def run_pytorch():
            with native.switched_off():
                run("pytorch")()

        def run_hf_style():
            answers["hf"] = greedy_answer(hf_style, tokenizer, task, tokens)

        rates = {"pytorch": [], "native": [], "hf": []}
        for _ in range(repeats):
            rates["pytorch"].append(best_rate(run_pytorch, tokens, 1))
            rates["native"].append(best_rate(run("native"), tokens, 1))
            if beams == 1:
                rates["hf"].append(best_rate(run_hf_style, tokens, 1))
        pt_rate, nat_rate = max(rates["pytorch"]), max(rates["native"])
        same = answers["pytorch"] == answers["native"]
        hf, versus = "-", ""
        if beams == 1:
            hf_rate = max(rates["hf"])
            hf, versus = f"{hf_rate:.1f} (HF-style)", f"**{nat_rate / hf_rate:.2f}x** HF-style, "
            same = same and answers["hf"] == raw_columns["native"]
        rows.append(f"| CPM-Bee ~500M fp32, {beams} beam{'s' if beams > 1 else ''} | {hf} | {pt_rate:.1f} | "
                    f"{nat_rate:.1f} | {versus}{nat_rate / pt_rate:.2f}x ours in PyTorch | "
                    f"{same} ({counts['native']} tokens) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", choices=["cpm1", "bee"], default=["cpm1", "bee"])
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; batch-1 decoding of {args.tokens} tokens, tokens/s\n")
    print("| model | HF | ours, PyTorch blocks | ours, native step | speed-up | same output |")
    print("|---|---|---|---|---|---|")
    rows = {"cpm1": cpm1_rows, "bee": bee_rows}
    for family in args.families:
        for row in rows[family](args.tokens, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
