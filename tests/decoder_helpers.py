"""Tiny HF decoder directories as published models come: an HF transformers model on random
weights (``save_pretrained``: safetensors, config.json), a tokenizer trained here on local text
(``tokenizer.json`` + ``tokenizer_config.json`` with its chat template) and a
``generation_config.json``. Tests load them with ours and with HF's own classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpm1_helpers import SAMPLES, review_lines

# HF config class, model class and the fields that make each architecture what it is (tiny shapes).
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64, "head_dim": 16}),
}
STYLE = {"llama": "sentencepiece", "mistral": "sentencepiece"}  # the others: byte-level (Qwen's)


def texts() -> list[str]:
    return review_lines(600) + SAMPLES


def tiny_hf_dir(directory: Path, architecture: str = "qwen2", vocab_size: int = 700, seed: int = 0) -> Path:
    """An HF model directory of ``architecture`` on random weights with a tokenizer of its style."""
    import transformers

    from cpmlive.tokenizer.hf_train import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts(), vocab_size, directory, style=STYLE.get(architecture, "byte-level"))
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    config_name, model_name, extra = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    size = len(tokenizer)
    config = getattr(transformers, config_name)(vocab_size=size, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **{**SHAPE, **extra})
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(directory)
    eos = [tokenizer.eos_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else [])
    generation = {"eos_token_id": sorted(set(eos)), "do_sample": False, "max_new_tokens": 32}
    (directory / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return directory


def hf_model(directory: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
