"""Reading and writing CPM-Ant checkpoints in any of the three layouts (spec section 2).

* ``ours``: a directory written by :func:`cpmlive.model.checkpoint.save_checkpoint`
  (``config.json`` with ``model_type`` ``"cpm-ant"``, ``model.safetensors`` or shards).
* ``hf``: a directory that ``transformers.CpmAntForCausalLM.from_pretrained`` reads
  (``config.json`` with ``model_type`` ``"cpmant"``; safetensors or ``pytorch_model.bin``).
* ``openbmb``: a flat, unit-scaled state dict with OpenBMB key names, in a ``.pt``/``.bin``
  file (``torch.save``) or a ``.safetensors`` file; its config is a json given by the user,
  ``<name>.json`` or ``config.json`` beside it, or else read back from the tensor shapes.

Everything is converted through our layout; the machinery every family shares is
:mod:`cpmlive.model.formats`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Literal

from torch import Tensor

from cpmlive.config import QuantConfig, read_json_object
from cpmlive.errors import CpmliveError
from cpmlive.model.ant import FORMATS
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.ant.keys import config_from_openbmb_state, hf_to_ours, ours_to_hf
from cpmlive.model.checkpoint import (
    CONFIG_NAME, INDEX_NAME, VOCAB_NAME, WEIGHTS_NAME, check_state_dict, read_safetensors,
)
from cpmlive.model.formats import (
    GENERATION_CONFIG_NAME,
    TOKENIZER_CONFIG_NAME,
    TORCH_SUFFIXES,
    CheckpointFormats,
    Source,
    check_layout,
    expected_state,
    from_openbmb,
    hf_config,
    hf_source,
    json_object_or_none,
    openbmb_config_file,
    ours_source,
    read_raw,
    torch_files,
    write_hf_directory,
    write_openbmb,
    write_ours,
)
from cpmlive.resources import model_path

Format = Literal["ours", "hf", "openbmb"]
# Where the special tokens sit in every published CPM-Ant vocabulary (used without a vocab file).
STANDARD_SPECIAL_IDS = {"<pad>": 0, "<s>": 6, "</s>": 7}
# What ``cpmlive generate`` and ``LM.generate`` do by default, written for HF's ``generate``.
DEFAULT_NEW_TOKENS = 64


# ---- telling the formats apart ---------------------------------------------------------------


def _safetensors_keys(directory: Path) -> set[str]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index, "shard index").get("weight_map")
        return set(weight_map) if isinstance(weight_map, dict) else set()
    if (directory / WEIGHTS_NAME).is_file():
        return set(read_safetensors(directory / WEIGHTS_NAME))
    return set()


def _format_of_keys(keys: set[str]) -> Format | None:
    if "prompt_embedding.weight" in keys and "encoder.output_layernorm.weight" in keys:
        return "openbmb"
    if "output_norm.weight" in keys:
        return "ours"
    if any(k.startswith("cpmant.") for k in keys):
        return "hf"
    return None


def _directory_format(directory: Path) -> Format:
    config_file = directory / CONFIG_NAME
    model_type = read_json_object(config_file).get("model_type") if config_file.is_file() else None
    if model_type == "cpmant":
        return "hf"
    if model_type == "cpm-ant":
        return "ours"
    if model_type is not None:
        raise CpmliveError(f"{config_file}: model_type {model_type!r} is not a CPM-Ant checkpoint")
    found = _format_of_keys(_safetensors_keys(directory))
    if found == "ours" or found == "openbmb":
        return found
    if found is None and len(torch_files(directory)) == 1:
        return "openbmb"
    raise CpmliveError(f"{directory}: unknown checkpoint format (no CPM-Ant config.json or weights found)")


def detect_format(path: str | os.PathLike) -> Format:
    """``"ours"``, ``"hf"`` or ``"openbmb"`` for a checkpoint directory or weights file."""
    path = Path(path)
    if not path.exists():
        raise CpmliveError(f"{path}: no such file or directory")
    if path.is_dir():
        return _directory_format(path)
    if path.suffix in TORCH_SUFFIXES:
        return "openbmb"
    if path.suffix == ".safetensors":
        if _format_of_keys(set(read_safetensors(path))) == "openbmb":
            return "openbmb"
        raise CpmliveError(f"{path}: not an OpenBMB CPM-Ant state dict (give the checkpoint's directory)")
    raise CpmliveError(f"{path}: unknown checkpoint format (expected a directory, .pt, .bin or .safetensors)")


def _openbmb_file(directory: Path) -> Path:
    if (directory / WEIGHTS_NAME).is_file():
        return directory / WEIGHTS_NAME
    candidates = torch_files(directory)
    if len(candidates) != 1:
        raise CpmliveError(f"{directory}: expected one .pt/.bin weights file, found {len(candidates)}")
    return candidates[0]


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    """Find the weight files and config of a checkpoint in any format (``"demo"``: the shipped one)."""
    path = model_path(path)
    fmt = detect_format(path)
    if fmt == "openbmb":
        weights = path if path.is_file() else _openbmb_file(path)
        given = Path(config_path) if config_path is not None else None
        return Source(path, fmt, weights.parent, [weights], given or openbmb_config_file(weights))
    return hf_source(path, config_path) if fmt == "hf" else ours_source(path, config_path)


# ---- reading -----------------------------------------------------------------------------------


def _config_with_state_mask(config: AntConfig, state: dict[str, Tensor]) -> AntConfig:
    """A config json without ``mask_modules`` (e.g. the 10B one) next to a compressed state."""
    if config.mask_modules is not None:
        return config
    mask = []
    for i in range(config.num_layers):
        prefix = f"encoder.layers.{i}."
        mask.append([not any(k.startswith(prefix + "self_att.") for k in state),
                     not any(k.startswith(prefix + "ffn.") for k in state)])
    if not any(a or f for a, f in mask):
        return config
    return dataclasses.replace(config, mask_modules=mask)


def _config(source: Source, state: dict[str, Tensor]) -> AntConfig:
    """The config of ``source`` (an OpenBMB file's may be read back from its tensors ``state``)."""
    if source.format != "openbmb":
        return AntConfig.load(source.config)
    if source.config is None:
        return config_from_openbmb_state(state)
    return _config_with_state_mask(AntConfig.load(source.config), state)


def _hf_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare ``CpmAntModel`` state dict has no ``cpmant.`` prefix; a v4 head covers the prompts."""
    return {k if k.startswith("cpmant.") or k == "lm_head.weight" else f"cpmant.{k}": v for k, v in state.items()}


def _from_hf(source: Source, state: dict[str, Tensor], config: AntConfig) -> tuple[dict[str, Tensor], AntConfig]:
    state = _hf_names(state)
    head = state.get("lm_head.weight")
    if head is not None and head.size(0) > config.vocab_size:
        state["lm_head.weight"] = head[: config.vocab_size]
    where = str(source.directory)
    check_layout(state, ours_to_hf(expected_state(config, state, where), config), where,
                 optional=("lm_head.weight",))
    try:
        return hf_to_ours(state, config)
    except CpmliveError as exc:
        raise CpmliveError(f"{source.directory}: {exc}") from None


def _from_ours(source: Source, state: dict[str, Tensor], config: AntConfig) -> tuple[dict[str, Tensor], AntConfig]:
    check_layout(state, expected_state(config, state, str(source.directory)), str(source.directory))
    return state, config


def _from_openbmb(source: Source, state: dict[str, Tensor],
                  config: AntConfig) -> tuple[dict[str, Tensor], AntConfig]:
    return from_openbmb(state, config, str(source.weights[0])), config


LOADERS: dict[str, Callable[[Source, dict[str, Tensor], AntConfig], tuple[dict[str, Tensor], AntConfig]]] = {
    "ours": _from_ours, "hf": _from_hf, "openbmb": _from_openbmb,
}


def _headers(source: Source) -> tuple[dict[str, Tensor], AntConfig]:
    """The tensors as stored (mapped, not read) and the config."""
    raw = read_raw(source)
    return raw, _config(source, raw)


def _read(source: Source) -> tuple[dict[str, Tensor], AntConfig]:
    raw, config = _headers(source)
    state, config = LOADERS[source.format](source, raw, config)
    check_state_dict(state, config, str(source.path))
    return state, config


def load_any(path: str | os.PathLike,
             config_path: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], AntConfig]:
    """A checkpoint in any format as ``(state dict in our layout, config)``."""
    return _read(resolve(path, config_path))


# ---- writing -------------------------------------------------------------------------------------


def special_ids(vocab: Path | None) -> dict[str, int]:
    """The ids of ``<pad>``, ``<s>`` and ``</s>`` in ``vocab`` (one token a line), those it has."""
    if vocab is None:
        return dict(STANDARD_SPECIAL_IDS)
    ids = {line.rstrip("\n"): i for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines(True))}
    return {token: ids[token] for token in STANDARD_SPECIAL_IDS if token in ids}


def hf_generation_config(config: AntConfig, vocab: Path | None) -> dict:
    """HF ``generate``'s defaults made ours: greedy, stop at ``</s>``, 64 new tokens at most."""
    ids = special_ids(vocab)
    names = {"<s>": "bos_token_id", "</s>": "eos_token_id", "<pad>": "pad_token_id"}
    return {**{names[token]: i for token, i in ids.items()},
            "max_new_tokens": min(DEFAULT_NEW_TOKENS, config.max_length - config.prompt_length - 1),
            "do_sample": False, "num_beams": 1}


def _write_hf(state: dict[str, Tensor], config: AntConfig, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {GENERATION_CONFIG_NAME: hf_generation_config(config, vocab)}
    if vocab is not None:
        files[VOCAB_NAME] = vocab
        files[TOKENIZER_CONFIG_NAME] = {"tokenizer_class": "CpmAntTokenizer", "model_max_length": config.max_length}
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state, config), files)


