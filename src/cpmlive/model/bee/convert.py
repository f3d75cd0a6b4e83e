"""Reading and writing CPM-Bee checkpoints in two layouts.

* ``ours``: a directory (``config.json`` with ``model_type`` ``"cpm-bee"``, safetensors,
  ``vocab.txt``), as for CPM-Ant; weights carry the 1/sqrt(fan-in) factors folded in.
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
from cpmlive.model.bee.config import BeeConfig
from cpmlive.model.checkpoint import CONFIG_NAME, check_state_dict
from cpmlive.model.formats import (
    WEIGHT_SUFFIXES,
    CheckpointFormats,
    Source,
    from_openbmb,
    json_object_or_none,
    openbmb_config_file,
    ours_source,
    read_raw,
    write_openbmb,
    write_ours,
)
from cpmlive.resources import model_path

BEE_ONLY_KEY = "position_bias_num_segment_buckets"  # in every CPM-Bee config, in no CPM-Ant one


def is_bee_checkpoint(path: str | os.PathLike) -> bool:
    """A directory or weights file whose config says CPM-Bee (our ``model_type``, or the
    OpenBMB json's segment-bucket key)."""
    path = Path(path)
    if path.is_dir():
        config = json_object_or_none(path / CONFIG_NAME)
        if config is not None:
            model_type = config.get("model_type")
            return model_type == "cpm-bee" or (model_type is None and BEE_ONLY_KEY in config)
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
        if (json_object_or_none(path / CONFIG_NAME) or {}).get("model_type") == "cpm-bee":
            return ours_source(path, config_path)
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
    state = raw if source.format == "ours" else from_openbmb(raw, config, str(source.path))
    check_state_dict(state, config, str(source.path))
    return state, config


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=_headers, writers={"ours": write_ours, "openbmb": write_openbmb},
    refusal=f"a CPM-Bee checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "is_bee_checkpoint", "load_pretrained", "read_state",
           "resolve"]
