"""CPM-Bee's config (named as OpenBMB's ``cpm-bee-10b.json``) and its presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import StackConfig, read_json_object
from cpmlive.errors import CpmliveError


@dataclass
class BeeConfig(StackConfig):
    """Every CPM-Bee hyper-parameter, named as in OpenBMB's ``cpm-bee-10b.json`` (the shared ones
    in :class:`~cpmlive.config.StackConfig`).

    ``mask_modules`` as for CPM-Ant: the compressed CPM-Bee 5B/2B/1B keep 24 layers and drop
    attention from some of them.
    """

    vocab_size: int = 86583
    max_length: int = 2048
    model_type: str = "cpm-bee"
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048

    family_name = "CPM-Bee"
    positive_fields = ("position_bias_num_buckets", "position_bias_num_segment_buckets", "position_bias_max_distance")
    key_order = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "dropout_p",
                 *positive_fields)

    @property
    def prompt_length(self) -> int:
        """CPM-Bee has no soft prompt: a row is its task's tokens."""
        return 0

    def validate(self) -> None:
        super().validate()
        if self.dim_model % 2:
            raise CpmliveError(f"config: dim_model must be even (the ext-token rotation pairs halves), "
                               f"got {self.dim_model}")
        if self.position_bias_num_segment_buckets < MAX_SEGMENT_RELATION + 1:
            raise CpmliveError(f"config: position_bias_num_segment_buckets must be at least {MAX_SEGMENT_RELATION + 1}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BeeConfig":
        """Read our, OpenBMB's (no ``model_type``) or the HF release's ``config.json``
        (``model_type`` ``"cpmbee"``, HF's names for the shape)."""
        data = read_json_object(path)
        if data.get("model_type") == HF_MODEL_TYPE:
            return cls.from_hf(data)
        if data.get("model_type", "cpm-bee") != "cpm-bee":
            raise CpmliveError(f"{path}: model_type {data['model_type']!r} is not a CPM-Bee config")
        return cls.from_dict(data, strict="model_type" in data)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "BeeConfig":
        """The HF release's config (``CpmBeeConfig``): the shape under HF's names; the remote
        code's own keys (``architectures``, ``auto_map``, ``distance_scale``...) are not ours."""
        mapped = {HF_KEY_NAMES.get(k, k): v for k, v in data.items() if k != "model_type"}
        if mapped.get("distance_scale", SUB_DISTANCE_SCALE) != SUB_DISTANCE_SCALE:
            raise CpmliveError(f"config: distance_scale {mapped['distance_scale']!r}: CPM-Bee rotates extra tokens "
                               f"by {SUB_DISTANCE_SCALE}")
        return cls.from_dict(mapped, strict=False)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` of OpenBMB's HF release, for its remote code (``trust_remote_code``)."""
        reverse = {v: k for k, v in HF_KEY_NAMES.items()}
        out: dict[str, Any] = {"architectures": [HF_ARCHITECTURE], "auto_map": HF_AUTO_MAP}
        for key, value in self.to_dict().items():
            if key in ("model_type", "quantization", "max_length") or (key == "mask_modules" and value is None):
                continue
            out[reverse.get(key, key)] = value
        out["model_type"] = HF_MODEL_TYPE
        return out


# OpenBMB's HF release (``openbmb/cpm-bee-*`` on the Hub: ``config.json`` read by its remote code).
HF_MODEL_TYPE = "cpmbee"
HF_ARCHITECTURE = "CpmBeeForCausalLM"
HF_AUTO_MAP = {"AutoConfig": "configuration_cpmbee.CpmBeeConfig", "AutoModel": "modeling_cpmbee.CpmBeeForCausalLM",
               "AutoModelForCausalLM": "modeling_cpmbee.CpmBeeForCausalLM"}
HF_KEY_NAMES = {"hidden_size": "dim_model", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
SUB_DISTANCE_SCALE = 16  # the angle's factor of an extra token's sub id (the remote code's distance_scale)

# The deepest segment relation: (7 up, 7 down) is bucket 7 * 8 + 7 + 1 (spec section 7.4).
MAX_SEGMENT_RELATION = 64


def _bee(**overrides: Any) -> BeeConfig:
    return BeeConfig(**overrides)


# The compressed CPM-Bee releases (openbmb/cpm-bee-5b, -2b, -1b on the Hub) keep the 10B's 48 layer
# slots and one list of removed sub-blocks, [attention_removed, ffn_removed] per slot: 19 attention
# and 24 FFN blocks stay; heads shrink, dim_model stays.
# Per slot: 2 if its attention stays, + 1 if its FFN does.
RELEASED_MASK = [[not (kept >> 1), not (kept & 1)] for kept in (
    3, 1, 3, 1, 0, 1, 0, 0, 3, 3, 0, 1, 1, 0, 3, 0, 3, 2, 1, 0, 3, 2, 0, 0,
    3, 0, 3, 0, 0, 3, 0, 3, 0, 3, 0, 1, 0, 0, 0, 3, 0, 3, 0, 0, 3, 0, 3, 3)]

PRESETS: dict[str, Any] = {
    "bee-10b": lambda: _bee(),
    "bee-5b": lambda: _bee(mask_modules=RELEASED_MASK),
    "bee-2b": lambda: _bee(dim_ff=5120, dim_head=64, mask_modules=RELEASED_MASK),
    "bee-1b": lambda: _bee(dim_ff=1024, dim_head=40, mask_modules=RELEASED_MASK),
    # The published 3B config leaves out the vocabulary's last three tokens (spec section 7.1).
    "bee-3b": lambda: _bee(vocab_size=86580, dim_model=2560, dim_ff=3072, num_layers=32, dim_head=80),
    "bee-tiny": lambda: _bee(vocab_size=86583, dim_model=32, dim_ff=160, num_layers=3, num_heads=4, dim_head=16,
                             half=False),
}
