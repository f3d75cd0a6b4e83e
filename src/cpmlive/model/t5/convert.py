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
from cpmlive.model.checkpoint import check_family, check_state_dict, save_checkpoint
from cpmlive.model.formats import (CheckpointFormats, Source, check_hf_tokenizer, hf_config, hf_family_source,
                                   is_hf_family_directory, read_raw, shapes_only, write_hf_directory)
from cpmlive.model.t5 import FORMATS
from cpmlive.model.t5_keys import hf_to_ours, ours_to_hf
from cpmlive.model.t5.config import ARCHITECTURES, T5Config
from cpmlive.resources import model_path

VOCAB_FILE = "tokenizer.json"

# ---- finding and reading ------------------------------------------------------------------------


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    return hf_family_source(model_path(path), config_path, T5Config.model_type, ARCHITECTURES, "T5")


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
    state = raw if source.format == "ours" else hf_to_ours(raw, config.tie_word_embeddings, where)
    check_state_dict(state, config, where)
    return state, config


# ---- writing -----------------------------------------------------------------------------------


def _write_hf(state: dict[str, Tensor], config: T5Config, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {VOCAB_FILE: vocab} if vocab is not None else {}
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state), files)


def _write_ours(state: dict[str, Tensor], config: T5Config, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def is_t5_checkpoint(path: str | os.PathLike) -> bool:
    """A directory whose ``config.json`` names T5, mT5 or UMT5."""
    return is_hf_family_directory(path, ARCHITECTURES)


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "hf": _write_hf},
    refusal=f"a T5 checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE,), check_vocab=check_hf_tokenizer,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "hf_to_ours", "is_t5_checkpoint",
           "load_pretrained", "ours_to_hf", "read_state", "resolve"]
