"""Reading and writing CPM-Bee checkpoints in three layouts.

* ``ours``: a directory (``config.json`` with ``model_type`` ``"cpm-bee"``, safetensors,
  ``vocab.txt``), as for CPM-Ant; weights carry the 1/sqrt(fan-in) factors folded in.
* ``hf``: the layout of OpenBMB's releases on the Hub (``openbmb/cpm-bee-10b`` ...), read by
  their remote code (``modeling_cpmbee.CpmBeeForCausalLM``, ``trust_remote_code=True``):
  ``config.json`` with ``model_type`` ``"cpmbee"``, ``architectures`` and ``auto_map``, the
  OpenBMB state dict under the ``cpmbee.`` prefix of ``CpmBeeForCausalLM`` (read with or without
  it; the remote code ties ``lm_head`` to the embedding and never reads its own), ``vocab.txt``
  and a ``tokenizer_config.json`` naming ``CpmBeeTokenizer``. The remote code's Python files
  are OpenBMB's: download them from the release beside the converted weights.
* ``openbmb``: the original's flat, unit-scaled state dict (``encoder.*``, ``input_embedding``,
  ``position_bias.relative_attention_bias``) in a ``.pt``/``.bin``/``.safetensors`` file, with
  its config json beside it (``<name>.json`` or ``config.json``).

CPM-Bee's OpenBMB key names are CPM-Ant's for the shared parts, so the name and scale mapping is
:mod:`cpmlive.model.openbmb`'s and the file handling :mod:`cpmlive.model.formats`'.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.bee import FORMATS
from cpmlive.model.bee.config import HF_MODEL_TYPE, BeeConfig
from cpmlive.model.checkpoint import CONFIG_NAME, check_state_dict
from cpmlive.model.formats import (
    VOCAB_NAME,
    WEIGHT_SUFFIXES,
    CheckpointFormats,
    Source,
    from_openbmb,
    hf_source,
    json_object_or_none,
    openbmb_config_file,
    ours_source,
    read_raw,
    write_hf_directory,
    write_openbmb,
    write_ours,
)
from cpmlive.model.openbmb import ours_to_openbmb
from cpmlive.resources import model_path

BEE_ONLY_KEY = "position_bias_num_segment_buckets"  # in every CPM-Bee config, in no CPM-Ant one
HF_PREFIX = "cpmbee."  # CpmBeeForCausalLM's base model
HF_HEAD = "lm_head.weight"  # tied to the embedding by the remote code, never read by its forward
HF_TOKENIZER_CONFIG = {"tokenizer_class": "CpmBeeTokenizer",
                       "auto_map": {"AutoTokenizer": ["tokenization_cpmbee.CpmBeeTokenizer", None]}}


def is_bee_checkpoint(path: str | os.PathLike) -> bool:
    """A directory or weights file whose config says CPM-Bee (our ``model_type``, or the
    OpenBMB json's segment-bucket key)."""
    path = Path(path)
    if path.is_dir():
        config = json_object_or_none(path / CONFIG_NAME)
        if config is not None:
            model_type = config.get("model_type")
            return model_type in ("cpm-bee", HF_MODEL_TYPE) or (model_type is None and BEE_ONLY_KEY in config)
        weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        return len(weights) == 1 and is_bee_checkpoint(weights[0])
    config_file = openbmb_config_file(path) if path.is_file() else None
    config = json_object_or_none(config_file) if config_file is not None else None
    return config is not None and BEE_ONLY_KEY in config


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    if not path.exists():
        raise CpmliveError(f"{path}: no such file or directory")
    if path.is_dir():
        model_type = (json_object_or_none(path / CONFIG_NAME) or {}).get("model_type")
        if model_type == "cpm-bee":
            return ours_source(path, config_path)
        if model_type == HF_MODEL_TYPE:
            return hf_source(path, config_path)
        weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(weights) != 1:
            raise CpmliveError(f"{path}: expected one OpenBMB weights file, found {len(weights)}")
        path = weights[0]
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CpmliveError(f"{path}: unknown checkpoint format (expected a directory, .pt, .bin or .safetensors)")
    config = Path(config_path) if config_path is not None else openbmb_config_file(path)
    if config is None:
        raise CpmliveError(f"{path}: an OpenBMB CPM-Bee state dict needs its config json (--config)")
    return Source(path, "openbmb", path.parent, [path], config)


def _headers(source: Source) -> tuple[dict[str, Tensor], BeeConfig]:
    """The tensors as stored (mapped, not read) and the config."""
    return read_raw(source), BeeConfig.load(source.config)


def read_state(source: Source) -> tuple[dict[str, Tensor], BeeConfig]:
    """The checkpoint as (state dict in our layout, config), every key and shape checked."""
    config = BeeConfig.load(source.config)
    raw = read_raw(source)
    if source.format == "hf":
        raw = hf_to_openbmb(raw)
    state = raw if source.format == "ours" else from_openbmb(raw, config, str(source.path))
    check_state_dict(state, config, str(source.path))
    return state, config


def hf_to_openbmb(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The release's tensors under OpenBMB's names: the ``cpmbee.`` prefix off, ``lm_head`` dropped."""
    return {key.removeprefix(HF_PREFIX): value for key, value in state.items() if key != HF_HEAD}


def write_hf(state: dict[str, Tensor], config: BeeConfig, dst: Path, vocab: Path | None) -> None:
    """The release's layout (see the module docstring)."""
    files: dict[str, dict | Path] = {"tokenizer_config.json": HF_TOKENIZER_CONFIG}
    if vocab is not None:
        files[VOCAB_NAME] = vocab
    weights = {HF_PREFIX + key: value for key, value in ours_to_openbmb(state, config).items()}
    write_hf_directory(dst, config.to_hf(), weights, files)


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=_headers,
    writers={"ours": write_ours, "hf": write_hf, "openbmb": write_openbmb},
    refusal=f"a CPM-Bee checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "is_bee_checkpoint", "load_pretrained", "read_state",
           "resolve"]
