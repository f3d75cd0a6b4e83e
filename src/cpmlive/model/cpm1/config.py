"""CPM-1's config (a GPT-2 decoder, named as our other configs) and its presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import StackConfig, read_json_object
from cpmlive.errors import CpmliveError


# HF ``GPT2Config`` key -> ours (``n_inner`` may be null: 4 x n_embd).
GPT2_KEY_NAMES = {"n_embd": "dim_model", "n_layer": "num_layers", "n_head": "num_heads", "n_positions": "max_length",
                  "n_inner": "dim_ff", "layer_norm_epsilon": "eps", "vocab_size": "vocab_size"}


@dataclass
class Cpm1Config(StackConfig):
    """CPM-1 (TsinghuaAI CPM-Generate): a GPT-2 decoder, named as our other configs.

    Pre-LN blocks with LayerNorms and biases, learned absolute positions, ``gelu_new`` and a head
    tied to the embedding. No soft prompt (``prompt_length`` is 0) and no segments.
    """

    vocab_size: int = 30000
    dim_model: int = 2560
    num_layers: int = 32
    dim_head: int = 80
    model_type: str = "cpm1"
    eps: float = 1e-5

    family_name = "CPM-1"

    @property
    def prompt_length(self) -> int:
        """CPM-1 has no soft prompt: a row is its text's pieces."""
        return 0

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "Cpm1Config":
        """HF ``GPT2Config`` json (``model_type`` ``"gpt2"``); refused where it is not CPM-1's block."""
        activation = data.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CpmliveError(f"config: activation_function {activation!r}: CPM-1 uses gelu_new")
        for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                             ("tie_word_embeddings", True)):
            if data.get(flag, wanted) != wanted:
                raise CpmliveError(f"config: {flag}={data[flag]!r} is not CPM-1's GPT-2 block")
        mapped = {ours: data[hf] for hf, ours in GPT2_KEY_NAMES.items() if data.get(hf) is not None}
        mapped.setdefault("dim_ff", 4 * mapped.get("dim_model", cls.dim_model))
        heads = mapped.get("num_heads", cls.num_heads)
        width = mapped.get("dim_model", cls.dim_model)
        if not isinstance(heads, int) or not isinstance(width, int) or heads <= 0 or width % heads:
            raise CpmliveError(f"config: n_embd {width!r} is not a multiple of n_head {heads!r}")
        mapped["dim_head"] = width // heads
        mapped["half"] = cls.half_in_hf(data)
        return cls.from_dict(mapped)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` for HF ``GPT2LMHeadModel``."""
        if self.dim_head * self.num_heads != self.dim_model or self.mask_modules is not None:
            raise CpmliveError("HF GPT2LMHeadModel needs num_heads x dim_head == dim_model and every sub-block")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                "n_positions": self.max_length, "n_ctx": self.max_length, "n_embd": self.dim_model,
                "n_layer": self.num_layers, "n_head": self.num_heads, "n_inner": self.dim_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": self.eps, "resid_pdrop": self.dropout_p,
                "embd_pdrop": self.dropout_p, "attn_pdrop": self.dropout_p, "scale_attn_weights": True,
                "tie_word_embeddings": True, "use_cache": True, "dtype": "float16" if self.half else "float32"}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cpm1Config":
        """Read our ``config.json`` (``model_type`` ``"cpm1"``) or HF's GPT-2 one."""
        data = read_json_object(path)
        if data.get("model_type") == "gpt2":
            return cls.from_hf(data)
        if data.get("model_type") != "cpm1":
            raise CpmliveError(f"{path}: model_type {data.get('model_type')!r} is not a CPM-1 config")
        return cls.from_dict(data)


# CPM-Generate's 2.6B (32 x 2560, 32 heads) and the 12 x 768 CPM-Distill; the tiny one is for tests.
PRESETS: dict[str, Any] = {
    "cpm1-2.6b": lambda: Cpm1Config(),
    "cpm1-distill": lambda: Cpm1Config(dim_model=768, dim_ff=3072, num_layers=12, num_heads=12, dim_head=64),
    "cpm1-tiny": lambda: Cpm1Config(dim_model=64, dim_ff=256, num_layers=2, num_heads=4, dim_head=16, half=False,
                                    max_length=128),
}
