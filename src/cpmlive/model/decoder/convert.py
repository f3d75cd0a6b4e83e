"""Reading and writing the decoder family's checkpoints.

* ``ours``: a directory with ``config.json`` (``model_type`` ``"decoder"``), safetensors in our
  names, ``tokenizer.json`` and its companions (``tokenizer_config.json``, ``generation_config.json``).
* ``hf``: an HF model directory as it is published (``model_type`` llama, mistral, qwen2, qwen3,
  glm, minicpm, minicpm3; safetensors sharded or not, in their stored dtype; ``pytorch_model.bin``
  too) with its tokenizer files. GLM-4 rotates interleaved pairs of each head's first half: its
  q/k rows are reordered half-split on reading (and back on writing), so one rotation serves every
  architecture (the attention scores are the same sums over the same pairs).
* ``gguf``: llama.cpp's single file (``model.decoder.gguf``), tokenizer included.

Tensors are renamed one at a time, each source tensor dropped once used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import CONFIG_NAME, check_state_dict, save_checkpoint
from cpmlive.model.decoder import FORMATS
from cpmlive.model.decoder.config import ARCHITECTURES, DecoderConfig
from cpmlive.model.formats import (
    CheckpointFormats,
    Source,
    check_hf_tokenizer,
    hf_config,
    hf_source,
    json_object_or_none,
    ours_source,
    read_layout,
    shapes_only,
    weights_dtype,
    write_hf_directory,
)
from cpmlive.resources import model_path

VOCAB_FILE = "tokenizer.json"
GGUF_SUFFIX = ".gguf"
# A GGUF's tensor type by the dtype convert casts to (``--dtype``); q8_0 comes from quantize-free export
GGUF_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "f16"}
GGUF_KINDS = {"f32": "f32", "float32": "f32", "fp32": "f32", "f16": "f16", "float16": "f16", "fp16": "f16",
              "q8_0": "q8_0"}

HF_TOP = {"model.embed_tokens.weight": "input_embedding.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output_head.weight"}
HF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.project_q.weight", "self_attn.k_proj.weight": "attn.project_k.weight",
    "self_attn.v_proj.weight": "attn.project_v.weight", "self_attn.o_proj.weight": "attn.attention_out.weight",
    "self_attn.q_proj.bias": "attn.bias_q", "self_attn.k_proj.bias": "attn.bias_k",
    "self_attn.v_proj.bias": "attn.bias_v", "self_attn.o_proj.bias": "attn.bias_out",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ffn.w_0.weight", "mlp.up_proj.weight": "ffn.w_1.weight",
    "mlp.down_proj.weight": "ffn.w_out.weight",
    # MiniCPM3's latent attention
    "self_attn.q_a_proj.weight": "attn.project_q_a.weight", "self_attn.q_a_layernorm.weight": "attn.q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn.project_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.project_kv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.project_kv_b.weight",
}
FUSED_GATE_UP = "mlp.gate_up_proj.weight"  # GLM-4: [gate; up]
ROTATED = ("attn.project_q.weight", "attn.project_k.weight", "attn.bias_q", "attn.bias_k")
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _unknown_key(name: str, source: str) -> CpmliveError:
    return CpmliveError(f"{source}: unknown key {name!r} for a decoder checkpoint")


def half_split_order(config: DecoderConfig, rows: int) -> Tensor:
    """The row order that turns GLM's interleaved rotary pairs (0,1), (2,3) ... of each head's
    rotated part into Llama's half-split layout (0, 2, ..., 1, 3, ...); the rest stays."""
    head, rotary = config.dim_head, config.rotary_dim
    within = torch.cat([torch.arange(0, rotary, 2), torch.arange(1, rotary, 2), torch.arange(rotary, head)])
    return torch.cat([within + start for start in range(0, rows, head)])


def _to_half_split(tensor: Tensor, config: DecoderConfig) -> Tensor:
    return tensor.index_select(0, half_split_order(config, tensor.size(0)))


def _to_interleaved(tensor: Tensor, config: DecoderConfig) -> Tensor:
    inverse = torch.argsort(half_split_order(config, tensor.size(0)))
    return tensor.index_select(0, inverse)


