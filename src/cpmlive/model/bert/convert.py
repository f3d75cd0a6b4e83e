"""Reading and writing the BERT family's checkpoints.

* ``ours``: a directory with ``config.json`` (``model_type`` ``"bert"`` and our keys), safetensors
  in our names and ``tokenizer.json``.
* ``hf``: an HF directory of ``BertModel``, ``BertForMaskedLM``, ``BertForSequenceClassification``
  or their RoBERTa counterparts (the Chinese wwm releases are BERT's layout), with or without the
  ``bert.`` / ``roberta.`` prefix, old ``LayerNorm.gamma``/``beta`` names too. The heads are the
  ones the weights hold; the tied decoder matrix and NSP's head are dropped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.bert import FORMATS
from cpmlive.model.bert.config import ARCHITECTURES, BertConfig
from cpmlive.model.checkpoint import check_family, check_state_dict, save_checkpoint
from cpmlive.model.formats import (CheckpointFormats, Source, check_hf_tokenizer, hf_config, hf_family_source,
                                   is_hf_family_directory, read_raw, shapes_only, write_hf_directory)
from cpmlive.resources import model_path

VOCAB_FILE = "tokenizer.json"
EMBEDDINGS = {"embeddings.word_embeddings.weight": "input_embedding.weight",
              "embeddings.position_embeddings.weight": "position_table.weight",
              "embeddings.token_type_embeddings.weight": "token_type_embedding.weight",
              "embeddings.LayerNorm.weight": "embedding_norm.weight",
              "embeddings.LayerNorm.bias": "embedding_norm.bias",
              "pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.bias"}
BLOCK = {"attention.self.query.weight": "attn.project_q.weight", "attention.self.query.bias": "attn.bias_q",
         "attention.self.key.weight": "attn.project_k.weight", "attention.self.key.bias": "attn.bias_k",
         "attention.self.value.weight": "attn.project_v.weight", "attention.self.value.bias": "attn.bias_v",
         "attention.output.dense.weight": "attn.attention_out.weight", "attention.output.dense.bias": "attn.bias_out",
         "attention.output.LayerNorm.weight": "attn_norm.weight", "attention.output.LayerNorm.bias": "attn_norm.bias",
         "intermediate.dense.weight": "ffn.w_in.weight", "intermediate.dense.bias": "ffn.bias_in",
         "output.dense.weight": "ffn.w_out.weight", "output.dense.bias": "ffn.bias_out",
         "output.LayerNorm.weight": "ffn_norm.weight", "output.LayerNorm.bias": "ffn_norm.bias"}
# Each architecture's head names.
HEADS = {
    "bert": {"cls.predictions.transform.dense.weight": "mlm_transform.dense.weight",
             "cls.predictions.transform.dense.bias": "mlm_transform.bias",
             "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
             "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias", "cls.predictions.bias": "mlm_bias",
             "classifier.weight": "classifier.dense.weight", "classifier.bias": "classifier.bias"},
    "roberta": {"lm_head.dense.weight": "mlm_transform.dense.weight", "lm_head.dense.bias": "mlm_transform.bias",
                "lm_head.layer_norm.weight": "mlm_norm.weight", "lm_head.layer_norm.bias": "mlm_norm.bias",
                "lm_head.bias": "mlm_bias", "classifier.dense.weight": "classifier_dense.dense.weight",
                "classifier.dense.bias": "classifier_dense.bias",
                "classifier.out_proj.weight": "classifier.dense.weight",
                "classifier.out_proj.bias": "classifier.bias"},
}
DROPPED = re.compile(r"(?:bert\.|roberta\.)?embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)|"
                     r"cls\.seq_relationship\.(weight|bias)|lm_head\.decoder\.(weight|bias)")
LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def _plain(name: str) -> str:
    """HF's name without the task model's prefix, old LayerNorm names in today's spelling."""
    name = re.sub(r"^(bert|roberta)\.", "", name)
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def heads_of(names: list[str]) -> list[str]:
    """The heads HF weights hold (``mlm``, ``pooler``, ``classifier``)."""
    plain = {_plain(name) for name in names}
    heads = []
    if plain & {"cls.predictions.bias", "lm_head.bias"}:
        heads.append("mlm")
    if "pooler.dense.weight" in plain:
        heads.append("pooler")
    if plain & {"classifier.weight", "classifier.out_proj.weight"}:
        heads.append("classifier")
    return heads


def hf_to_ours(state: dict[str, Tensor], config: BertConfig, source: str) -> dict[str, Tensor]:
    """HF tensors in our names (``state`` is emptied as it is read)."""
    heads = HEADS[config.architecture]
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if DROPPED.fullmatch(name):
            continue
        plain = _plain(name)
        if plain in EMBEDDINGS:
            out[EMBEDDINGS[plain]] = tensor
        elif plain in heads:
            out[heads[plain]] = tensor
        elif (match := LAYER.fullmatch(plain)) and match.group(2) in BLOCK:
            out[f"layers.{match.group(1)}.{BLOCK[match.group(2)]}"] = tensor
        else:
            raise CpmliveError(f"{source}: unknown key {name!r} for a BERT checkpoint")
    return out


def ours_to_hf(state: dict[str, Tensor], config: BertConfig) -> dict[str, Tensor]:
    """Our tensors in the names of HF's task model for the config's heads (``bert.`` prefixed; the
    MLM decoder, which is the token table, is not stored twice)."""
    prefix = f"{config.architecture}."
    reverse = {ours: prefix + theirs for theirs, ours in EMBEDDINGS.items()}
    reverse |= {ours: theirs for theirs, ours in HEADS[config.architecture].items()}
    block = {ours: theirs for theirs, ours in BLOCK.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        out[f"{prefix}encoder.layer.{match.group(1)}.{block[match.group(2)]}" if match else reverse[name]] = tensor
    return out  # the MLM decoder is the token table and the head's bias: HF ties them on reading


# ---- finding and reading ------------------------------------------------------------------------


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    return hf_family_source(model_path(path), config_path, BertConfig.model_type, ARCHITECTURES, "BERT")


def read_state(source: Source, shapes: bool = False) -> tuple[dict[str, Tensor], BertConfig]:
    where = str(source.path)
    raw = read_raw(source)
    raw = shapes_only(raw) if shapes else raw
    config = BertConfig.load(source.config, heads_of(list(raw)) if source.format == "hf" else None)
    check_family(raw, config, where)
    state = raw if source.format == "ours" else hf_to_ours(raw, config, where)
    check_state_dict(state, config, where)
    return state, config


def is_bert_checkpoint(path: str | os.PathLike) -> bool:
    """A directory whose ``config.json`` names BERT or RoBERTa."""
    return is_hf_family_directory(path, ARCHITECTURES)


# ---- writing -----------------------------------------------------------------------------------


def _write_hf(state: dict[str, Tensor], config: BertConfig, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {VOCAB_FILE: vocab} if vocab is not None else {}
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state, config), files)


def _write_ours(state: dict[str, Tensor], config: BertConfig, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "hf": _write_hf},
    refusal=f"a BERT checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE,), check_vocab=check_hf_tokenizer,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "heads_of", "hf_to_ours", "is_bert_checkpoint",
           "load_pretrained", "ours_to_hf", "read_state", "resolve"]
