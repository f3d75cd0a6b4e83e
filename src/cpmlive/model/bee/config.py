"""CPM-Bee's config (named as OpenBMB's ``cpm-bee-10b.json``) and its presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import QuantConfig, StackConfig, read_json_config, spread_mask
from cpmlive.errors import CpmliveError


@dataclass
class BeeConfig(StackConfig):
    """Every CPM-Bee hyper-parameter, named as in OpenBMB's ``cpm-bee-10b.json``.

    ``mask_modules`` as for CPM-Ant: the compressed CPM-Bee 5B/2B/1B keep 24 layers and drop
    attention from some of them.
    """

    vocab_size: int = 86583
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    half: bool = True
    mask_modules: list[list[bool]] | None = None
    max_length: int = 2048
    model_type: str = "cpm-bee"
    quantization: QuantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig.from_dict(self.quantization)
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head",
                    "position_bias_num_buckets", "position_bias_num_segment_buckets",
                    "position_bias_max_distance", "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CpmliveError(f"config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise CpmliveError(f"config: eps must be a number > 0, got {self.eps!r}")
        if not isinstance(self.dropout_p, (int, float)) or not 0 <= self.dropout_p < 1:
            raise CpmliveError(f"config: dropout_p must be in [0, 1), got {self.dropout_p!r}")
        if not isinstance(self.half, bool):
            raise CpmliveError(f"config: half must be true or false, got {self.half!r}")
        if self.dim_model % 2:
            raise CpmliveError(f"config: dim_model must be even (the ext-token rotation pairs halves), got {self.dim_model}")
        if self.position_bias_num_segment_buckets < MAX_SEGMENT_RELATION + 1:
            raise CpmliveError(f"config: position_bias_num_segment_buckets must be at least {MAX_SEGMENT_RELATION + 1}")
        if self.mask_modules is not None and (len(self.mask_modules) != self.num_layers
                                              or any(len(pair) != 2 for pair in self.mask_modules)):
            raise CpmliveError(f"config: mask_modules needs one [attention_removed, ffn_removed] pair per layer "
                               f"({self.num_layers})")
        if self.model_type != "cpm-bee":
            raise CpmliveError(f"config: model_type {self.model_type!r} is not a CPM-Bee config")
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise CpmliveError("config: quantization must be an object")

    @property
    def moe(self) -> None:
        """CPM-Bee blocks are dense (``moefy`` is CPM-Ant's)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BeeConfig":
        """Read our or OpenBMB's ``config.json`` (OpenBMB's has no ``model_type``)."""
        data = read_json_config(path)
        if data.get("model_type", "cpm-bee") != "cpm-bee":
            raise CpmliveError(f"{path}: model_type {data['model_type']!r} is not a CPM-Bee config")
        return cls.from_dict(data, strict="model_type" in data)


# The deepest segment relation: (7 up, 7 down) is bucket 7 * 8 + 7 + 1 (spec section 7.4).
MAX_SEGMENT_RELATION = 64


def _bee(**overrides: Any) -> BeeConfig:
    return BeeConfig(**overrides)


# The compressed CPM-Bee sizes (CPM-Bee README): 24 layers, 19 with attention; attention width
# and dim_ff shrink, dim_model stays. The exact layers come with a checkpoint's own config.
PRESETS: dict[str, Any] = {
    "bee-10b": lambda: _bee(),
    "bee-5b": lambda: _bee(num_layers=24, mask_modules=spread_mask(24, 19, 24)),
    "bee-2b": lambda: _bee(num_layers=24, num_heads=16, dim_ff=5120, mask_modules=spread_mask(24, 19, 24)),
    "bee-1b": lambda: _bee(num_layers=24, num_heads=10, dim_ff=1024, mask_modules=spread_mask(24, 19, 24)),
    # The published 3B config leaves out the vocabulary's last three tokens (spec section 7.1).
    "bee-3b": lambda: _bee(vocab_size=86580, dim_model=2560, dim_ff=3072, num_layers=32, dim_head=80),
    "bee-tiny": lambda: _bee(vocab_size=86583, dim_model=32, dim_ff=160, num_layers=3, num_heads=4, dim_head=16,
                             half=False),
}