def hf_to_ours(state: dict[str, Tensor], config: DecoderConfig, source: str) -> dict[str, Tensor]:
    """HF tensors in our names (``state`` is emptied as it is read)."""
    out: dict[str, Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if HF_IGNORED.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = tensor
            continue
        match = HF_LAYER.fullmatch(name)
        if match is None:
            raise _unknown_key(name, source)
        prefix, suffix = f"layers.{match.group(1)}.", match.group(2)
        if suffix == FUSED_GATE_UP:
            gate, up = tensor.chunk(2, dim=0)
            out[prefix + "ffn.w_0.weight"], out[prefix + "ffn.w_1.weight"] = gate, up
        elif suffix in HF_BLOCK:
            ours = HF_BLOCK[suffix]
            rotate = config.architecture == "glm" and ours in ROTATED
            out[prefix + ours] = _to_half_split(tensor, config) if rotate else tensor
        else:
            raise _unknown_key(name, source)
    return out


def ours_to_hf(state: dict[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """Our tensors in HF's names and layout for ``config.architecture`` (a tied head is not stored)."""
    top = {ours: hf for hf, ours in HF_TOP.items()}
    block = {ours: hf for hf, ours in HF_BLOCK.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        layer, suffix = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        prefix = f"model.layers.{layer}."
        if config.architecture == "glm" and suffix in ("ffn.w_0.weight", "ffn.w_1.weight"):
            if suffix == "ffn.w_0.weight":
                out[prefix + FUSED_GATE_UP] = torch.cat([tensor, state[f"layers.{layer}.ffn.w_1.weight"]])
            continue
        rotate = config.architecture == "glm" and suffix in ROTATED
        out[prefix + block[suffix]] = _to_interleaved(tensor, config) if rotate else tensor
    return out


def adapter_modules(config: DecoderConfig) -> dict[str, str]:
    """Our module paths -> HF's (``layers.0.attn.project_q`` -> ``model.layers.0.self_attn.q_proj``)
    for every module an adapter may tune, so that adapters are saved in HF's names and PEFT loads
    them on HF's model. GLM-4's q/k rows are stored reordered and its gate and up projections
    fused, so those have no HF module of their own and are left out."""
    top = {ours.removesuffix(".weight"): hf.removesuffix(".weight") for hf, ours in HF_TOP.items()}
    block = {ours.removesuffix(".weight"): hf.removesuffix(".weight") for hf, ours in HF_BLOCK.items()
             if hf.endswith(".weight")}
    if config.architecture == "glm":
        for reordered in ("attn.project_q", "attn.project_k", "ffn.w_0", "ffn.w_1"):
            del block[reordered]
    return {**top, **{f"layers.{layer}.{ours}": f"model.layers.{layer}.{hf}"
                      for layer in range(config.num_layers) for ours, hf in block.items()}}


# ---- finding and reading ------------------------------------------------------------------------


def is_decoder_checkpoint(path: str | os.PathLike) -> bool:
    """A GGUF file, or a directory whose ``config.json`` names this family or one of its architectures."""
    path = Path(path)
    if path.is_file():
        return path.suffix == GGUF_SUFFIX
    config = json_object_or_none(path / CONFIG_NAME) if path.is_dir() else None
    return config is not None and config.get("model_type") in (DecoderConfig.model_type, *ARCHITECTURES)


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    path = model_path(path)
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return Source(path, "gguf", gguf_tokenizer_directory(path), [path], None)
    if not path.is_dir():
        raise CpmliveError(f"{path}: a decoder checkpoint is a directory (ours or HF's) or a .gguf file")
    config = json_object_or_none(path / CONFIG_NAME) or {}
    model_type = config.get("model_type")
    if model_type == DecoderConfig.model_type:
        return ours_source(path, config_path)
    if model_type in ARCHITECTURES:
        return hf_source(path, config_path)
    raise CpmliveError(f"{path}: model_type {model_type!r} is not supported "
                       f"(supported: {', '.join(ARCHITECTURES)}, cpm-ant, cpm-bee, gpt2)")


def read_state(source: Source, shapes: bool = False) -> tuple[dict[str, Tensor], DecoderConfig]:
    """(state dict in our layout, config), every key and shape checked; ``shapes``: meta tensors
    converted from the files' headers without reading a weight."""
    where = str(source.path)
    if source.format == "gguf":
        from cpmlive.model.decoder.gguf import read_gguf

        hf_data, raw, _ = read_gguf(source.path)
        config = DecoderConfig.from_hf(hf_data, where)
        state = hf_to_ours(shapes_only(raw) if shapes else raw, config, where)
    else:
        config = DecoderConfig.load(source.config)
        state = read_layout(source, config, hf_to_ours, shapes)
    check_state_dict(state, config, where)
    return state, config


# ---- writing -----------------------------------------------------------------------------------


def _write_hf(state: dict[str, Tensor], config: DecoderConfig, dst: Path, vocab: Path | None) -> None:
    files: dict[str, dict | Path] = {}
    if vocab is not None:
        files[VOCAB_FILE] = vocab  # write_vocab brings its companions
    write_hf_directory(dst, hf_config(config, state), ours_to_hf(state, config), files)


def _write_ours(state: dict[str, Tensor], config: DecoderConfig, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def gguf_tokenizer_directory(path: Path) -> Path:
    """Where a GGUF file's tokenizer is written out as HF files (``tokenizer.json`` and its
    companions), so that it opens as every other checkpoint's: a cache folder named by the file's
    size and time, written once (atomically) and then reused."""
    from cpmlive.model.decoder.gguf import read_gguf_tokenizer

    stat = path.stat()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpmlive" / "gguf"
    directory = root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (directory / VOCAB_FILE).is_file():
        return directory
    files = read_gguf_tokenizer(path)  # refuses a file it cannot read before anything is written
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        for name, text in files.items():
            (build / name).write_text(text, encoding="utf-8")
        os.replace(build, directory)
    except OSError:  # another process wrote it first
        shutil.rmtree(build, ignore_errors=True)
    return directory


def _write_gguf(state: dict[str, Tensor], config: DecoderConfig, dst: Path, vocab: Path | None,
                kind: str | None = None) -> None:
    from cpmlive.model.decoder.gguf import write_gguf

    if vocab is None:
        raise CpmliveError(f"{dst}: no tokenizer.json beside the weights, and a GGUF file carries its vocabulary: "
                           "pass --vocab tokenizer.json")
    write_gguf(config.to_hf(), ours_to_hf(state, config), vocab.parent, dst,
               dtype=kind or GGUF_DTYPES.get(weights_dtype(state), "f32"))


check_vocab = check_hf_tokenizer  # a tokenizer.json with no more tokens than the embedding has rows


CHECKPOINTS = CheckpointFormats(
    resolve=resolve, read=read_state, headers=lambda source: read_state(source, shapes=True),
    writers={"ours": _write_ours, "hf": _write_hf, "gguf": _write_gguf},
    refusal=f"a decoder checkpoint converts to {' or '.join(FORMATS)}, not {{to!r}}",
    vocab_names=(VOCAB_FILE,), check_vocab=check_vocab,
)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "ours",
            config_path: str | os.PathLike | None = None, vocab_path: str | os.PathLike | None = None,
            dtype: torch.dtype | str | None = None, force: bool = False, dequantize: bool = False) -> Path:
    """:meth:`CheckpointFormats.convert`, where ``--to gguf`` takes GGUF's tensor types as ``dtype``
    (``f32``, ``f16``, ``q8_0``; the stored dtype's by default)."""
    if to != "gguf" or dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, str) and GGUF_KINDS.get(dtype.lower()) not in (None, "f32", "f16"):
            raise CpmliveError(f"--dtype {dtype} is a GGUF tensor type: use it with --to gguf")
        return CHECKPOINTS.convert(src, dst, to, config_path, vocab_path, dtype, force, dequantize)
    kind = GGUF_KINDS.get(str(dtype).lower())
    if kind is None:
        raise CpmliveError(f"--dtype {dtype}: a GGUF file is written as {', '.join(sorted(set(GGUF_KINDS.values())))}")
    writers = {**CHECKPOINTS.writers, "gguf": functools.partial(_write_gguf, kind=kind)}
    return dataclasses.replace(CHECKPOINTS, writers=writers).convert(src, dst, to, config_path, vocab_path, None,
                                                                     force, dequantize)


load_pretrained = CHECKPOINTS.load_pretrained
checkpoint_info = CHECKPOINTS.checkpoint_info

__all__ = ["CHECKPOINTS", "FORMATS", "adapter_modules", "check_vocab", "checkpoint_info", "convert", "hf_to_ours",
           "is_decoder_checkpoint", "load_pretrained", "ours_to_hf", "read_state", "resolve"]
