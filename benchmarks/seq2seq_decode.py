"""Encoder-decoder decoding speed: the engine (the encoder once per request, the decoder in the
continuous batch with its cross-attention keys cached) against HF ``generate`` on the same weights.

A T5 v1.1 at t5-v1_1-small's shape (8 + 8 blocks, 512 wide, 6 heads of 64, a 1024-wide gated FFN,
32,128 tokens; ``--shape demo``: t5-demo's, 4 + 4 blocks 256 wide; random weights), fp32, greedy:
HF ``T5ForConditionalGeneration.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)``
against the engine (``LM.request``s submitted together) at batch 1 and 16, prompts of 48 tokens,
64 new tokens each (the engine's prefix cache off: the runs repeat their prompts). Both hold the
same weights, so the ids must be identical; new tokens per second, best of the runs interleaved.

    python benchmarks/seq2seq_decode.py [--shape small|demo] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import cpmlive
from cpmlive.resources import demo_dir

from decode import compare, quiet_transformers, table

COMMON = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
SHAPES = {  # t5-v1_1-small's, and t5-demo's (whose tokenizer both use)
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "demo": dict(vocab_size=8000, d_model=256, d_kv=64, d_ff=640, num_layers=4, num_decoder_layers=4, num_heads=4),
}


def models(directory: Path, shape: str = "small"):
    transformers = quiet_transformers()
    torch.manual_seed(0)
    config = {**SHAPES[shape], **COMMON}
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(config["vocab_size"], config["d_model"]) * 0.05)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((demo_dir("t5-demo") / name).read_bytes())
    lm = cpmlive.load(directory)
    lm.engine.set_prefix_cache(0)  # the runs repeat their prompts: no reuse of a whole prompt HF cannot match
    return hf, lm


def prompts(batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return [torch.randint(3, 7999, (length - 1,), generator=generator).tolist() + [1] for _ in range(batch)]


def hf_decode(hf, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor(rows), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[:, 1:].tolist()


def ours_decode(lm, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    options = lm._options(new_tokens, {"min_new_tokens": new_tokens})
    handles = [lm.engine.submit(lm.request(row + lm.model.prompt_tail(), options, index))
               for index, row in enumerate(rows)]
    return [handle.result().ids for handle in handles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf, lm = models(Path(tmp), args.shape)
        rows = []
        for batch in (1, 16):
            inputs = prompts(batch, args.prompt_tokens)
            assert hf_decode(hf, inputs, args.new_tokens) == ours_decode(lm, inputs, args.new_tokens), "ids differ"
            times = compare({"hf": lambda: hf_decode(hf, inputs, args.new_tokens),
                             "ours": lambda: ours_decode(lm, inputs, args.new_tokens)}, args.repeats)
            tokens = batch * args.new_tokens
            best = {name: min(values) for name, values in times.items()}
            rows.append([str(batch), f"{tokens / best['hf']:.1f}", f"{tokens / best['ours']:.1f}",
                         f"{best['hf'] / best['ours']:.2f}x",
                         f"{statistics.median(times['hf']) / statistics.median(times['ours']):.2f}x"])
    print(f"T5 v1.1 ({args.shape} shape: {SHAPES[args.shape]}), fp32, {torch.get_num_threads()} threads, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, greedy; ids identical")
    print(table(["batch", "HF generate tok/s", "engine tok/s", "speed-up (best)", "speed-up (median)"], rows))


if __name__ == "__main__":
    main()
