"""The Llama demo's tokenizer: a Qwen2-style byte-level BPE trained on the embedded corpora.

Byte-level, so every character encodes (no unknown token); ``<|endoftext|>``, ``<|im_start|>`` and
``<|im_end|>`` follow the merges, and the ChatML template renders chats as Qwen2-Instruct's does
(:func:`~cpmlive.tokenizer.hf_train.train_tokenizer`). Beside ``tokenizer.json`` and
``tokenizer_config.json`` it writes ``generation_config.json``, whose end tokens are ``<|im_end|>``
(a chat turn's) and ``<|endoftext|>`` (a document's, as ``data prepare`` ends each one); ``data
prepare`` and ``convert`` carry all three into the checkpoint. The same texts give the same files,
byte for byte. The rest of the demo is ``recipes/llama-demo.yaml``.

``python -m cpmlive.train.llama_demo --out data/llama-demo-vocab``; ``--held-out FILE`` writes
the same held-out documents as ``python -m cpmlive.train.cpm1_demo --held-out FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.hf import GENERATION_CONFIG_FILE, HFTokenizer
from cpmlive.tokenizer.hf_train import train_tokenizer
from cpmlive.train.cpm1_demo import CORPORA, corpus_texts, write_held_out
from cpmlive.utils import atomic_write_text

VOCAB_SIZE = 8000
STYLE = "byte-level"
MAX_LENGTH = 256
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def generation_config(tokenizer: HFTokenizer) -> dict:
    """What ``generate`` and ``chat`` stop on and pad with, by the tokenizer's ids."""
    end_ids = [tokenizer.token_to_id(token) for token in END_TOKENS]
    return {"eos_token_id": end_ids, "pad_token_id": tokenizer.token_to_id("<|endoftext|>")}


def build_tokenizer(out_dir: Path, sources: list[str], vocab_size: int = VOCAB_SIZE) -> HFTokenizer:
    """Train the tokenizer on ``sources`` into ``out_dir`` and add its ``generation_config.json``."""
    vocab = train_tokenizer(corpus_texts(sources), vocab_size, out_dir, style=STYLE, model_max_length=MAX_LENGTH)
    tokenizer = HFTokenizer(vocab)
    text = json.dumps(generation_config(tokenizer), indent=2) + "\n"
    atomic_write_text(Path(out_dir) / GENERATION_CONFIG_FILE, text)
    return HFTokenizer(vocab)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmlive.train.llama_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the directory to write tokenizer.json and its companions to")
    parser.add_argument("--held-out", type=Path, help="write the held-out documents here instead")
    parser.add_argument("--size", type=int, default=VOCAB_SIZE)
    parser.add_argument("sources", nargs="*", default=list(CORPORA))
    args = parser.parse_args(argv)
    if args.held_out is not None:
        print(f"wrote {args.held_out} ({write_held_out(args.held_out, args.sources)} documents)")
        return 0
    if args.out is None:
        parser.error("--out or --held-out is required")
    try:
        if (args.out / "tokenizer.json").exists():
            raise CpmliveError(f"{args.out / 'tokenizer.json'} exists; remove it first")
        tokenizer = build_tokenizer(args.out, args.sources, args.size)
    except CpmliveError as exc:
        print(f"llama_demo: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({tokenizer.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
