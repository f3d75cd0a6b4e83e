"""Batch-1 decoding: cpmlive against llama.cpp at the same parameter count, in one run.

Writes the GGUF twin of our ~450M shape (a Llama of dim 1280, 22 layers, 20 x 64 heads, FFN
3200, vocabulary 30720, random weights) in F32, F16 and Q8_0 with the ``gguf`` package, builds our
CPM-Ant of that shape in float32, float16 matrices (computed in float32, as llama.cpp's F16) and
int8, and times greedy decoding of ``--tokens`` tokens after a short prompt with 2 threads for
each, alternating the two sides ``--repeats`` times and keeping each side's best. The physical
limit is the memory bandwidth, measured here in the same run (a multi-threaded
read of a 2 GB tensor); each row reports the weight bytes read per token and the share of that
bandwidth they reach.

    pip install gguf llama-cpp-python==0.3.16     # llama-cpp-python builds from source (~25 min on 2 cores)
    python benchmarks/vs_llama_cpp.py [--tokens 32] [--keep /tmp/gguf-450m]

Run it by hand on an otherwise idle machine (it is not a test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DIM, LAYERS, HEADS, HEAD_DIM, FFN, VOCAB = 1280, 22, 20, 64, 3200, 30720
PROMPT = [6, 1271, 2064, 9, 4417, 33, 1036, 25]


def read_bandwidth(seconds: float = 2.0) -> float:
    """GB/s of a multi-threaded sum over a 2 GB float32 tensor (reads only)."""
    data = torch.ones(512 * 1024 * 1024)
    data.sum()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        data.sum()
        count += 1
    return count * data.numel() * 4 / (time.perf_counter() - start) / 1e9


# ---- llama.cpp ---------------------------------------------------------------------------------------


def write_gguf(path: Path, kind: str) -> None:
    import gguf

    qtype = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, data)
        elif kind == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def vector(name: str) -> None:
        writer.add_tensor(name, np.ones(DIM, dtype=np.float32))

    matrix("token_embd.weight", VOCAB, DIM)
    vector("output_norm.weight")
    for i in range(LAYERS):
        vector(f"blk.{i}.attn_norm.weight")
        vector(f"blk.{i}.ffn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", DIM, DIM)
        matrix(f"blk.{i}.ffn_gate.weight", FFN, DIM)
        matrix(f"blk.{i}.ffn_up.weight", FFN, DIM)
        matrix(f"blk.{i}.ffn_down.weight", DIM, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def open_llama_cpp(path: Path, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def time_llama_cpp(llm, tokens: int) -> float:
    llm.reset()
    llm.eval(PROMPT)
    llm.eval([100])  # warm
    start = time.perf_counter()
    for step in range(tokens):
        llm.eval([200 + step])
    return tokens / (time.perf_counter() - start)


# ---- ours --------------------------------------------------------------------------------------------


def our_model(kind: str) -> torch.nn.Module:
    from cpmlive.compress.quantize import quantize_model
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.config import QuantConfig
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.checkpoint import matrix_names

    config = AntConfig(vocab_size=VOCAB, dim_model=DIM, num_heads=HEADS, dim_head=HEAD_DIM, dim_ff=FFN,
                       num_layers=LAYERS, half=False)
    model = build_model(config, seed=0).eval()
    if kind == "int8":
        return quantize_model(model, QuantConfig(bits=8))
    if kind == "fp16":
        names = matrix_names(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in names:
                    param.data = param.data.half()
    return model


def time_ours(model: torch.nn.Module, tokens: int) -> float:
    from cpmlive.infer.generate import GenerationConfig, decode_steps

    options = GenerationConfig(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1)
    with torch.no_grad():
        list(decode_steps(model, [PROMPT], GenerationConfig(max_new_tokens=3, min_new_tokens=3), stop_ids=7))
        steps = decode_steps(model, [PROMPT], options, stop_ids=7)
        next(steps)  # the prefill's token
        start = time.perf_counter()
        for _ in steps:
            pass
    return tokens / (time.perf_counter() - start)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every weight once (the embedding as the head)."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if "prompt_embedding" not in name and "segment_embedding" not in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternated timings of each side (best kept)")
    parser.add_argument("--keep", default="/tmp/gguf-450m", help="directory for the GGUF files (reused)")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = Path(args.keep)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = [("fp32", "F32"), ("fp16", "F16"), ("int8", "Q8_0")]
    llama = {}
    if not args.skip_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.16; "
                             "or --skip-llama-cpp)") from None
        for _, kind in pairs:
            path = directory / f"llama-450m-{kind}.gguf"
            if not path.is_file():
                print(f"writing {path} ...", flush=True)
                write_gguf(path, kind)
    bandwidth = read_bandwidth()
    print(f"read bandwidth here: {bandwidth:.1f} GB/s ({args.threads} threads)")
    rows = []
    for ours_kind, gguf_kind in pairs:
        model = our_model(ours_kind)
        nbytes = weight_bytes(model)
        llm = None if args.skip_llama_cpp else open_llama_cpp(directory / f"llama-450m-{gguf_kind}.gguf", args.threads)
        rates, others = [], []
        for _ in range(args.repeats):  # alternated, best of each: the bandwidth here drifts from minute to minute
            rates.append(time_ours(model, args.tokens))
            if llm is not None:
                others.append(time_llama_cpp(llm, args.tokens))
        del model, llm
        if others:
            llama[gguf_kind] = max(others)
        rows.append((ours_kind, gguf_kind, max(rates), nbytes))
    print("| precision | cpmlive tok/s | llama.cpp tok/s | ratio | weights per token | cpmlive GB/s | of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for ours_kind, gguf_kind, rate, nbytes in rows:
        other = llama.get(gguf_kind)
        versus = f"{other:.2f}" if other else "-"
        ratio = f"{rate / other:.2f}x" if other else "-"
        print(f"| {ours_kind} / {gguf_kind} | {rate:.2f} | {versus} | {ratio} | {nbytes / 1e9:.2f} GB | "
              f"{rate * nbytes / 1e9:.1f} | {rate * nbytes / 1e9 / bandwidth:.0%} |")


if __name__ == "__main__":
    main()
