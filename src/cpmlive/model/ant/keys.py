"""CPM-Ant's published layouts beyond ours: the config an OpenBMB ``.pt`` implies by its shapes,
and HF ``CpmAntForCausalLM``'s names."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.openbmb import OPENBMB_LAYER


def config_from_openbmb_state(state: dict[str, Tensor], prompt_length: int = 32) -> AntConfig:
    """Read the shapes back into a config (an OpenBMB ``.pt`` carries no config)."""
    try:
        vocab_size, dim_model = state["input_embedding.weight"].shape
        segment_types = state["segment_embedding.weight"].shape[0]
        bias_rows, num_heads = state["position_bias.relative_attention_bias"].shape
        prompt_rows = state["prompt_embedding.weight"].shape[0]
    except KeyError as exc:
        raise CpmliveError(f"not a CPM-Ant OpenBMB state dict: no {exc.args[0]!r}") from None
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    dim_attention, dim_ff = None, None
    mask = []
    for i in range(num_layers):
        q = state.get(f"encoder.layers.{i}.self_att.self_attention.project_q.weight")
        w0 = state.get(f"encoder.layers.{i}.ffn.ffn.w_in.w_0.weight")
        if q is not None:
            dim_attention = q.shape[0]
        if w0 is not None:
            dim_ff = w0.shape[0]
        mask.append([q is None, w0 is None])
    if dim_attention is None or dim_ff is None:
        raise CpmliveError("cannot infer the config: no layer has both attention and FFN weights")
    return AntConfig(vocab_size=vocab_size, dim_model=dim_model, dim_ff=dim_ff, num_layers=num_layers,
                     num_heads=num_heads, dim_head=dim_attention // num_heads,
                     position_bias_num_buckets=bias_rows - segment_types**2, half=False,
                     prompt_types=prompt_rows // prompt_length, prompt_length=prompt_length,
                     segment_types=segment_types,
                     mask_modules=mask if any(a or f for a, f in mask) else None)


# ---- HF <-> ours -----------------------------------------------------------------------------


def hf_to_ours(state: dict[str, Tensor], config: AntConfig) -> tuple[dict[str, Tensor], AntConfig]:
    """Map an HF ``CpmAntForCausalLM``/``CpmAntModel`` state dict; zeroed output projections
    (how removed sub-blocks are written to HF) become removed sub-blocks again."""
    state = {k.removeprefix("cpmant."): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    try:
        table = state.pop("input_embedding.weight")
        out = {"input_embedding.weight": table[: config.vocab_size],
               "prompt_embedding.weight": table[config.vocab_size:],
               "segment_embedding.weight": state.pop("segment_embedding.weight"),
               "position_bias.weight": state.pop("position_bias.relative_attention_bias"),
               "output_norm.weight": state.pop("encoder.output_layernorm.weight")}
    except KeyError as exc:
        raise CpmliveError(f"not a CpmAnt HF state dict: no 'cpmant.{exc.args[0]}'") from None
    if head is not None and not torch.equal(head[: config.vocab_size], out["input_embedding.weight"]):
        raise CpmliveError("lm_head.weight differs from the input embedding: CPM-Ant ties them, "
                           "this checkpoint is not a CPM-Ant")
    for name, tensor in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
        if not match or match.group(2) not in OPENBMB_LAYER:
            raise CpmliveError(f"not a CpmAnt HF state dict: unknown key {name!r}")
        out[f"layers.{match.group(1)}.{OPENBMB_LAYER[match.group(2)]}"] = tensor
    mask = []
    for i in range(config.num_layers):
        attn_out = out.get(f"layers.{i}.attn.attention_out.weight")
        ffn_out = out.get(f"layers.{i}.ffn.w_out.weight")
        if attn_out is None or ffn_out is None:
            missing = "self_att.self_attention.attention_out" if attn_out is None else "ffn.ffn.w_out"
            raise CpmliveError(f"not a CpmAnt HF state dict: no 'cpmant.encoder.layers.{i}.{missing}.weight'")
        mask.append([not attn_out.any().item(), not ffn_out.any().item()])
    if config.mask_modules is not None:
        mask = [[a or ca, f or cf] for (a, f), (ca, cf) in zip(mask, config.mask_modules)]
    if any(a or f for a, f in mask):
        for i, (no_attn, no_ffn) in enumerate(mask):
            prefixes = (["attn_norm.", "attn."] if no_attn else []) + (["ffn_norm.", "ffn."] if no_ffn else [])
            for key in [k for k in out if any(k.startswith(f"layers.{i}.{p}") for p in prefixes)]:
                del out[key]
        config = AntConfig.from_dict({**config.to_dict(), "mask_modules": mask})
    return out, config


def ours_to_hf(state: dict[str, Tensor], config: AntConfig) -> dict[str, Tensor]:
    """HF has every sub-block: a removed one is written with a zero output projection."""
    out = {
        "cpmant.input_embedding.weight": torch.cat([state["input_embedding.weight"],
                                                    state["prompt_embedding.weight"]]),
        "cpmant.segment_embedding.weight": state["segment_embedding.weight"],
        "cpmant.position_bias.relative_attention_bias": state["position_bias.weight"],
        "cpmant.encoder.output_layernorm.weight": state["output_norm.weight"],
        "lm_head.weight": state["input_embedding.weight"].clone(),
    }
    reverse = {v: k for k, v in OPENBMB_LAYER.items()}
    like = state["input_embedding.weight"]
    d, a, ff = config.dim_model, config.dim_attention, config.dim_ff
    filler = {"attn_norm.weight": (d,), "attn.project_q.weight": (a, d), "attn.project_k.weight": (a, d),
              "attn.project_v.weight": (a, d), "attn.attention_out.weight": (d, a), "ffn_norm.weight": (d,),
              "ffn.w_0.weight": (ff, d), "ffn.w_1.weight": (ff, d), "ffn.w_out.weight": (d, ff)}
    for i in range(config.num_layers):
        for local, shape in filler.items():
            tensor = state.get(f"layers.{i}.{local}")
            if tensor is None:
                tensor = like.new_ones(shape) if local.endswith("norm.weight") else like.new_zeros(shape)
            out[f"cpmant.encoder.layers.{i}.{reverse[local]}"] = tensor
    return out


__all__ = ["config_from_openbmb_state", "hf_to_ours", "ours_to_hf"]
