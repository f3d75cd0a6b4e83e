"""Reading and writing CPM-1 checkpoints.

* ``ours``: a directory with ``config.json`` (``model_type`` ``"cpm1"``), safetensors in our
  names and ``spiece.model``.
* ``hf``: what ``transformers.GPT2LMHeadModel.from_pretrained`` reads: ``config.json``
  (``model_type`` ``"gpt2"``), ``transformer.*`` weights whose ``Conv1D`` matrices are stored
  ``[in, out]`` with q, k, v fused in ``c_attn``; ``spiece.model`` beside them.
* ``megatron`` (read only): the original CPM-Generate release, a directory with
  ``latest_checkpointed_iteration.txt`` and, under the iteration's folder, one file per
  model-parallel rank: ``mp_rank_00_model_states.pt`` (CPM-Generate's DeepSpeed layout, weights
  under ``"module"``) or ``mp_rank_00/model_optim_rng.pt`` (Megatron-LM's, under ``"model"``).
  Column-parallel weights (the fused qkv, ``dense_h_to_4h``, the vocabulary rows) are split on
  their output rows, each rank's qkv holding ``[q_r; k_r; v_r]`` for its heads; row-parallel ones
  (``attention.dense``, ``dense_4h_to_h``) on their input columns, with the bias whole.

Tensors are converted one at a time and each source tensor is dropped once used, so a
conversion holds about one checkpoint, never two.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.cpm1 import FORMATS
from cpmlive.model.checkpoint import CONFIG_NAME, check_state_dict, save_checkpoint
from cpmlive.model.cpm1.config import PRESETS as CPM1_PRESETS, Cpm1Config
from cpmlive.model.formats import (
    GENERATION_CONFIG_NAME,
    TOKENIZER_CONFIG_NAME,
    CheckpointFormats,
    Source,
    hf_config,
    hf_source,
    json_object_or_none,
    ours_source,
    read_layout,
    shapes_only,
    write_hf_directory,
)
from cpmlive.resources import model_path
from cpmlive.tokenizer.cpm1 import VOCAB_FILE

ITERATION_FILE = "latest_checkpointed_iteration.txt"
SHARD_FILE = re.compile(r"mp_rank_(\d\d)(?:_model_states\.pt|/model_optim_rng\.pt)$")

# ---- names: HF GPT-2 <-> ours ------------------------------------------------------------------

HF_TOP = {"transformer.wte.weight": "input_embedding.weight", "transformer.wpe.weight": "position_embedding.weight",
          "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
# HF block suffix -> (our suffix, transposed: Conv1D stores [in, out])
HF_BLOCK = {
    "ln_1.weight": ("attn_norm.weight", False), "ln_1.bias": ("attn_norm.bias", False),
    "attn.c_proj.weight": ("attn.attention_out.weight", True), "attn.c_proj.bias": ("attn.bias_out", False),
    "ln_2.weight": ("ffn_norm.weight", False), "ln_2.bias": ("ffn_norm.bias", False),
    "mlp.c_fc.weight": ("ffn.w_in.weight", True), "mlp.c_fc.bias": ("ffn.bias_in", False),
    "mlp.c_proj.weight": ("ffn.w_out.weight", True), "mlp.c_proj.bias": ("ffn.bias_out", False),
}
QKV = (("attn.project_q.weight", "attn.bias_q"), ("attn.project_k.weight", "attn.bias_k"),
       ("attn.project_v.weight", "attn.bias_v"))
HF_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)$")
# Buffers old GPT-2 checkpoints carry (the causal mask), and the tied head.
HF_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$|lm_head\.weight$")


def _layer_key(pattern: re.Pattern, name: str, source: str, layout: str) -> tuple[str, str]:
    """(``layers.N.``, the rest) of a per-layer key of a published layout; any other key is refused."""
    match = pattern.fullmatch(name)
    if match is None:
        raise _unknown_key(name, source, layout)
    return f"layers.{match.group(1)}.", match.group(2)


def _unknown_key(name: str, source: str, layout: str) -> CpmliveError:
    return CpmliveError(f"{source}: unknown key {name!r} for a {layout} checkpoint")


def hf_to_ours(state: dict[str, Tensor], config: Cpm1Config, source: str) -> dict[str, Tensor]:
    """HF GPT-2 tensors in our names (``state`` is emptied as it is read)."""
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if HF_IGNORED.fullmatch(name):
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = tensor
            continue
        prefix, suffix = _layer_key(HF_LAYER, name, source, "GPT-2")
        if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            if tensor.size(-1) != 3 * config.dim_attention:
                raise CpmliveError(f"{source}: {name!r} has shape {list(tensor.shape)}, config expects "
                                   f"{3 * config.dim_attention} fused q/k/v columns")
            for (weight_name, bias_name), part in zip(QKV, tensor.chunk(3, dim=-1)):
                if suffix.endswith("weight"):
                    out[prefix + weight_name] = part.t().contiguous()
                else:
                    out[prefix + bias_name] = part.contiguous()
        elif suffix in HF_BLOCK:
            ours, transposed = HF_BLOCK[suffix]
            out[prefix + ours] = tensor.t().contiguous() if transposed else tensor
        else:
            raise _unknown_key(name, source, "GPT-2")
    return out


def ours_to_hf(state: dict[str, Tensor], config: Cpm1Config) -> dict[str, Tensor]:
    """Our tensors in HF GPT-2 names and layout (the tied ``lm_head`` is not stored)."""
    top = {ours: hf for hf, ours in HF_TOP.items()}
    block = {ours: (hf, transposed) for hf, (ours, transposed) in HF_BLOCK.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        layer, suffix = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        if suffix in block:
            hf, transposed = block[suffix]
            out[f"transformer.h.{layer}.{hf}"] = tensor.t().contiguous() if transposed else tensor
    for layer in range(config.num_layers):
        prefix = f"layers.{layer}."
        weights = [state[prefix + w] for w, _ in QKV]
        out[f"transformer.h.{layer}.attn.c_attn.weight"] = torch.cat(weights, dim=0).t().contiguous()
        out[f"transformer.h.{layer}.attn.c_attn.bias"] = torch.cat([state[prefix + b] for _, b in QKV])
    return out


# ---- Megatron model-parallel shards -----------------------------------------------------------

MEGATRON_TOP = {"word_embeddings.weight": "input_embedding.weight",
                "position_embeddings.weight": "position_embedding.weight",
                "transformer.final_layernorm.weight": "output_norm.weight",
                "transformer.final_layernorm.bias": "output_norm.bias"}
MEGATRON_BLOCK = {  # suffix -> (ours, how the ranks split it: None (copied), 0 (rows) or 1 (columns))
    "input_layernorm.weight": ("attn_norm.weight", None), "input_layernorm.bias": ("attn_norm.bias", None),
    "attention.dense.weight": ("attn.attention_out.weight", 1), "attention.dense.bias": ("attn.bias_out", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "post_attention_layernorm.bias": ("ffn_norm.bias", None),
    "mlp.dense_h_to_4h.weight": ("ffn.w_in.weight", 0), "mlp.dense_h_to_4h.bias": ("ffn.bias_in", 0),
    "mlp.dense_4h_to_h.weight": ("ffn.w_out.weight", 1), "mlp.dense_4h_to_h.bias": ("ffn.bias_out", None),
}
MEGATRON_LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)$")


def is_megatron(path: Path) -> bool:
    return path.is_dir() and ((path / ITERATION_FILE).is_file() or bool(_shard_files(path)))


def _shard_files(directory: Path) -> dict[int, Path]:
    found = {}
    for candidate in [*directory.glob("mp_rank_*_model_states.pt"), *directory.glob("mp_rank_*/model_optim_rng.pt")]:
        match = SHARD_FILE.search(candidate.relative_to(directory).as_posix())
        if match:
            found[int(match.group(1))] = candidate
    return found


def megatron_shards(path: Path) -> list[Path]:
    """The shard files of a release, rank order; refused when a rank is missing."""
    directory = path
    iteration_file = path / ITERATION_FILE
    if iteration_file.is_file():
        iteration = iteration_file.read_text(encoding="utf-8").strip()
        directory = path / iteration
        if not directory.is_dir():
            raise CpmliveError(f"{path}: {ITERATION_FILE} names iteration {iteration!r}, "
                               f"but {directory} does not exist")
    shards = _shard_files(directory)
    if not shards:
        raise CpmliveError(f"{directory}: no mp_rank_XX_model_states.pt or mp_rank_XX/model_optim_rng.pt shard")
    missing = [rank for rank in range(max(shards) + 1) if rank not in shards]
    if missing:
        raise CpmliveError(f"{directory}: model-parallel shard mp_rank_{missing[0]:02d} is missing "
                           f"(found {', '.join(f'mp_rank_{r:02d}' for r in sorted(shards))})")
    return [shards[rank] for rank in range(len(shards))]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def _megatron_name(name: str) -> str:
    name = name.removeprefix("module.").removeprefix("language_model.").removeprefix("embedding.")
    if name.startswith("encoder."):
        name = "transformer." + name.removeprefix("encoder.")
    return name.replace(".self_attention.", ".attention.")


def read_megatron_shard(path: Path, shapes: bool = False) -> tuple[dict[str, Tensor], int | None]:
    """One rank's weights with the release's own names, and the model-parallel size it records;
    ``shapes``: only their shapes and dtypes (meta tensors), the file mapped, its weights not read."""
    # Read into memory, not mapped: each source tensor is freed as it is merged (a map's pages
    # would stay resident beside the merged copies, about twice the checkpoint at peak).
    mapped = shapes and zipfile.is_zipfile(path)
    try:
        try:
            data = torch.load(path, map_location="cpu", mmap=mapped, weights_only=True)
        except pickle.UnpicklingError:  # the release also pickles its training arguments, as Megatron loads it
            data = torch.load(path, map_location="cpu", mmap=mapped, weights_only=False)
    except Exception as exc:  # torch.load raises many types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CpmliveError(f"{path}: unreadable Megatron shard ({reason})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: not a Megatron checkpoint (no state dict)")
    weights = data.get("module", data.get("model"))
    if not isinstance(weights, dict):
        raise CpmliveError(f"{path}: not a Megatron checkpoint (no 'module' or 'model' weights)")
    world = data.get("mp_world_size")
    state = {_megatron_name(k): v for k, v in _flatten(weights).items()}
    return shapes_only(state) if shapes else state, world if isinstance(world, int) else None


def _merge(pieces: list[Tensor], dim: int | None, name: str, source: str) -> Tensor:
    if dim is None:
        return pieces[0]
    if any(p.dim() <= dim for p in pieces):
        raise CpmliveError(f"{source}: {name!r} has {pieces[0].dim()} dimensions, a split on dim {dim} expected")
    return torch.cat(pieces, dim=dim)


def megatron_to_ours(shards: list[dict[str, Tensor]], source: str) -> dict[str, Tensor]:
    """Merge the ranks' tensors into ours (each shard dict is emptied as it is read)."""
    out: dict[str, Tensor] = {}
    for name in list(shards[0]):
        try:
            pieces = [shard.pop(name) for shard in shards]
        except KeyError:
            raise CpmliveError(f"{source}: {name!r} is in mp_rank_00 but not in every shard") from None
        if name in MEGATRON_TOP:
            out[MEGATRON_TOP[name]] = _merge(pieces, 0 if name.startswith("word_") else None, name, source)
        else:
            out.update(_megatron_layer_tensors(name, pieces, source))
    leftover = next((name for shard in shards for name in shard), None)
    if leftover is not None:
        raise CpmliveError(f"{source}: {leftover!r} is in a later shard but not in mp_rank_00")
    return out


