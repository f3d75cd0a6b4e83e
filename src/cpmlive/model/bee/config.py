"""CPM-Bee's config (named as OpenBMB's ``cpm-bee-10b.json``) and its presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import StackConfig, read_json_object, spread_mask
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

    def validate(self) -> None:
        super().validate()
        if self.dim_model % 2:
            raise CpmliveError(f"config: dim_model must be even (the ext-token rotation pairs halves), "
                               f"got {self.dim_model}")
        if self.position_bias_num_segment_buckets < MAX_SEGMENT_RELATION + 1:
            raise CpmliveError(f"config: position_bias_num_segment_buckets must be at least {MAX_SEGMENT_RELATION + 1}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BeeConfig":
        """Read our or OpenBMB's ``config.json`` (OpenBMB's has no ``model_type``)."""
        data = read_json_object(path)
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
