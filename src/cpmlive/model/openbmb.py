"""OpenBMB's state-dict layout, shared by CPM-Ant and CPM-Bee: its names, and the 1/sqrt(fan-in)
factors OpenBMB applies at run time that our layout folds into the stored weights (spec section 2)."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from cpmlive.errors import CpmliveError


OPENBMB_LAYER = {
    "self_att.layernorm_before_attention.weight": "attn_norm.weight",
    "self_att.self_attention.project_q.weight": "attn.project_q.weight",
    "self_att.self_attention.project_k.weight": "attn.project_k.weight",
    "self_att.self_attention.project_v.weight": "attn.project_v.weight",
    "self_att.self_attention.attention_out.weight": "attn.attention_out.weight",
    "ffn.layernorm_before_ffn.weight": "ffn_norm.weight",
    "ffn.ffn.w_in.w_0.weight": "ffn.w_0.weight",
    "ffn.ffn.w_in.w_1.weight": "ffn.w_1.weight",
    "ffn.ffn.w_out.weight": "ffn.w_out.weight",
}
OPENBMB_TOP = {
    "encoder.output_layernorm.weight": "output_norm.weight",
    "prompt_embedding.weight": "prompt_embedding.weight",
    "segment_embedding.weight": "segment_embedding.weight",
    "input_embedding.weight": "input_embedding.weight",
    "position_bias.relative_attention_bias": "position_bias.weight",
}


def fan_in_scale(ours: str, config: Any) -> float:
    """The factor OpenBMB applies at run time and we fold into the stored weight."""
    if ours.endswith(("embedding.weight", "project_q.weight", "project_k.weight", "project_v.weight",
                      "w_0.weight", "w_1.weight")):
        return 1.0 / math.sqrt(config.dim_model)
    if ours.endswith("attention_out.weight"):
        return 1.0 / math.sqrt(config.dim_attention)
    if ours.endswith("w_out.weight"):
        return 1.0 / math.sqrt(config.dim_ff)
    return 1.0


def _openbmb_name_to_ours(name: str) -> str | None:
    if name in OPENBMB_TOP:
        return OPENBMB_TOP[name]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in OPENBMB_LAYER:
        return f"layers.{match.group(1)}.{OPENBMB_LAYER[match.group(2)]}"
    return None


def _scaled(tensor: Tensor, factor: float) -> Tensor:
    if factor == 1.0:
        return tensor
    return (tensor.float() * factor).to(tensor.dtype)


def openbmb_to_ours(state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    out = {}
    for name, tensor in state.items():
        ours = _openbmb_name_to_ours(name)
        if ours is None:
            raise CpmliveError(f"not a CPM-Ant OpenBMB state dict: unknown key {name!r}")
        out[ours] = _scaled(tensor, fan_in_scale(ours, config))
    return out


def _ours_name_to_openbmb(name: str) -> str:
    reverse_top = {v: k for k, v in OPENBMB_TOP.items()}
    reverse_layer = {v: k for k, v in OPENBMB_LAYER.items()}
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in reverse_layer:
        return f"encoder.layers.{match.group(1)}.{reverse_layer[match.group(2)]}"
    if not match and name in reverse_top:
        return reverse_top[name]
    raise CpmliveError(f"not a CPM-Ant state dict in our layout: unknown key {name!r}")


def ours_to_openbmb(state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    return {_ours_name_to_openbmb(name): _scaled(tensor, 1.0 / fan_in_scale(name, config))
            for name, tensor in state.items()}


__all__ = ["OPENBMB_LAYER", "OPENBMB_TOP", "fan_in_scale", "openbmb_to_ours", "ours_to_openbmb"]
