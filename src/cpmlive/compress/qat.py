"""Quantization-aware fine-tuning: train through the rounding the next quantize step will apply.

Each linear layer of the blocks computes with its weight rounded to the target grid (and, for
W8A8, its input rounded per token), while the gradient passes the rounding as if it were the
identity (the straight-through estimator): ``w_q = w + (round(w) - w).detach()``. The float
weights learn to sit where rounding costs least; the quantize step that follows rounds them
with the same round-to-nearest grid, so the model it writes computes what training saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.config import QuantConfig
from cpmlive.model.stack import Transformer
from cpmlive.compress.quantize import fake_quantized
from cpmlive.model.runtime.quant import INT8_MAX, MIN_SCALE
from cpmlive.utils import replace_submodule


def straight_through(value: Tensor, rounded_value: Tensor) -> Tensor:
    """``rounded_value`` forward, the identity backward."""
    return value + (rounded_value - value).detach()


def per_token_rounded(x: Tensor) -> Tensor:
    """``x`` rounded to int8 per row (absolute maximum / 127), in floats (no gradient)."""
    with torch.no_grad():
        scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=MIN_SCALE)
        return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX) * scale


class FakeQuantLinear(nn.Linear):
    """A bias-free linear layer that computes with its weight (and input) rounded, straight-through."""

    def __init__(self, base: nn.Linear, config: QuantConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        weight = straight_through(self.weight, fake_quantized(self.weight, self.config))
        if self.config.activations == "int8":
            x = straight_through(x, per_token_rounded(x))
        return F.linear(x, weight)

    def plain(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight = self.weight
        return layer


def block_linear_paths(model: Transformer) -> list[str]:
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and module.bias is None and ".layers." in f".{name}"]


def attach_fake_quant(model: Transformer, config: QuantConfig) -> Transformer:
    for path in block_linear_paths(model):
        replace_submodule(model, path, FakeQuantLinear(model.get_submodule(path), config))
    return model


def detach_fake_quant(model: Transformer) -> Transformer:
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            replace_submodule(model, name, module.plain())
    return model


__all__ = ["FakeQuantLinear", "attach_fake_quant", "detach_fake_quant", "per_token_rounded", "straight_through"]
