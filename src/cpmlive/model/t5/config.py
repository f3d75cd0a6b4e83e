"""The T5 family's config (one dataclass for T5, mT5 and UMT5: their differences are fields),
HF's ``config.json`` both ways, and its presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import EncoderDecoderConfig, read_json_object
from cpmlive.errors import CpmliveError

# The HF ``model_type`` values this family reads, and the class each is published for.
ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                 "umt5": "UMT5ForConditionalGeneration"}
# HF key -> ours.
HF_KEY_NAMES = {"vocab_size": "vocab_size", "d_model": "dim_model", "d_kv": "dim_head", "d_ff": "dim_ff",
                "num_layers": "num_encoder_layers", "num_decoder_layers": "num_layers", "num_heads": "num_heads",
                "relative_attention_num_buckets": "relative_buckets",
                "relative_attention_max_distance": "relative_max_distance", "layer_norm_epsilon": "eps",
                "decoder_start_token_id": "decoder_start_id", "n_positions": "max_length"}
# feed_forward_proj -> our ffn (HF's gated-gelu is the tanh GELU, ``gelu_new``).
HF_FFN = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-gelu_new": "gated-gelu"}


@dataclass
class T5Config(EncoderDecoderConfig):
    """T5 (``architecture`` ``t5``), mT5 (``mt5``) or UMT5 (``umt5``, a position bias in every
    block): :class:`~cpmlive.config.EncoderDecoderConfig`'s fields, with HF's T5 defaults."""

    architecture: str = "t5"
    model_type: str = "t5"
    pad_id: int = 0
    eos_id: int = 1

    family_name = "T5"

    def validate(self) -> None:
        super().validate()
        if self.architecture not in ARCHITECTURES:
            raise CpmliveError(f"config: architecture {self.architecture!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")

    @classmethod
    def from_hf(cls, data: dict[str, Any], source: str = "config", untied: bool | None = None) -> "T5Config":
        """An HF ``config.json`` of T5, mT5 or UMT5. ``untied``: whether the weights carry their own
        ``lm_head.weight`` (transformers 5 always ties in the config and keeps a stored head apart);
        ``None``: the config's ``tie_word_embeddings`` decides."""
        architecture = data.get("model_type")
        if architecture not in ARCHITECTURES:
            raise CpmliveError(f"{source}: model_type {architecture!r} is not a T5 config "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        projection = str(data.get("feed_forward_proj", "relu" if architecture == "t5" else "gated-gelu"))
        if projection not in HF_FFN:
            raise CpmliveError(f"{source}: feed_forward_proj {projection!r} is not supported "
                               f"(supported: {', '.join(HF_FFN)})")
        mapped: dict[str, Any] = {ours: data[hf] for hf, ours in HF_KEY_NAMES.items() if data.get(hf) is not None}
        mapped.setdefault("num_layers", mapped.get("num_encoder_layers", cls.num_encoder_layers))
        serialized_tie = data.get("tie_word_embeddings", True) is not False
        tied = serialized_tie if untied is None else not untied
        scale = False if architecture == "mt5" else bool(data.get("scale_decoder_outputs", serialized_tie))
        mapped.update(architecture=architecture, ffn=HF_FFN[projection], bias_per_layer=architecture == "umt5",
                      tie_word_embeddings=tied, scale_head=scale, half=cls.half_in_hf(data),
                      pad_id=data.get("pad_token_id", 0), eos_id=data.get("eos_token_id", 1))
        return cls.from_dict(mapped)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` HF's class for ``architecture`` reads."""
        if self.attention_scale or self.ffn == "gated-gelu-erf" or self.bias_per_layer != (self.architecture == "umt5"):
            raise CpmliveError(f"HF's {self.architecture} has no config for this model's attention scale, "
                               "FFN or position biases")
        if self.architecture == "mt5" and self.scale_head:
            raise CpmliveError("HF's mt5 never scales the head's input")
        return {
            "architectures": [ARCHITECTURES[self.architecture]], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "d_model": self.dim_model, "d_kv": self.dim_head, "d_ff": self.dim_ff,
            "num_layers": self.num_encoder_layers, "num_decoder_layers": self.num_layers,
            "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_buckets,
            "relative_attention_max_distance": self.relative_max_distance, "layer_norm_epsilon": self.eps,
            "feed_forward_proj": self.ffn, "dropout_rate": 0.0, "is_encoder_decoder": True,
            "tie_word_embeddings": self.tie_word_embeddings, "scale_decoder_outputs": self.scale_head,
            "decoder_start_token_id": self.decoder_start_id, "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id, "n_positions": self.max_length,
            "dtype": "float16" if self.half else "float32", "use_cache": True,
        }

    @classmethod
    def load(cls, path: str | os.PathLike, untied: bool | None = None) -> "T5Config":
        """Our ``config.json`` (``model_type`` ``"t5"`` with our keys) or an HF one."""
        data = read_json_object(path)
        if "architecture" in data and data.get("model_type") == cls.model_type:
            return cls.from_dict(data)
        return cls.from_hf(data, str(path), untied)


def _t5(dim: int, layers: int, heads: int, ffn: int, version: str = "1.1", vocab: int = 32128,
        dim_head: int = 64, **fields: Any) -> T5Config:
    kind = {"1.0": dict(ffn="relu", tie_word_embeddings=True, scale_head=True),
            "1.1": dict(ffn="gated-gelu", tie_word_embeddings=False, scale_head=False)}[version]
    return T5Config(vocab_size=vocab, dim_model=dim, dim_ff=ffn, num_layers=layers, num_encoder_layers=layers,
                    num_heads=heads, dim_head=dim_head, **{**kind, **fields})


PRESETS: dict[str, Any] = {
    # Shapes of published models (random weights until converted ones are loaded), and a tiny one for tests.
    "t5-small": lambda: _t5(512, 6, 8, 2048, "1.0"),
    "t5-base": lambda: _t5(768, 12, 12, 3072, "1.0"),
    "t5-v1_1-small": lambda: _t5(512, 8, 6, 1024),
    "flan-t5-base": lambda: _t5(768, 12, 12, 2048),
    "mt5-small": lambda: _t5(512, 8, 6, 1024, vocab=250112, architecture="mt5"),
    "umt5-small": lambda: _t5(512, 8, 6, 1024, vocab=256384, architecture="umt5", bias_per_layer=True),
    "t5-tiny": lambda: _t5(64, 2, 4, 128, vocab=512, dim_head=16, max_length=256),
}