# ---- describing ----------------------------------------------------------------------------------


def _details(source: Source, config: AntConfig) -> dict:
    """``cpmlive info``'s lines on how the checkpoint was made: quantized, compressed, MoEfied."""
    history = _compression_history(source.directory)
    moe = config.moe
    return {
        **({"quantization": quantization_summary(config.quantization)} if config.quantization is not None else {}),
        **({"compression": history} if history is not None else {}),
        **({"moe": f"{moe.experts} experts per FFN, top-{moe.top_k}, {moe.router} router"} if moe is not None else {}),
    }


def _compression_history(directory: Path) -> str | None:
    """``compression.json`` (written by ``cpmlive compress``) as one line: the steps and sizes."""
    path = directory / "compression.json"
    if not path.is_file():
        return None
    record = json_object_or_none(path)
    try:
        steps = " -> ".join(f"{s['step']} ({s['parameters'] / 1e6:.2f}M)" for s in record["steps"])
        return f"from {record['source']} ({record['parameters'] / 1e6:.2f}M): {steps}"
    except (ValueError, KeyError, TypeError):
        return f"{path}: unreadable"


def quantization_summary(quantization: QuantConfig) -> str:
    """One line: scheme, method and what it was calibrated on."""
    text = f"{quantization.scheme} ({quantization.method}"
    calibration = quantization.calibration or {}
    if calibration:
        text += f", calibrated on {calibration.get('rows')} x {calibration.get('tokens_per_row')} tokens " \
                f"of {calibration.get('file')}"
    return text + (", int8 embedding/head)" if quantization.embedding else ", float embedding/head)")


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=_read, headers=_headers,
    writers={"ours": write_ours, "hf": _write_hf, "openbmb": write_openbmb},
    refusal=f"unknown target format {{to!r}} (known: {', '.join(FORMATS)})", details=_details,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = [
    "CHECKPOINTS", "FORMATS", "Format", "checkpoint_info", "convert", "detect_format", "hf_generation_config",
    "load_any", "load_pretrained", "quantization_summary", "resolve",
]