def _megatron_layer_tensors(name: str, pieces: list[Tensor], source: str) -> dict[str, Tensor]:
    """One per-layer tensor's ranks merged, in our names (the fused q/k/v is three)."""
    prefix, suffix = _layer_key(MEGATRON_LAYER, name, source, "CPM-1 Megatron")
    if suffix in ("attention.query_key_value.weight", "attention.query_key_value.bias"):
        if any(p.size(0) % 3 for p in pieces):
            raise CpmliveError(f"{source}: {name!r} has {pieces[0].size(0)} rows, not q, k and v")
        thirds = [p.chunk(3, dim=0) for p in pieces]
        names = [weight if suffix.endswith("weight") else bias for weight, bias in QKV]
        return {prefix + ours: torch.cat([parts[which] for parts in thirds], dim=0) for which, ours in enumerate(names)}
    if suffix not in MEGATRON_BLOCK:
        raise _unknown_key(name, source, "CPM-1 Megatron")
    ours, dim = MEGATRON_BLOCK[suffix]
    return {prefix + ours: _merge(pieces, dim, name, source)}


def config_from_state(state: dict[str, Tensor], source: str) -> Cpm1Config:
    """The architecture the merged tensors have; the head count, which no tensor shows, from the
    preset of the same width (CPM-Generate's 32 heads at 2560, the distilled 12 at 768), else 64-wide heads."""
    try:
        vocab, width = state["input_embedding.weight"].shape
        positions = state["position_embedding.weight"].size(0)
        dim_ff = state["layers.0.ffn.w_in.weight"].size(0)
    except KeyError as exc:
        raise CpmliveError(f"{source}: missing weight {exc.args[0]!r}") from None
    layers = 1 + max(int(m.group(1)) for name in state if (m := re.match(r"layers\.(\d+)\.", name)))
    same_width = [p() for p in CPM1_PRESETS.values() if p().dim_model == width]
    heads = same_width[0].num_heads if same_width else max(1, width // 64)
    return Cpm1Config(vocab_size=vocab, dim_model=width, dim_ff=dim_ff, num_layers=layers, num_heads=heads,
                      dim_head=width // heads, max_length=positions,
                      half=state["input_embedding.weight"].dtype == torch.float16)


def read_megatron(path: Path, config: Cpm1Config | None,
                  shapes: bool = False) -> tuple[dict[str, Tensor], Cpm1Config]:
    """The release's ranks merged into our layout (``shapes``: meta tensors, no weight read)."""
    files = megatron_shards(path)
    shards, worlds = zip(*(read_megatron_shard(f, shapes) for f in files))
    recorded = next((w for w in worlds if w is not None), None)
    if recorded is not None and recorded != len(files):
        raise CpmliveError(f"{path}: the shards were saved with {recorded} model-parallel ranks, "
                           f"{len(files)} found: mp_rank_{len(files):02d} is missing")
    state = megatron_to_ours(list(shards), str(path))
    config = config or config_from_state(state, str(path))
    width = 3 * config.dim_attention
    qkv = state.get("layers.0.attn.project_q.weight")
    if qkv is not None and 3 * qkv.size(0) != width:
        raise CpmliveError(f"{path}: the {len(files)} shard(s) hold {3 * qkv.size(0)} of the {width} query/key/value "
                           "rows: a model-parallel shard is missing")
    return state, config


# ---- telling layouts apart -----------------------------------------------------------------------


def is_cpm1_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    config = json_object_or_none(path / CONFIG_NAME)
    if config is not None:
        return config.get("model_type") in ("cpm1", "gpt2")
    return is_megatron(path)


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    if not path.is_dir():
        raise CpmliveError(f"{path}: a CPM-1 checkpoint is a directory (ours, HF's or a Megatron release)")
    config = json_object_or_none(path / CONFIG_NAME)
    if config is None and is_megatron(path):
        return Source(path, "megatron", path, megatron_shards(path),
                      Path(config_path) if config_path is not None else None)
    model_type = (config or {}).get("model_type")
    if model_type == "gpt2":
        return hf_source(path, config_path)
    if model_type == "cpm1":
        return ours_source(path, config_path)
    raise CpmliveError(f"{path}: not a CPM-1 checkpoint (no GPT-2 or CPM-1 config.json, no Megatron shards)")


def read_state(source: Source, shapes: bool = False) -> tuple[dict[str, Tensor], Cpm1Config]:
    """(state dict in our layout, config), every key and shape checked; ``shapes``: the tensors
    on the meta device, converted from the files' headers without reading a weight."""
    where = str(source.path)
    if source.format == "megatron":
        given = Cpm1Config.load(source.config) if source.config is not None else None
        state, config = read_megatron(source.path, given, shapes)
    else:
        config = Cpm1Config.load(source.config)
        state = read_layout(source, config, hf_to_ours, shapes)
    check_state_dict(state, config, where)
    return state, config


# ---- writing -----------------------------------------------------------------------------------


def _write_hf(state: dict[str, Tensor], config: Cpm1Config, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {}
    if vocab is not None:
        from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

        eod = Cpm1Tokenizer(vocab).eod_id
        files[GENERATION_CONFIG_NAME] = {"eos_token_id": eod, "pad_token_id": eod, "do_sample": False, "num_beams": 1,
                                         "max_new_tokens": 64}
        files[VOCAB_FILE] = vocab
        files[TOKENIZER_CONFIG_NAME] = {"tokenizer_class": "CpmTokenizer", "model_max_length": config.max_length}
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state, config), files)


def _write_ours(state: dict[str, Tensor], config: Cpm1Config, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst)
    if vocab is not None:
        shutil.copyfile(vocab, dst / VOCAB_FILE)


def check_vocab(vocab: Path, config: Cpm1Config, source: str) -> None:
    """A SentencePiece model whose size is the embedding's (refused with both sizes otherwise)."""
    from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

    size = Cpm1Tokenizer(vocab).vocab_size
    if size != config.vocab_size:
        raise CpmliveError(f"{source}: the SentencePiece model has {size} pieces, "
                           f"the embedding {config.vocab_size} rows")


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "hf": _write_hf},
    refusal=f"a CPM-1 checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE, "chinese_vocab.model"), check_vocab=check_vocab,
)
convert = CHECKPOINTS.convert
load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "check_vocab", "checkpoint_info", "convert", "hf_to_ours", "is_cpm1_checkpoint",
           "load_pretrained", "megatron_to_ours", "ours_to_hf", "read_state", "resolve"]
