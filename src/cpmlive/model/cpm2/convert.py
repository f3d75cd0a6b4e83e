"""Reading and writing the CPM-2 family's checkpoints.

* ``ours``: a directory with ``config.json`` (``model_type`` ``"cpm2"``), safetensors in our names
  and ``vocab.txt``.
* ``openbmb``: the original code's state dict (BAAI's release: ``word_embeds``, ``encoder.blocks.N
  .self_attn.self_attn.project`` with q, k and v fused, ``cross_attn.project_kv`` with k and v
  fused, ``ff.dense_relu_dense.wi_0/wi_1/wo``, the first block's ``relative_attention_bias``, an
  untied ``lm_head``), as one file, or as the release's directory of model-parallel shards
  (``mp_rank_00_model_states.pt`` ...; weights under ``module``), merged as the original's
  ``change_mp.py`` merges them: fused matrices by their parts, row-split matrices on dim 0, the
  others on dim 1. The MoE's experts are ``ff.experts.E.*`` beside ``ff.expert_centroids`` (the
  release keeps one expert per data-parallel rank; merged here under their ranks). A config is
  ``config.json`` beside it (ours, or the original's T5-style keys).
* ``modelcenter``: ModelCenter's ``CPM2`` (``input_embedding``, ``encoder.layers.N.self_att...``,
  ``output_projection``) with its ``config.json``. ModelCenter's products divide by
  ``sqrt(fan_in)`` (``length_scale``): those factors are folded into the weights on reading and
  taken out on writing.
* ``hf``: EVA's HF port (T5's key names, a ``config.json`` with ``attn_scale`` and no
  ``model_type``) with ``vocab.txt``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import CONFIG_NAME, check_family, check_state_dict, save_checkpoint
from cpmlive.model.cpm2 import FORMATS
from cpmlive.model.cpm2.config import Cpm2Config
from cpmlive.model.formats import (CheckpointFormats, Source, json_object_or_none, ours_source, read_files,
                                   read_torch, shapes_only, torch_files, write_hf_directory)
from cpmlive.model.t5_keys import hf_to_ours, ours_to_hf
from cpmlive.resources import model_path
from cpmlive.utils import atomic_write_text

VOCAB_FILE = "vocab.txt"
SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt")
STACKS = {"encoder": ("encoder_layers", "encoder_position_bias"), "decoder": ("layers", "decoder_position_bias")}
SUBLAYERS = {"self_attn": ("attn_norm", "attn"), "cross_attn": ("cross_norm", "cross")}
FFN = {"wi_0": "w_0", "wi_1": "w_1", "wo": "w_out"}
ORIGINAL_TOP = {"word_embeds.weight": "input_embedding.weight", "lm_head.weight": "output_head.weight",
                "encoder.final_layernorm.weight": "encoder_norm.weight",
                "decoder.final_layernorm.weight": "output_norm.weight"}


def _unknown_key(name: str, source: str) -> CpmliveError:
    return CpmliveError(f"{source}: unknown key {name!r} for a CPM-2 checkpoint")


# ---- the original layout ----------------------------------------------------------------------


def _original_ffn(stack: str, block: str, rest: str, source: str, name: str) -> str:
    """Our name of a key under ``ff.`` (dense, or a BASE layer's centroids and experts)."""
    layers = STACKS[stack][0]
    if rest == "layer_norm.weight":
        return f"{layers}.{block}.ffn_norm.weight"
    if rest == "expert_centroids":
        return f"{layers}.{block}.ffn.centroids"
    match = re.fullmatch(r"(?:experts\.(\d+)\.)?(?:layer_norm\.weight|dense_relu_dense\.(wi_0|wi_1|wo)\.weight)", rest)
    if match is None:
        raise _unknown_key(name, source)
    expert, matrix = match.groups()
    if expert is None:
        return f"{layers}.{block}.ffn.{FFN[matrix]}.weight"
    where = f"{layers}.{block}.ffn.experts.{expert}"
    return f"{where}.norm.weight" if matrix is None else f"{where}.ffn.{FFN[matrix]}.weight"


def original_to_ours(state: dict[str, Tensor], config: Cpm2Config, source: str) -> dict[str, Tensor]:
    """The original code's tensors in our names (``state`` is emptied as it is read)."""
    out: dict[str, Tensor] = {}
    top = ORIGINAL_TOP
    for name in list(state):
        tensor = state.pop(name)
        if name in ("encoder.word_embeds.weight", "decoder.word_embeds.weight", "role_embeds.weight"):
            continue  # the shared table registered again; EVA's unused role table
        if name in top:
            out[top[name]] = tensor
            continue
        match = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(self_attn|cross_attn|ff)\.(.+)", name)
        if match is None:
            raise _unknown_key(name, source)
        stack, block, part, rest = match.groups()
        layers, bias = STACKS[stack]
        if part == "ff":
            out[_original_ffn(stack, block, rest, source, name)] = tensor
            continue
        if part == "cross_attn" and stack == "encoder":
            raise _unknown_key(name, source)
        norm, ours = SUBLAYERS[part]
        prefix = f"{layers}.{block}.{ours}"
        if rest == "layer_norm.weight":
            out[f"{layers}.{block}.{norm}.weight"] = tensor
        elif rest == f"{part}.relative_attention_bias.weight" and part == "self_attn":
            out[f"{bias}.{block}.weight"] = tensor
        elif rest == f"{part}.project.weight" and part == "self_attn":
            for piece, matrix in zip("qkv", _split(tensor, 3, name, source)):
                out[f"{prefix}.project_{piece}.weight"] = matrix
        elif rest == f"{part}.project_q.weight" and part == "cross_attn":
            out[f"{prefix}.project_q.weight"] = tensor
        elif rest == f"{part}.project_kv.weight" and part == "cross_attn":
            out[f"{prefix}.project_k.weight"], out[f"{prefix}.project_v.weight"] = _split(tensor, 2, name, source)
        elif rest == f"{part}.dense.weight":
            out[f"{prefix}.attention_out.weight"] = tensor
        else:
            raise _unknown_key(name, source)
    return out


def _split(tensor: Tensor, parts: int, name: str, source: str) -> tuple[Tensor, ...]:
    if tensor.dim() != 2 or tensor.size(0) % parts:
        raise CpmliveError(f"{source}: {name!r} has shape {list(tensor.shape)}, not {parts} fused matrices")
    return tensor.chunk(parts, dim=0)


def ours_to_original(state: dict[str, Tensor], config: Cpm2Config) -> dict[str, Tensor]:
    """Our tensors in the original code's names (q, k, v and k, v fused again)."""
    reverse = {ours: theirs for theirs, ours in ORIGINAL_TOP.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in reverse:
            out[reverse[name]] = tensor
            continue
        layers, block, rest = re.fullmatch(r"(encoder_layers|layers|encoder_position_bias|decoder_position_bias)"
                                           r"\.(\d+)\.(.+)", name).groups()
        stack = "encoder" if layers.startswith("encoder") else "decoder"
        base = f"{stack}.blocks.{block}"
        if layers.endswith("position_bias"):
            out[f"{base}.self_attn.self_attn.relative_attention_bias.weight"] = tensor
        elif rest in ("attn_norm.weight", "cross_norm.weight", "ffn_norm.weight"):
            part = {"attn_norm.weight": "self_attn", "cross_norm.weight": "cross_attn", "ffn_norm.weight": "ff"}[rest]
            out[f"{base}.{part}.layer_norm.weight"] = tensor
        elif rest == "attn.project_q.weight":
            key, value = (state[f"{layers}.{block}.attn.project_{part}.weight"] for part in "kv")
            out[f"{base}.self_attn.self_attn.project.weight"] = torch.cat([tensor, key, value])
        elif rest == "cross.project_q.weight":
            out[f"{base}.cross_attn.cross_attn.project_q.weight"] = tensor
        elif rest == "cross.project_k.weight":
            out[f"{base}.cross_attn.cross_attn.project_kv.weight"] = torch.cat(
                [tensor, state[f"{layers}.{block}.cross.project_v.weight"]])
        elif rest in ("attn.attention_out.weight", "cross.attention_out.weight"):
            part = "self_attn" if rest.startswith("attn") else "cross_attn"
            out[f"{base}.{part}.{part}.dense.weight"] = tensor
        elif rest.startswith("ffn."):
            out[f"{base}.ff.{_original_ffn_name(rest.removeprefix('ffn.'))}"] = tensor
        elif rest not in ("attn.project_k.weight", "attn.project_v.weight", "cross.project_v.weight"):
            raise CpmliveError(f"cannot write {name!r} in the original layout")
    return out


def _original_ffn_name(rest: str) -> str:
    reverse = {ours: theirs for theirs, ours in FFN.items()}
    if rest == "centroids":
        return "expert_centroids"
    match = re.fullmatch(r"(?:experts\.(\d+)\.)?(norm\.weight|(?:ffn\.)?(w_0|w_1|w_out)\.weight)", rest)
    expert, leaf, matrix = match.groups()
    inner = "layer_norm.weight" if matrix is None else f"dense_relu_dense.{reverse[matrix]}.weight"
    return inner if expert is None else f"experts.{expert}.{inner}"


def merge_shards(shards: list[dict[str, Tensor]], source: str) -> dict[str, Tensor]:
    """One state dict from the original's model-parallel shards (``change_mp.py``'s rules)."""
    if len(shards) == 1:
        return shards[0]
    merged: dict[str, Tensor] = {}
    for name in shards[0]:
        parts = [shard.get(name) for shard in shards]
        if any(part is None for part in parts):
            raise CpmliveError(f"{source}: {name!r} is missing from a model-parallel shard")
        if parts[0].dim() == 1:
            merged[name] = parts[0]
        elif name.endswith(("project.weight", "project_kv.weight")):
            fused = 3 if name.endswith("project.weight") else 2
            pieces = [part.chunk(fused, dim=0) for part in parts]
            merged[name] = torch.cat([piece[i] for i in range(fused) for piece in pieces])
        elif name.endswith(("project_q.weight", "word_embeds.weight", "lm_head.weight", "wi_0.weight", "wi_1.weight")):
            merged[name] = torch.cat(parts, dim=0)
        else:
            merged[name] = torch.cat(parts, dim=1)
    return merged


def read_original(weights: list[Path], source: str) -> dict[str, Tensor]:
    """The original code's state dict from one file or its model-parallel shards, merged."""
    shards = []
    for path in weights:
        # The release's shards hold the optimizer's state and arguments beside the weights.
        shard = SHARD.fullmatch(path.name)
        state = torch.load(path, map_location="cpu", weights_only=False) if shard else read_torch(path)
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state = state["module"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CpmliveError(f"{path}: not a state dict of tensors")
        shards.append(state)
    return merge_shards(shards, source)


# ---- ModelCenter's layout ---------------------------------------------------------------------


def _modelcenter_names(config: Cpm2Config) -> dict[str, tuple[str, float]]:
    """Our name -> (ModelCenter's, the factor its weight is ours times)."""
    d, attention, ff = config.dim_model, config.dim_attention, config.dim_ff
    names = {"input_embedding.weight": ("input_embedding.weight", 1.0),
             "output_head.weight": ("output_projection.weight", math.sqrt(d)),
             "encoder_norm.weight": ("encoder.output_layernorm.weight", 1.0),
             "output_norm.weight": ("decoder.output_layernorm.weight", 1.0),
             "encoder_position_bias.0.weight": ("position_bias_enc.relative_attention_bias", 1.0),
             "decoder_position_bias.0.weight": ("position_bias_dec.relative_attention_bias", 1.0)}
    stacks = (("encoder_layers", "encoder", config.num_encoder_layers, ("attn",)),
              ("layers", "decoder", config.num_layers, ("attn", "cross")))
    for ours_stack, theirs, count, attentions in stacks:
        for block in range(count):
            ours, base = f"{ours_stack}.{block}", f"{theirs}.layers.{block}"
            for part in attentions:
                module = "self_att" if part == "attn" else "cross_att"
                names[f"{ours}.{part}_norm.weight" if part == "cross" else f"{ours}.attn_norm.weight"] = (
                    f"{base}.{module}.layernorm_before_attention.weight", 1.0)
                for matrix in ("q", "k", "v"):
                    names[f"{ours}.{part}.project_{matrix}.weight"] = (
                        f"{base}.{module}.self_attention.project_{matrix}.weight", math.sqrt(d))
                names[f"{ours}.{part}.attention_out.weight"] = (
                    f"{base}.{module}.self_attention.attention_out.weight", math.sqrt(attention))
            names[f"{ours}.ffn_norm.weight"] = (f"{base}.ffn.layernorm_before_ffn.weight", 1.0)
            names[f"{ours}.ffn.w_0.weight"] = (f"{base}.ffn.ffn.w_in.w_0.weight", math.sqrt(d))
            names[f"{ours}.ffn.w_1.weight"] = (f"{base}.ffn.ffn.w_in.w_1.weight", math.sqrt(d))
            names[f"{ours}.ffn.w_out.weight"] = (f"{base}.ffn.ffn.w_out.weight", math.sqrt(ff))
    return names


def modelcenter_to_ours(state: dict[str, Tensor], config: Cpm2Config, source: str) -> dict[str, Tensor]:
    theirs = {name: (ours, factor) for ours, (name, factor) in _modelcenter_names(config).items()}
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if name not in theirs:
            raise _unknown_key(name, source)
        ours, factor = theirs[name]
        out[ours] = tensor if factor == 1.0 else (tensor.float() / factor).to(tensor.dtype)
    return out


def ours_to_modelcenter(state: dict[str, Tensor], config: Cpm2Config) -> dict[str, Tensor]:
    names = _modelcenter_names(config)
    return {names[name][0]: tensor if names[name][1] == 1.0 else (tensor.float() * names[name][1]).to(tensor.dtype)
            for name, tensor in state.items()}


# ---- finding and reading ------------------------------------------------------------------------


def _layout(path: Path) -> str | None:
    """Which layout a directory or file is in (None: not this family's)."""
    if path.is_file():
        config = json_object_or_none(path.parent / CONFIG_NAME) or {}
        ours = config.get("model_type") == Cpm2Config.model_type
        original = "d_model" in config and "model_type" not in config
        return "openbmb" if path.suffix in (".pt", ".bin") and (ours or original) else None
    if not path.is_dir():
        return None
    if any(SHARD.fullmatch(p.name) for p in path.rglob("mp_rank_*_model_states.pt")):
        return "openbmb"
    config = json_object_or_none(path / CONFIG_NAME)
    if config is None:
        return None
    if config.get("model_type") == Cpm2Config.model_type:
        return "ours"
    if "model_type" in config:
        return None
    if "dim_model" in config and "num_encoder_layers" in config:  # CPM-Ant's OpenBMB config has neither encoder
        return "modelcenter"
    if "d_model" in config and "attn_scale" in config:
        return "hf"
    if "d_model" in config and torch_files(path):
        return "openbmb"
    return None


def is_cpm2_checkpoint(path: str | os.PathLike) -> bool:
    """The original code's files (its shards), ModelCenter's CPM2, EVA's HF port or ours."""
    return _layout(Path(path)) is not None


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    layout = _layout(path)
    if layout is None:
        raise CpmliveError(f"{path}: not a CPM-2 checkpoint (ours, the original's, ModelCenter's or EVA's HF port)")
    if layout == "ours":
        return ours_source(path, config_path)
    directory = path if path.is_dir() else path.parent
    if path.is_file():
        weights = [path]
    elif layout == "openbmb":
        weights = sorted(path.rglob("mp_rank_*_model_states.pt")) or torch_files(path)
    else:
        weights = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
    config = Path(config_path) if config_path is not None else directory / CONFIG_NAME
    if not config.is_file():
        raise CpmliveError(f"{path}: no config.json beside the weights (pass --config)")
    return Source(path, layout, directory, weights, config)


def _config_of(source: Source) -> Cpm2Config:
    from cpmlive.config import read_json_object

    data = read_json_object(source.config)
    if source.format == "openbmb" and data.get("model_type") != Cpm2Config.model_type:
        return Cpm2Config.from_dict({**Cpm2Config.from_eva_hf(data, str(source.config)).to_dict(),
                                     "ffn": "gated-gelu", "dialogue": bool(data.get("dialogue", False)),
                                     "experts": int(data.get("experts", 0))})
    return Cpm2Config.load(source.config)


def read_state(source: Source, shapes: bool = False) -> tuple[dict[str, Tensor], Cpm2Config]:
    """(state dict in our layout, config), every key and shape checked."""
    where = str(source.path)
    config = _config_of(source)
    if source.format == "openbmb":
        raw = read_original(source.weights, where)
    elif source.format == "ours":
        from cpmlive.model.checkpoint import read_weights

        raw = read_weights(source.directory)
    else:
        raw = read_files(source.weights)
    raw = shapes_only(raw) if shapes else raw
    if source.format != "hf":  # EVA's HF port stores T5's names, the T5 family's signature
        check_family(raw, config, where)
    if source.format == "openbmb":
        state = original_to_ours(raw, config, where)
    elif source.format == "modelcenter":
        state = modelcenter_to_ours(raw, config, where)
    elif source.format == "hf":
        state = hf_to_ours(raw, False, where)
    else:
        state = raw
    _check_experts(state, config, where)
    check_state_dict(state, config, where)
    return state, config


def _check_experts(state: dict[str, Tensor], config: Cpm2Config, source: str) -> None:
    """A mixture's every FFN has ``config.experts`` experts: name the first missing or extra one."""
    found = {(m.group(1), int(m.group(2))) for name in state
             if (m := re.match(r"((?:encoder_)?layers\.\d+)\.ffn\.experts\.(\d+)\.", name))}
    centroids = [name for name in state if name.endswith("ffn.centroids")]
    if not config.experts and (found or centroids):
        raise CpmliveError(f"{source}: the weights have experts, the config none (set experts)")
    for name in centroids:
        block = name.removesuffix(".ffn.centroids")
        count = state[name].shape[0]
        if count != config.experts:
            raise CpmliveError(f"{source}: {block} has {count} expert centroids, the config {config.experts} experts")
        missing = [e for e in range(config.experts) if (block, e) not in found]
        if missing:
            raise CpmliveError(f"{source}: {block} is missing expert {missing[0]} of {config.experts}")
    extra = [(block, e) for block, e in found if e >= config.experts]
    if extra:
        raise CpmliveError(f"{source}: {extra[0][0]} has an expert {extra[0][1]} past the config's {config.experts}")


# ---- writing -----------------------------------------------------------------------------------


def _write_ours(state: dict[str, Tensor], config: Cpm2Config, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def _write_original(state: dict[str, Tensor], config: Cpm2Config, dst: Path, vocab: Path | None) -> None:
    """One state file in the original's names, our ``config.json`` and ``vocab.txt`` beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    temporary = dst.with_name(f".{dst.name}.tmp")
    torch.save({name: tensor.contiguous() for name, tensor in ours_to_original(state, config).items()}, temporary)
    os.replace(temporary, dst)
    atomic_write_text(dst.parent / CONFIG_NAME, config.to_json() + "\n")
    if vocab is not None and vocab.resolve() != (dst.parent / VOCAB_FILE).resolve():
        atomic_write_text(dst.parent / VOCAB_FILE, vocab.read_text(encoding="utf-8"))


def _write_modelcenter(state: dict[str, Tensor], config: Cpm2Config, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {VOCAB_FILE: vocab} if vocab is not None else {}
    write_hf_directory(dst, config.to_modelcenter(), ours_to_modelcenter(state, config), files)


def _write_eva_hf(state: dict[str, Tensor], config: Cpm2Config, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {VOCAB_FILE: vocab} if vocab is not None else {}
    write_hf_directory(dst, config.to_eva_hf(), ours_to_hf(state), files)


def check_vocab(vocab: Path, config: Cpm2Config, source: str) -> None:
    from cpmlive.tokenizer.cpm2 import Cpm2Tokenizer

    Cpm2Tokenizer.for_model(vocab, config.vocab_size)


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "openbmb": _write_original, "modelcenter": _write_modelcenter, "hf": _write_eva_hf},
    refusal=f"a CPM-2 checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE,), check_vocab=check_vocab,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "checkpoint_info", "convert", "is_cpm2_checkpoint", "load_pretrained",
           "merge_shards", "modelcenter_to_ours", "original_to_ours", "ours_to_modelcenter", "ours_to_original",
           "read_state", "resolve"]
