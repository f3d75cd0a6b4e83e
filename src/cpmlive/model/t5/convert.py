"""Reading and writing the T5 family's checkpoints.

* ``ours``: a directory with ``config.json`` (``model_type`` ``"t5"`` and our keys), safetensors in
  our names and ``tokenizer.json``.
* ``hf``: an HF directory of ``T5ForConditionalGeneration`` (v1.0, v1.1, FLAN-T5), ``MT5…`` or
  ``UMT5…`` as published (safetensors or ``pytorch_model.bin``), with its tokenizer files. The
  head is untied exactly when the weights store ``lm_head.weight`` (transformers 5 ties every
  config in memory and keeps a stored head apart); ``encoder.embed_tokens`` / ``decoder.embed_tokens``
  (the same table as ``shared``) and the decoder's unused cross-attention bias table of old dirs
  are read and dropped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import CONFIG_NAME, check_family, check_state_dict, save_checkpoint
from cpmlive.model.formats import (CheckpointFormats, Source, hf_config, hf_source, json_object_or_none, ours_source,
                                   read_raw, shapes_only, write_hf_directory)
from cpmlive.model.t5 import FORMATS
from cpmlive.model.t5.config import ARCHITECTURES, T5Config
from cpmlive.resources import model_path

VOCAB_FILE = "tokenizer.json"
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
    return CpmliveError(f"{source}: unknown key {name!r} for a T5 checkpoint")


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


def hf_to_ours(state: dict[str, Tensor], config: T5Config, source: str) -> dict[str, Tensor]:
    """HF tensors in our names (``state`` is emptied as it is read)."""
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if HF_DROPPED.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = tensor
            continue
        match = HF_BLOCK.fullmatch(name)
        if match is None:
            raise _unknown_key(name, source)
        out[_block_name(*match.groups(), source, name)] = tensor
    return out


def ours_to_hf(state: dict[str, Tensor], config: T5Config) -> dict[str, Tensor]:
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


# ---- finding and reading ------------------------------------------------------------------------


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    if not path.is_dir():
        raise CpmliveError(f"{path}: a T5 checkpoint is a directory (ours or HF's)")
    config = json_object_or_none(path / CONFIG_NAME) or {}
    model_type = config.get("model_type")
    if model_type == T5Config.model_type and "architecture" in config:
        return ours_source(path, config_path)
    if model_type in ARCHITECTURES:
        return hf_source(path, config_path)
    raise CpmliveError(f"{path}: model_type {model_type!r} is not a T5 checkpoint's "
                       f"(supported: {', '.join(ARCHITECTURES)})")


def read_state(source: Source, shapes: bool = False) -> tuple[dict[str, Tensor], T5Config]:
    """(state dict in our layout, config), every key and shape checked; ``shapes``: meta tensors
    converted from the files' headers without reading a weight."""
    where = str(source.path)
    raw = read_raw(source)
    raw = shapes_only(raw) if shapes else raw
    config = T5Config.load(source.config, untied="lm_head.weight" in raw if source.format == "hf" else None)
    check_family(raw, config, where)
    pattern = re.compile(r"(?:encoder_layers|encoder\.block)\.(\d+)\.")
    encoder_blocks = {int(m.group(1)) for name in raw if (m := pattern.match(name))}
    if len(encoder_blocks) > config.num_encoder_layers:
        raise CpmliveError(f"{where}: the config has {config.num_encoder_layers} encoder layers, "
                           f"the weights {len(encoder_blocks)}")
    state = raw if source.format == "ours" else hf_to_ours(raw, config, where)
    check_state_dict(state, config, where)
    return state, config


# ---- writing -----------------------------------------------------------------------------------


def _write_hf(state: dict[str, Tensor], config: T5Config, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {VOCAB_FILE: vocab} if vocab is not None else {}
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state, config), files)


def _write_ours(state: dict[str, Tensor], config: T5Config, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def check_vocab(vocab: Path, config: T5Config, source: str) -> None:
    """A ``tokenizer.json`` with no more tokens than the embedding has rows."""
    from cpmlive.tokenizer.hf import HFTokenizer

    HFTokenizer.for_model(vocab, config.vocab_size)


def is_t5_checkpoint(path: str | os.PathLike) -> bool:
    """A directory whose ``config.json`` names T5, mT5 or UMT5."""
    path = Path(path)
    config = json_object_or_none(path / CONFIG_NAME) if path.is_dir() else None
    return config is not None and config.get("model_type") in ARCHITECTURES


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "hf": _write_hf},
    refusal=f"a T5 checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE,), check_vocab=check_vocab,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "hf_to_ours", "is_t5_checkpoint",
           "load_pretrained", "ours_to_hf", "read_state", "resolve"]
