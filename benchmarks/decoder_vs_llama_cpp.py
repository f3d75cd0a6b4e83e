"""The decoder family against llama.cpp on the same Llama weights, batch-1 decode and a prefill, in one run.

For each shape the script draws random weights (std 0.02, seed 0), saves them as an HF Llama
directory (``config.json`` + ``model.safetensors``, with a small SentencePiece-style tokenizer
trained on the docs, as ``gguf_llama_cpp.py`` does) and writes the same tensors as GGUF in F32,
F16 and Q8_0 with ``cpmlive.model.decoder.gguf.write_gguf`` (what llama.cpp's converter writes).
Ours loads the directory with ``cpmlive.model.decoder.convert.load_pretrained`` and runs it in
float32, with float16-stored matrices (computed in float32, as llama.cpp's F16) and in our int8
(weight-only, one scale per row); llama.cpp (llama-cpp-python) reads the GGUF twin. Both use
``--threads`` threads and run alternately ``--repeats`` times, best of each kept:

* decode: ``--tokens`` greedy steps after an 8-token prompt (ours through ``decode_steps``, as
  ``cpmlive generate`` runs; llama.cpp one ``eval`` per token);
* prefill: one ``--prefill``-token prompt (ours as ``generate`` prefills it, the last position's
  logits; llama.cpp one ``eval`` with ``n_batch`` as large).

HF transformers' ``LlamaForCausalLM`` (float32, its cache, one token per call) is a second
reference for decoding. The physical limit of decoding is the memory bandwidth, measured in the
same run before every round (a multi-threaded read of a 2 GB tensor, ``vs_llama_cpp.read_bandwidth``),
the best kept; each decode row gives the bytes of weights read per token (the tied embedding once, as
the head) and the share of that bandwidth each side reaches. The last column is the largest
difference of the prefill's last logits between the two sides (llama.cpp keeps its cache in F16).

    pip install gguf llama-cpp-python==0.3.16     # llama-cpp-python builds from source (~25 min on 2 cores)
    python benchmarks/decoder_vs_llama_cpp.py [--shapes 450m 1b] [--tokens 16] [--keep /tmp/decoder-gguf]

Run it by hand on an otherwise idle machine (it is not a test); ``--shapes tiny`` checks the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_llama_cpp import read_bandwidth  # noqa: E402

SHAPES = {  # Llama shapes with grouped keys and values and a tied head (as Llama 3.2 and Qwen 2.5 have)
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024),
    "450m": dict(hidden_size=1280, num_hidden_layers=22, num_attention_heads=20, num_key_value_heads=4,
                 intermediate_size=3840, vocab_size=32000),
    # Llama 3.2 1B's shape (its RoPE without the llama3 scaling: the speed is the same)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
}
PROMPT = [1, 271, 206, 9, 417, 33, 136, 25]  # ids below every shape's vocabulary
KINDS = [("float32", "F32"), ("float16", "F16"), ("int8", "Q8_0")]


# ---- the weights, both ways ---------------------------------------------------------------------


MAX_POSITIONS = 2048  # in the configs; the prefill's length only sizes the caches


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
            **SHAPES[shape]}


def random_state(config: dict) -> dict[str, torch.Tensor]:
    """HF Llama's tensors: N(0, 0.02) matrices and embedding, unit norms."""
    generator = torch.Generator().manual_seed(0)
    dim, ffn, heads, kv_heads = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads"))
    head_dim = dim // heads

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * 0.02

    state = {"model.embed_tokens.weight": matrix(config["vocab_size"], dim), "model.norm.weight": torch.ones(dim)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        state.update({
            prefix + "input_layernorm.weight": torch.ones(dim),
            prefix + "post_attention_layernorm.weight": torch.ones(dim),
            prefix + "self_attn.q_proj.weight": matrix(heads * head_dim, dim),
            prefix + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, dim),
            prefix + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, dim),
            prefix + "self_attn.o_proj.weight": matrix(dim, heads * head_dim),
            prefix + "mlp.gate_proj.weight": matrix(ffn, dim), prefix + "mlp.up_proj.weight": matrix(ffn, dim),
            prefix + "mlp.down_proj.weight": matrix(dim, ffn)})
    return state


