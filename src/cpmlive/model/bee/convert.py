"""Reading and writing CPM-Bee checkpoints in two layouts.

* ``ours``: a directory (``config.json`` with ``model_type`` ``"cpm-bee"``, safetensors,
  ``vocab.txt``), as for CPM-Ant; weights carry the 1/sqrt(fan-in) factors folded in.
* ``openbmb``: the original's flat, unit-scaled state dict (``encoder.*``, ``input_embedding``,
  ``position_bias.relative_attention_bias``) in a ``.pt``/``.bin``/``.safetensors`` file, with
  its config json beside it (``<name>.json`` or ``config.json``).

CPM-Bee's OpenBMB key names are CPM-Ant's for the shared parts, so the name and scale mapping is
``model.checkpoint``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from cpmlive.model.bee.config import BeeConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.bee.model import CpmBee
from cpmlive.model.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_layer_count,
    check_state_dict,
    expected_shapes,
    model_from_state_dict,
    read_weights,
)
from cpmlive.model.openbmb import openbmb_to_ours, ours_to_openbmb
from cpmlive.model.ant.convert import (
    TORCH_SUFFIXES,
    Source,
    check_destination,
    check_layout,
    dtype_name,
    find_vocab,
    openbmb_config_file,
    read_files,
    write_converted,
)
from cpmlive.resources import model_path
from cpmlive.utils import parse_dtype

FORMATS: tuple[str, ...] = ("ours", "openbmb")
BEE_ONLY_KEY = "position_bias_num_segment_buckets"  # in every CPM-Bee config, in no CPM-Ant one


def _config_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_bee_checkpoint(path: str | os.PathLike) -> bool:
    """A directory or weights file whose config says CPM-Bee (our ``model_type``, or the
    OpenBMB json's segment-bucket key)."""
    path = Path(path)
    if path.is_dir():
        config = _config_json(path / CONFIG_NAME)
        if config is not None:
            return config.get("model_type") == "cpm-bee" or (config.get("model_type") is None and BEE_ONLY_KEY in config)
        weights = [p for p in path.iterdir() if p.suffix in (*TORCH_SUFFIXES, ".safetensors")]
        return len(weights) == 1 and is_bee_checkpoint(weights[0])
    config_file = openbmb_config_file(path) if path.is_file() else None
    config = _config_json(config_file) if config_file is not None else None
    return config is not None and BEE_ONLY_KEY in config


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    if not path.exists():
        raise CpmliveError(f"{path}: no such file or directory")
    given = Path(config_path) if config_path is not None else None
    if path.is_dir():
        config = _config_json(path / CONFIG_NAME) or {}
        if config.get("model_type") == "cpm-bee":
            if not (path / WEIGHTS_NAME).is_file() and not (path / INDEX_NAME).is_file():
                raise CpmliveError(f"{path}: no {WEIGHTS_NAME} in the checkpoint")
            return Source(path, "ours", path, [path / WEIGHTS_NAME], given or path / CONFIG_NAME)
        weights = sorted(p for p in path.iterdir() if p.suffix in (*TORCH_SUFFIXES, ".safetensors"))
        if len(weights) != 1:
            raise CpmliveError(f"{path}: expected one OpenBMB weights file, found {len(weights)}")
        path = weights[0]
    if path.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CpmliveError(f"{path}: unknown checkpoint format (expected a directory, .pt, .bin or .safetensors)")
    config = given or openbmb_config_file(path)
    if config is None:
        raise CpmliveError(f"{path}: an OpenBMB CPM-Bee state dict needs its config json (--config)")
    return Source(path, "openbmb", path.parent, [path], config)


def read_state(source: Source) -> tuple[dict[str, Tensor], BeeConfig]:
    """The checkpoint as (state dict in our layout, config), every key and shape checked."""
    config = BeeConfig.load(source.config)
    where = str(source.path)
    if source.format == "ours":
        state = read_weights(source.directory)
    else:
        raw = read_files(source.weights)
        check_layer_count(raw, config, where)
        meta = {name: torch.empty(shape, device="meta") for name, shape in expected_shapes(config).items()}
        check_layout(raw, ours_to_openbmb(meta, config), where)
        state = openbmb_to_ours(raw, config)
    check_state_dict(state, config, where)
    return state, config


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    keep_matrices: bool = False) -> tuple[CpmBee, Path]:
    source = resolve(path)
    state, config = read_state(source)
    model = model_from_state_dict(config, state, dtype, device, source=str(source.path), keep_matrices=keep_matrices)
    return model, source.directory


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "ours",
            config_path: str | os.PathLike | None = None, vocab_path: str | os.PathLike | None = None,
            dtype: torch.dtype | str | None = None, force: bool = False, dequantize: bool = False) -> Path:
    """As ``model.convert.convert``, for CPM-Bee's two layouts."""
    if to not in FORMATS:
        raise CpmliveError(f"a CPM-Bee checkpoint converts to {' or '.join(FORMATS)}, not {to!r}")
    source = resolve(src, config_path)
    vocab = find_vocab(source, vocab_path)
    dst = Path(dst)
    check_destination(dst, to, vocab, force)
    state, config = read_state(source)
    write_converted(state, config, dst, to, vocab, parse_dtype(dtype), dequantize)
    return dst


def checkpoint_info(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> dict:
    source = resolve(path, config_path)
    config = BeeConfig.load(source.config)
    raw = read_weights(source.directory) if source.format == "ours" else read_files(source.weights)
    check_layer_count(raw, config, str(source.path))
    with torch.device("meta"):
        parameters = CpmBee(config).num_parameters()
    files = source.files
    return {
        "path": str(source.path),
        "format": source.format,
        "model_type": "cpm-bee",
        **({"quantization": config.quantization.scheme} if config.quantization is not None else {}),
        "config": config.to_dict(),
        "parameters": parameters,
        "tensors": len(raw),
        "dtypes": sorted({dtype_name(t.dtype) for t in raw.values()}),
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
    }


__all__ = ["FORMATS", "checkpoint_info", "convert", "is_bee_checkpoint", "load_pretrained", "read_state", "resolve"]
