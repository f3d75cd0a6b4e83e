"""Our GGUF export read by llama.cpp: the same token ids and the same greedy ids, per architecture
and tensor type, in one run.

For each architecture a small HF model on random weights (sharp enough logits that greedy decoding
has no near-ties: init std 0.1) with a tokenizer trained here (Qwen2-style byte-level BPE, or a
Llama-2-style SentencePiece BPE for llama/mistral) is exported with ``cpmlive convert DIR OUT.gguf
--to gguf --dtype T``; llama.cpp (llama-cpp-python) loads the file; ours loads the same file
(``cpmlive.load(OUT.gguf)``). Rows: how many of the texts tokenize to the same ids, and how many
prompts decode the same 24 greedy tokens.

    pip install llama-cpp-python==0.3.16     # builds from source (~25 min on 2 cores)
    python benchmarks/gguf_llama_cpp.py [--keep DIR]

Run it by hand (it is not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TEXTS = ["今天天气不错，我们去公园玩。", "Hello world 你好，世界！", "  两个空格\n\n换行 123 4567",
         "清华大学的CPM模型是2020年发布的。", "他说：“这本书写得很好。”然后走了。", "emoji 😀 and tabs\tend"]
PROMPTS = ["今天天气", "Hello", "清华大学", "他说：", "一二三"]
NEW_TOKENS = 24
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-6)
ARCHITECTURES = {  # name: (HF config class, HF model class, extra fields, tokenizer style)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sentencepiece"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 32, "sliding_window": 4096}, "sentencepiece"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, "byte-level"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 48}, "byte-level"),
}
TYPES = ("f32", "f16", "q8_0")


def corpus() -> list[str]:
    """Text to train the tokenizers on: the README and the docs (Chinese and English)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [line for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_hf(directory: Path, name: str) -> None:
    import transformers

    from cpmlive.tokenizer.hf_train import train_tokenizer

    config_name, model_name, extra, style = ARCHITECTURES[name]
    train_tokenizer(corpus(), 2000, directory, style=style)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **{**SHAPE, **extra})
    getattr(transformers, model_name)(config).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))


def export(directory: Path, out: Path, kind: str) -> None:
    subprocess.run([sys.executable, "-m", "cpmlive", "convert", str(directory), str(out), "--to", "gguf",
                    "--dtype", kind, "--force"], check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def llama_cpp_side(path: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """llama.cpp's ids of the texts (with the special tokens its metadata says to add) and its
    greedy continuation of each prompt's ids."""
    import llama_cpp

    with contextlib.redirect_stderr(io.StringIO()):
        model = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    ids = [model.tokenize(text.encode(), add_bos=True, special=False) for text in TEXTS]
    greedy = []
    for tokens in prompts:
        model.reset()
        out = []
        for token in model.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if token == model.token_eos() or len(out) == NEW_TOKENS:
                break
            out.append(token)
        greedy.append(out)
    return ids, greedy


def our_side(path: Path) -> tuple[object, list[list[int]], list[list[int]], list[list[int]]]:
    """Our model, our ids of the texts (as the model reads them), the prompts' ids and their greedy
    continuations."""
    import cpmlive

    lm = cpmlive.load(path)
    ids = [lm.tokenizer.encode_for_model(text) for text in TEXTS]
    prompts = [lm.tokenizer.encode_for_model(prompt) for prompt in PROMPTS]
    greedy = [lm.generate_ids([prompt], max_new_tokens=NEW_TOKENS)[0] for prompt in PROMPTS]
    return lm, ids, prompts, greedy


@torch.no_grad()
def tie_gap(lm: object, prompt: list[int], ours: list[int], theirs: list[int]) -> float | None:
    """Where the two continuations part, the gap between our two best logits (a near-tie when
    small: the two products' rounding then decides); ``None`` when they agree."""
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if step is None and len(ours) == len(theirs):
        return None
    step = min(len(ours), len(theirs)) if step is None else step
    model = lm.model
    logits = model.logits(model(torch.tensor([prompt + ours[:step]])))[0, -1].float()
    best = logits.topk(2).values
    return float(best[0] - best[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep the models and GGUF files here")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    print("| architecture | type | same token ids | same greedy ids | where they part: our top-2 logit gap |")
    print("|---|---|---|---|---|")
    for name in ARCHITECTURES:
        directory = root / name
        if not (directory / "config.json").is_file():
            build_hf(directory, name)
        for kind in TYPES:
            path = root / f"{name}-{kind}.gguf"
            export(directory, path, kind)
            lm, our_ids, prompts, our_greedy = our_side(path)
            their_ids, their_greedy = llama_cpp_side(path, prompts)
            same_ids = sum(a == b for a, b in zip(their_ids, our_ids))
            gaps = [tie_gap(lm, p, a, b) for p, a, b in zip(prompts, our_greedy, their_greedy)]
            parted = ", ".join(f"{gap:.4f}" for gap in gaps if gap is not None) or "-"
            same = sum(gap is None for gap in gaps)
            print(f"| {name} | {kind} | {same_ids}/{len(TEXTS)} | {same}/{len(PROMPTS)} | {parted} |", flush=True)


if __name__ == "__main__":
    main()