def write_hf(directory: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def prepare(shape: str, root: Path) -> Path:
    """The HF directory and the three GGUF files of ``shape`` under ``root`` (reused when there)."""
    directory = root / f"llama-{shape}"
    config = hf_config(shape)
    done = directory / "done.json"
    if done.is_file() and json.loads(done.read_text()) == config:
        return directory
    from cpmlive.model.decoder.gguf import write_gguf
    from cpmlive.tokenizer.hf_train import train_tokenizer
    from gguf_llama_cpp import corpus

    print(f"writing {directory} ...", flush=True)
    state = random_state(config)
    write_hf(directory, config, state)
    train_tokenizer(corpus(), 2000, directory, style="sentencepiece")  # GGUF carries one (padded to the table)
    for _, kind in KINDS:
        write_gguf(config, state, directory, directory / f"{kind}.gguf", dtype=kind.lower())
    done.write_text(json.dumps(config))
    return directory


# ---- ours ---------------------------------------------------------------------------------------


def our_model(directory: Path, kind: str) -> torch.nn.Module:
    from cpmlive.compress.quantize import quantize_model
    from cpmlive.config import QuantConfig
    from cpmlive.model.checkpoint import matrix_names
    from cpmlive.model.decoder.convert import load_pretrained

    model, _ = load_pretrained(directory)
    model = model.float().eval()
    if kind == "int8":
        return quantize_model(model, QuantConfig(bits=8))
    if kind == "float16":
        names = matrix_names(model)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in names:
                    parameter.data = parameter.data.half()
    return model


def time_our_decode(model: torch.nn.Module, tokens: int) -> float:
    from cpmlive.infer.generate import GenerationConfig, decode_steps

    options = GenerationConfig(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1)
    list(decode_steps(model, [PROMPT], GenerationConfig(max_new_tokens=3, min_new_tokens=3), 2))  # warm
    steps = decode_steps(model, [PROMPT], options, 2)
    next(steps)  # the prefill's token
    start = time.perf_counter()
    for _ in steps:
        pass
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def our_prefill(model: torch.nn.Module, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Seconds of a prefill as ``generate`` runs it (every position's keys and values, the last
    position's logits), and those logits."""
    batch = torch.tensor([ids])
    start = time.perf_counter()
    cache = model.new_cache(1, len(ids) + 1)
    logits = model.logits(model(batch, cache=cache, last=1))[0, -1]
    return time.perf_counter() - start, logits


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every weight once (the tied embedding as the head)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- llama.cpp and HF ---------------------------------------------------------------------------


def open_llama_cpp(path: Path, threads: int, context: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def time_llama_cpp_decode(llm, tokens: int) -> float:
    llm.reset()
    llm.eval(PROMPT)
    llm.eval([100])  # warm
    start = time.perf_counter()
    for step in range(tokens):
        llm.eval([200 + step])
    return tokens / (time.perf_counter() - start)


def llama_cpp_prefill(llm, ids: list[int]) -> tuple[float, np.ndarray]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    seconds = time.perf_counter() - start
    return seconds, np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


@torch.inference_mode()
def time_hf_decode(directory: Path, tokens: int, repeats: int) -> float:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    best = 0.0
    for _ in range(repeats):
        out = model(torch.tensor([PROMPT]), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True)  # warm
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


# ---- the run ------------------------------------------------------------------------------------


class Bandwidth:
    """The best read bandwidth measured so far: measured again in every round, since other work on
    the machine moves it from minute to minute."""

    def __init__(self) -> None:
        self.best = 0.0

    def measure(self) -> None:
        self.best = max(self.best, read_bandwidth(1.0))


def run_shape(shape: str, args: argparse.Namespace, bandwidth: Bandwidth) -> list[tuple]:
    """Per precision: (shape, kinds, our / llama.cpp decode tok/s, weight bytes, our / llama.cpp
    prefill tok/s, last-logit gap); then HF's decode tok/s."""
    context = args.prefill + 64
    directory = prepare(shape, Path(args.keep))
    prompt = [1] + [3 + (i * 7919) % (SHAPES[shape]["vocab_size"] - 3) for i in range(args.prefill - 1)]
    rows = []
    for ours_kind, gguf_kind in KINDS:
        model = our_model(directory, ours_kind)
        llm = open_llama_cpp(directory / f"{gguf_kind}.gguf", args.threads, context)
        ours, theirs, our_fill, their_fill = [], [], [], []
        for _ in range(args.repeats):  # alternated, best of each: the bandwidth here drifts from minute to minute
            bandwidth.measure()
            ours.append(time_our_decode(model, args.tokens))
            theirs.append(time_llama_cpp_decode(llm, args.tokens))
            seconds, our_logits = our_prefill(model, prompt)
            our_fill.append(seconds)
            seconds, their_logits = llama_cpp_prefill(llm, prompt)
            their_fill.append(seconds)
        gap = float(np.abs(our_logits.float().numpy() - their_logits).max())
        rows.append((shape, f"{ours_kind} / {gguf_kind}", max(ours), max(theirs), weight_bytes(model),
                     args.prefill / min(our_fill), args.prefill / min(their_fill), gap))
        print(f"{shape} {ours_kind}: decode {ours} vs {theirs}; prefill s {our_fill} vs {their_fill}", flush=True)
        del model, llm
        gc.collect()
    if not args.skip_hf:
        rows.append((shape, time_hf_decode(directory, args.tokens, args.repeats)))
    return rows


def table(rows: list[tuple], bandwidth: float, prefill: int) -> list[str]:
    lines = ["| shape | precision (ours / GGUF) | cpmlive decode tok/s | llama.cpp decode tok/s | ratio | "
             "weights per token | cpmlive GB/s | cpmlive of bandwidth | llama.cpp of bandwidth | "
             f"cpmlive prefill tok/s ({prefill}) | llama.cpp prefill tok/s | ratio | last-logit gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if len(row) == 2:
            lines.append(f"| {row[0]} | HF transformers float32 | {row[1]:.2f} | | | | | | | | | | |")
            continue
        shape, kinds, rate, other, nbytes, fill, other_fill, gap = row
        lines.append(f"| {shape} | {kinds} | {rate:.2f} | {other:.2f} | {rate / other:.2f}x | {nbytes / 1e9:.2f} GB | "
                     f"{rate * nbytes / 1e9:.1f} | {rate * nbytes / 1e9 / bandwidth:.0%} | "
                     f"{other * nbytes / 1e9 / bandwidth:.0%} | {fill:.1f} | {other_fill:.1f} | "
                     f"{fill / other_fill:.2f}x | {gap:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["450m", "1b"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per timing")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternated timings of each side (best kept)")
    parser.add_argument("--keep", default="/tmp/decoder-gguf", help="directory for the weights (reused)")
    parser.add_argument("--skip-hf", action="store_true", help="leave HF transformers out")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.16)") from None
    torch.set_num_threads(args.threads)
    bandwidth = Bandwidth()
    rows = []
    for shape in args.shapes:
        rows += run_shape(shape, args, bandwidth)
    print(f"\nbest read bandwidth measured in the run {bandwidth.best:.1f} GB/s; {args.threads} threads, best of "
          f"{args.repeats} alternated rounds, {args.tokens} decoded tokens per round\n")
    print("\n".join(table(rows, bandwidth.best, args.prefill)))


if __name__ == "__main__":
    main()
