"""Encoder-decoder decoding speed: the engine (the encoder once per request, the decoder in the
continuous batch with its cross-attention keys cached) against HF ``generate`` on the same weights.

A T5 v1.1 at t5-v1_1-small's shape (8 + 8 blocks, 512 wide, 6 heads of 64, a 1024-wide gated FFN,
32,128 tokens; ``--shape demo``: t5-demo's, 4 + 4 blocks 256 wide; random weights), fp32, greedy:
HF ``T5ForConditionalGeneration.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)``
against the engine (``LM.request``s submitted together) at batch 1 and 16, prompts of 48 tokens,
64 new tokens each (the engine's prefix cache off: the runs repeat their prompts). Both read the
same weights, so the ids must be identical; new tokens per second, best of the runs.

Each side runs in its own process, as its users run it: HF with OpenMP's defaults (idle threads
spin a while after each parallel region), cpmlive imported first, which asks OpenMP to put idle
threads to sleep (``model/runtime/threads.py``; in one process one policy would serve both). The
processes alternate, one measured run each after a warm-up, ``--repeats`` times.

    python benchmarks/seq2seq_decode.py [--shape small|demo] [--new-tokens 64] [--repeats 3]
        [--same-process]   (both in this process, under OpenMP's defaults: the earlier measurement)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
SHAPES = {  # t5-v1_1-small's, and t5-demo's (whose tokenizer both use)
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "demo": dict(vocab_size=8000, d_model=256, d_kv=64, d_ff=640, num_layers=4, num_decoder_layers=4, num_heads=4),
}


def write_model(directory: Path, shape: str = "small") -> None:
    import torch

    from cpmlive.resources import demo_dir
    from decode import quiet_transformers

    transformers = quiet_transformers()
    torch.manual_seed(0)
    config = {**SHAPES[shape], **COMMON}
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(config["vocab_size"], config["d_model"]) * 0.05)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((demo_dir("t5-demo") / name).read_bytes())


def prompts(batch: int, length: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(batch)
    return [torch.randint(3, 7999, (length - 1,), generator=generator).tolist() + [1] for _ in range(batch)]


def load(side: str, directory: Path):
    if side == "ours":
        import cpmlive  # first: its thread policy is set before torch starts OpenMP

        lm = cpmlive.load(directory)
        lm.engine.set_prefix_cache(0)  # the runs repeat their prompts: no reuse of a whole prompt HF cannot match
        return lm
    from decode import quiet_transformers

    return quiet_transformers().T5ForConditionalGeneration.from_pretrained(directory).eval()


def decode(side: str, model, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    if side == "hf":
        import torch

        with torch.inference_mode():
            out = model.generate(torch.tensor(rows), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens)
        return out[:, 1:].tolist()
    options = model._options(new_tokens, {"min_new_tokens": new_tokens})
    handles = [model.engine.submit(model.request(row + model.model.prompt_tail(), options, index))
               for index, row in enumerate(rows)]
    return [handle.result().ids for handle in handles]


def worker(side: str, directory: Path, batch: int, prompt_tokens: int, new_tokens: int) -> None:
    """One process: load, warm up, one measured run; prints seconds, the ids' digest and the threads."""
    model = load(side, directory)
    import torch

    rows = prompts(batch, prompt_tokens)
    ids = decode(side, model, rows, new_tokens)
    start = time.perf_counter()
    decode(side, model, rows, new_tokens)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    print(json.dumps({"seconds": seconds, "ids": digest, "threads": torch.get_num_threads()}))


def run_worker(side: str, directory: Path, batch: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--dir", str(directory), "--batch", str(batch),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_process(directory: Path, batch: int, args: argparse.Namespace) -> dict[str, list[float]]:
    from decode import compare

    models = {side: load(side, directory) for side in ("hf", "ours")}
    rows = prompts(batch, args.prompt_tokens)
    assert decode("hf", models["hf"], rows, args.new_tokens) == decode("ours", models["ours"], rows, args.new_tokens)
    return compare({side: (lambda s=side: decode(s, models[s], rows, args.new_tokens)) for side in models},
                   args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--same-process", action="store_true")
    parser.add_argument("--worker", choices=("hf", "ours"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.dir), args.batch, args.prompt_tokens, args.new_tokens)
        return
    from decode import table

    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), args.shape)
        rows = []
        for batch in (1, 16):
            if args.same_process:
                times = same_process(Path(tmp), batch, args)
            else:
                times, digests = {"hf": [], "ours": []}, set()
                for _ in range(args.repeats):
                    for side in times:
                        result = run_worker(side, Path(tmp), batch, args)
                        times[side].append(result["seconds"])
                        digests.add(result["ids"])
                assert len(digests) == 1, "ids differ"
            tokens = batch * args.new_tokens
            best = {name: min(values) for name, values in times.items()}
            rows.append([str(batch), f"{tokens / best['hf']:.1f}", f"{tokens / best['ours']:.1f}",
                         f"{best['hf'] / best['ours']:.2f}x",
                         f"{statistics.median(times['hf']) / statistics.median(times['ours']):.2f}x"])
    where = "one process, OpenMP's defaults" if args.same_process else \
        "each side in its own processes (HF: OpenMP's defaults; cpmlive: its passive waits)"
    print(f"T5 v1.1 ({args.shape} shape: {SHAPES[args.shape]}), fp32, {where}, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens each, greedy; ids identical")
    print(table(["batch", "HF generate tok/s", "engine tok/s", "speed-up (best)", "speed-up (median)"], rows))


if __name__ == "__main__":
    main()
