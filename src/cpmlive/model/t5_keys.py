"""HF's T5 key names (``T5ForConditionalGeneration``'s ``shared``, ``encoder.block.N.layer.M...``)
against the encoder-decoder stack's (``model/encoder_decoder.py``): the T5 family reads and writes
them, and so does the CPM-2 family for EVA's HF port, which stores its weights under T5's names."""

from __future__ import annotations

import re

from torch import Tensor

from cpmlive.errors import CpmliveError

HF_TOP = {"shared.weight": "input_embedding.weight", "encoder.final_layer_norm.weight": "encoder_norm.weight",
          "decoder.final_layer_norm.weight": "output_norm.weight", "lm_head.weight": "output_head.weight"}
HF_DROPPED = re.compile(r"(encoder|decoder)\.embed_tokens\.weight|"
                        r"decoder\.block\.\d+\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")
HF_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)")
ATTENTION = {"q.weight": "project_q.weight", "k.weight": "project_k.weight", "v.weight": "project_v.weight",
             "o.weight": "attention_out.weight"}
FFN = {"wi.weight": "w_in.weight", "wi_0.weight": "w_0.weight", "wi_1.weight": "w_1.weight",
       "wo.weight": "w_out.weight"}
# (stack, sub-layer index) -> (our sub-block prefix, its norm, HF's module name there)
SUBLAYERS = {("encoder", "0"): ("attn", "attn_norm", "SelfAttention"),
             ("encoder", "1"): ("ffn", "ffn_norm", "DenseReluDense"),
             ("decoder", "0"): ("attn", "attn_norm", "SelfAttention"),
             ("decoder", "1"): ("cross", "cross_norm", "EncDecAttention"),
             ("decoder", "2"): ("ffn", "ffn_norm", "DenseReluDense")}
OUR_STACKS = {"encoder": ("encoder_layers", "encoder_position_bias"), "decoder": ("layers", "decoder_position_bias")}


def _unknown_key(name: str, source: str) -> CpmliveError:
    return CpmliveError(f"{source}: unknown key {name!r} for a T5-layout checkpoint")


def _block_name(stack: str, block: str, sublayer: str, rest: str, source: str, original: str) -> str:
    layers, bias = OUR_STACKS[stack]
    if (stack, sublayer) not in SUBLAYERS:
        raise _unknown_key(original, source)
    ours, norm, module = SUBLAYERS[(stack, sublayer)]
    if rest == "layer_norm.weight":
        return f"{layers}.{block}.{norm}.weight"
    if rest == f"{module}.relative_attention_bias.weight" and sublayer == "0":
        return f"{bias}.{block}.weight"
    table = FFN if ours == "ffn" else ATTENTION
    prefix, _, leaf = rest.partition(".")
    if prefix != module or leaf not in table:
        raise _unknown_key(original, source)
    return f"{layers}.{block}.{ours}.{table[leaf]}"


def hf_to_ours(state: dict[str, Tensor], tied: bool, source: str) -> dict[str, Tensor]:
    """HF tensors in our names (``state`` is emptied as it is read; ``tied``: a stored
    ``lm_head.weight`` is the token table's copy, and dropped)."""
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if HF_DROPPED.fullmatch(name) or (name == "lm_head.weight" and tied):
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = tensor
            continue
        match = HF_BLOCK.fullmatch(name)
        if match is None:
            raise _unknown_key(name, source)
        out[_block_name(*match.groups(), source, name)] = tensor
    return out


def ours_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our tensors in HF's names (a tied head is stored once, as ``shared``)."""
    top = {ours: hf for hf, ours in HF_TOP.items()}
    reverse: dict[str, str] = {}
    for (stack, sublayer), (ours, norm, module) in SUBLAYERS.items():
        layers, bias = OUR_STACKS[stack]
        reverse[f"{layers}.{{}}.{norm}.weight"] = f"{stack}.block.{{}}.layer.{sublayer}.layer_norm.weight"
        if sublayer == "0":
            reverse[f"{bias}.{{}}.weight"] = f"{stack}.block.{{}}.layer.0.{module}.relative_attention_bias.weight"
        for hf_leaf, our_leaf in (FFN if ours == "ffn" else ATTENTION).items():
            reverse[f"{layers}.{{}}.{ours}.{our_leaf}"] = f"{stack}.block.{{}}.layer.{sublayer}.{module}.{hf_leaf}"
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        index = re.search(r"\.(\d+)\.", name).group(1)
        out[reverse[name.replace(f".{index}.", ".{}.", 1)].format(index)] = tensor
    return out



__all__ = ["hf_to_ours", "ours_to_hf"]
