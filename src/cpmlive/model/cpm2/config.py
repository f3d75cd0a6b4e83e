"""The CPM-2 family's config (CPM-2, CPM-2.1, their mixture of experts, EVA 1.0/2.0) and presets.

The numbers are the released ones: CPM-2's (vocabulary 26240, 4096 wide, 64 heads of 64, a
10240-wide gated-GELU FFN, 24 + 24 blocks, 32 position buckets up to 128, RMS norms at 1e-6, an
untied head, no attention scaling), its MoE's (32 experts in every FFN) and EVA's (vocabulary 30000;
EVA 2.0 divides attention scores by ``sqrt(dim_head)``). A span's decoder starts from ``<s_0>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from cpmlive.config import EncoderDecoderConfig, read_json_object
from cpmlive.errors import CpmliveError

CPM2_START, EVA_START = 26050, 29810  # the ids of <s_0> in CPM-2's and EVA's vocabularies
SENTINELS = 190  # <s_0> ... <s_189>, the last ids of CPM-2's and EVA's vocabularies
# ModelCenter's CPM2Config keys -> ours.
MODELCENTER_KEYS = {"vocab_size": "vocab_size", "dim_model": "dim_model", "num_heads": "num_heads",
                    "dim_head": "dim_head", "dim_ff": "dim_ff", "num_encoder_layers": "num_encoder_layers",
                    "num_decoder_layers": "num_layers", "position_bias_num_buckets": "relative_buckets",
                    "position_bias_max_distance": "relative_max_distance", "norm_eps": "eps"}
# EVA's HF port (thu-coai/EVA, branch huggingface): T5's keys; no model_type.
EVA_HF_KEYS = {"vocab_size": "vocab_size", "d_model": "dim_model", "d_kv": "dim_head", "d_ff": "dim_ff",
               "num_layers": "num_encoder_layers", "num_decoder_layers": "num_layers", "num_heads": "num_heads",
               "relative_attention_num_buckets": "relative_buckets", "layer_norm_epsilon": "eps"}


@dataclass
class Cpm2Config(EncoderDecoderConfig):
    """CPM-2's encoder-decoder; ``experts`` > 0: every FFN is a BASE layer of that many experts
    (each with its own norm, a centroid routes each token to one). ``dialogue``: the model reads
    EVA's dialogue format (``chat``)."""

    vocab_size: int = 26240
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 24
    num_encoder_layers: int = 24
    num_heads: int = 64
    dim_head: int = 64
    half: bool = True
    max_length: int = 1024
    decoder_start_id: int = CPM2_START
    experts: int = 0
    dialogue: bool = False
    model_type: str = "cpm2"

    family_name = "CPM-2"
    positive_fields: ClassVar[tuple[str, ...]] = EncoderDecoderConfig.positive_fields

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts < 0:
            raise CpmliveError(f"config: experts must be a non-negative integer, got {self.experts!r}")
        if self.experts == 1:
            raise CpmliveError("config: a mixture needs at least 2 experts (0: a dense FFN)")
        if not isinstance(self.dialogue, bool):
            raise CpmliveError(f"config: dialogue must be true or false, got {self.dialogue!r}")
        if self.bias_per_layer or self.tie_word_embeddings:
            raise CpmliveError("config: CPM-2 has one position bias table per stack and an untied head")

    # ---- the published configs -----------------------------------------------------------------

    @classmethod
    def from_modelcenter(cls, data: dict[str, Any], source: str = "config") -> "Cpm2Config":
        """ModelCenter's ``CPM2Config`` JSON (``cpm2-large``'s)."""
        activation = data.get("ffn_activate_fn", "gated_gelu")
        kinds = {"gated_gelu": "gated-gelu-erf", "gated_gelu_new": "gated-gelu"}
        if activation not in kinds:
            raise CpmliveError(f"{source}: ffn_activate_fn {activation!r} is not CPM-2's "
                               f"(supported: {', '.join(kinds)})")
        if data.get("tied") or data.get("att_bias") or data.get("ffn_bias") or data.get("norm_bias"):
            raise CpmliveError(f"{source}: a tied head or biases are not CPM-2's")
        mapped = {ours: data[key] for key, ours in MODELCENTER_KEYS.items() if key in data}
        mapped.update(ffn=kinds[activation], attention_scale=bool(data.get("attn_scale", False)),
                      half=bool(data.get("half", True)),
                      decoder_start_id=mapped.get("vocab_size", cls.vocab_size) - SENTINELS)
        return cls.from_dict(mapped)

    def to_modelcenter(self) -> dict[str, Any]:
        """ModelCenter's ``CPM2Config`` JSON for these weights (its length-scaled products)."""
        if self.ffn == "relu" or self.experts:
            raise CpmliveError("ModelCenter's CPM2 has a dense gated-GELU FFN")
        data = {key: getattr(self, ours) for key, ours in MODELCENTER_KEYS.items()}
        data.update(ffn_activate_fn="gated_gelu" if self.ffn == "gated-gelu-erf" else "gated_gelu_new",
                    length_scale=True, attn_scale=self.attention_scale, tied=False, half=self.half, dropout_p=0.0,
                    att_mask_value="-inf", pos_bias_type="relative")
        return data

    @classmethod
    def from_eva_hf(cls, data: dict[str, Any], source: str = "config") -> "Cpm2Config":
        """The ``config.json`` of EVA's HF port (T5's keys with ``attn_scale``; its GELU is erf)."""
        mapped = {ours: data[key] for key, ours in EVA_HF_KEYS.items() if data.get(key) is not None}
        mapped.setdefault("num_layers", mapped.get("num_encoder_layers", cls.num_encoder_layers))
        start = data.get("decoder_start_token_id", data.get("bos_token_id"))
        start = mapped.get("vocab_size", cls.vocab_size) - SENTINELS if start is None else start
        mapped.update(ffn="gated-gelu-erf", attention_scale=bool(data.get("attn_scale", False)), dialogue=True,
                      decoder_start_id=start, half=cls.half_in_hf(data))
        return cls.from_dict(mapped)

    def to_eva_hf(self) -> dict[str, Any]:
        if self.experts:
            raise CpmliveError("EVA's HF port has no mixture of experts")
        data = {key: getattr(self, ours) for key, ours in EVA_HF_KEYS.items()}
        data.update(attn_scale=self.attention_scale, decoder_start_token_id=self.decoder_start_id,
                    bos_token_id=self.decoder_start_id, relative_attention_max_distance=self.relative_max_distance,
                    dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False, use_cache=True,
                    dtype="float16" if self.half else "float32")
        return data

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cpm2Config":
        """Ours (``model_type`` ``"cpm2"``), ModelCenter's or EVA's HF port's ``config.json``."""
        data = read_json_object(path)
        if data.get("model_type") == cls.model_type:
            return cls.from_dict(data)
        if "dim_model" in data:
            return cls.from_modelcenter(data, str(path))
        if "d_model" in data:
            return cls.from_eva_hf(data, str(path))
        raise CpmliveError(f"{path}: not a CPM-2 config (ours, ModelCenter's or EVA's)")


def _eva(dim: int, ffn: int, heads: int, layers: int, scaled: bool) -> Cpm2Config:
    return Cpm2Config(vocab_size=30000, dim_model=dim, dim_ff=ffn, num_heads=heads, dim_head=64, num_layers=layers,
                      num_encoder_layers=layers, attention_scale=scaled, decoder_start_id=EVA_START, dialogue=True,
                      max_length=512)


PRESETS: dict[str, Any] = {
    "cpm2-11b": lambda: Cpm2Config(),
    "cpm2-moe-198b": lambda: Cpm2Config(vocab_size=52736, experts=32, decoder_start_id=52516),
    "eva1.0": lambda: _eva(2048, 5120, 32, 24, False),
    "eva2.0-base": lambda: _eva(768, 3072, 12, 12, True),
    "eva2.0-large": lambda: _eva(1024, 4096, 16, 24, True),
    "eva2.0-xlarge": lambda: _eva(2048, 5120, 32, 24, True),
    "cpm2-tiny": lambda: Cpm2Config(vocab_size=4096, dim_model=64, dim_ff=128, num_layers=2, num_encoder_layers=2,
                                    num_heads=4, dim_head=16, half=False, max_length=256, decoder_start_id=3906),
}
