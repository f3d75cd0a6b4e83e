"""GGUF both ways for the decoder family, the way llama.cpp writes and reads it.

``write_gguf`` does what llama.cpp's ``convert_hf_to_gguf.py`` does for these architectures: its
architecture names, metadata keys and tensor names (gguf-py's tensor map), its tensor types (1-D
tensors and norms in F32; Q8_0 falling back to F16 where a row is not whole blocks), the q/k row
permutation of Llama and MiniCPM (HF's rotate-half order to llama.cpp's interleaved pairs), MiniCPM's
scales, Llama 3's rope factors as a tensor, and the tokenizer as metadata: ``gpt2`` (tokens, types,
merges and the pre-tokenizer's name) or ``llama`` (SentencePiece tokens, scores, types), the special
ids, ``add_bos_token`` and the chat template. ``read_gguf`` undoes it for our files and llama.cpp's.

Beyond llama.cpp's converter it writes only what llama.cpp ignores or reads the same way: the merges
of a SentencePiece vocabulary (transformers reads them), ``add_bos_token`` always, Mistral's
``attention.sliding_window``, ``cpmlive.rope_parameters`` (HF's rope scaling, where GGUF's keys cannot
say it all) and, for GLM, the config's head width, context length, epsilon and rope base (llama.cpp's
ChatGLM converter assumes GLM-4-9B's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from cpmlive.errors import CpmliveError

GGUF_TYPES = ("f32", "f16", "q8_0")  # what write_gguf writes
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}
Q = gguf.GGMLQuantizationType
# Tensor types read_gguf reads: F16 and BF16 stay as they are, the block-quantized ones become float32.
KEPT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
DEQUANTIZED_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
READ_TYPES = ", ".join(kind.name for kind in (*KEPT_TYPES, *DEQUANTIZED_TYPES))
# A key of ours: the HF rope scaling, where GGUF's own keys cannot hold it (llama.cpp ignores it).
ROPE_KEY = "cpmlive.rope_parameters"
# The constants llama.cpp's MiniCPM3 graph hard-codes (its converter writes no scales for it).
MINICPM3_SCALES = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}


@dataclass(frozen=True)
class Arch:
    """How one HF ``model_type`` is written: llama.cpp's architecture and what its converter does."""

    gguf_arch: gguf.MODEL_ARCH
    hf_class: str
    layer_names: tuple[str, ...]  # the HF tensors of a layer, less ".weight"/".bias"
    interleave_rope: bool = False  # permute q/k rows to llama.cpp's pairs (LlamaModel.permute)
    writes_vocab_size: bool = False  # the converter writes {arch}.vocab_size
    partial_rotary: bool = False  # GLM: rope.dimension_count = head_dim * partial_rotary_factor

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ATTENTION = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
SWIGLU = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_LAYER = ATTENTION + SWIGLU
GLM_LAYER = ATTENTION + ("mlp.gate_up_proj",)  # llama.cpp's ffn_up holds gate and up, as HF's does
MLA_LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_a_proj", "self_attn.q_a_layernorm",
             "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_a_layernorm",
             "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.down_proj") + SWIGLU
A = gguf.MODEL_ARCH
ARCHS = {
    "llama": Arch(A.LLAMA, "LlamaForCausalLM", LLAMA_LAYER, interleave_rope=True, writes_vocab_size=True),
    "mistral": Arch(A.LLAMA, "MistralForCausalLM", LLAMA_LAYER, interleave_rope=True, writes_vocab_size=True),
    "qwen2": Arch(A.QWEN2, "Qwen2ForCausalLM", LLAMA_LAYER),
    "qwen3": Arch(A.QWEN3, "Qwen3ForCausalLM", LLAMA_LAYER + ("self_attn.q_norm", "self_attn.k_norm")),
    "glm": Arch(A.CHATGLM, "GlmForCausalLM", GLM_LAYER, partial_rotary=True),
    "glm4": Arch(A.GLM4, "Glm4ForCausalLM", GLM_LAYER + ("post_self_attn_layernorm", "post_mlp_layernorm"),
                 partial_rotary=True),
    "minicpm": Arch(A.MINICPM, "MiniCPMForCausalLM", LLAMA_LAYER, interleave_rope=True),
    "minicpm3": Arch(A.MINICPM3, "MiniCPM3ForCausalLM", MLA_LAYER, writes_vocab_size=True),
}
# GGUF architecture -> the HF model_type it reads as (llama.cpp writes Mistral as llama).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "chatglm": "glm", "glm4": "glm4",
               "minicpm": "minicpm", "minicpm3": "minicpm3"}
GLOBAL_NAMES = ("model.embed_tokens", "model.norm", "lm_head")


# ---- writing --------------------------------------------------------------------------------------

def write_gguf(hf_config: dict, state: dict[str, torch.Tensor], tokenizer_dir: Path | None, out: Path,
               dtype: str = "f16") -> None:
    """Write ``state`` (HF names) of the model ``hf_config`` describes, with the tokenizer of
    ``tokenizer_dir``, to ``out`` as llama.cpp's converter would; nothing is left behind on failure."""
    if dtype not in GGUF_TYPES:
        raise CpmliveError(f"GGUF type {dtype!r} is not supported (supported: {', '.join(GGUF_TYPES)})")
    model_type = hf_config.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise CpmliveError(f"model_type {model_type!r} cannot be written to GGUF "
                           f"(supported: {', '.join(ARCHS)})")
    rope = _rope_of(hf_config, 0.5 if arch.partial_rotary else 1.0)
    _check_expressible(model_type, arch, hf_config, rope)
    vocab_size = _vocab_size(hf_config, state)
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    _add_tensors(writer, arch, hf_config, rope, state, dtype)
    _add_metadata(writer, hf_config, tokenizer_dir, out)
    _add_hparams(writer, model_type, arch, hf_config, rope, vocab_size, dtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_type, tokenizer_dir, vocab_size)
    _write_atomically(writer, Path(out))


def _rope_of(config: dict, partial_rotary_factor: float) -> dict[str, Any]:
    """HF's rope settings in one dict (5.x ``rope_parameters`` over 4.x ``rope_scaling``/``rope_theta``);
    ``partial_rotary_factor`` is the architecture's default (GLM's classes rotate half a head)."""
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", partial_rotary_factor))
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", None)) or "default"
    rope.pop("type", None)
    return rope


def _scaling(rope: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}


def _check_expressible(model_type: str, arch: Arch, config: dict, rope: dict[str, Any]) -> None:
    """Refuse what llama.cpp's architecture for ``model_type`` would run differently."""
    where = f"GGUF's {arch.name}"
    if rope["partial_rotary_factor"] != 1.0 and not arch.partial_rotary:
        raise CpmliveError(f"{where} cannot express partial_rotary_factor {rope['partial_rotary_factor']} "
                           "(only glm and glm4 rotate part of a head)")
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise CpmliveError(f"{where} has no sliding window (this {model_type} model uses one)")
    if model_type == "minicpm3":
        differing = {key: config.get(key) for key, value in MINICPM3_SCALES.items() if config.get(key) != value}
        if differing:
            raise CpmliveError(f"{where} fixes scale_emb=12, scale_depth=1.4, dim_model_base=256 "
                               f"(llama.cpp hard-codes them); this model has {differing}")
    kind = rope["rope_type"]
    allowed = {"default", "linear", "yarn", "dynamic"}
    if gguf.MODEL_TENSOR.ROPE_FREQS in gguf.MODEL_TENSORS[arch.gguf_arch]:
        allowed.add("llama3")
    if gguf.MODEL_TENSOR.ROPE_FACTORS_LONG in gguf.MODEL_TENSORS[arch.gguf_arch]:
        allowed.add("longrope")
    if kind not in allowed:
        raise CpmliveError(f"{where} cannot express rope_type {kind!r} (supported: {', '.join(sorted(allowed))})")


def _vocab_size(config: dict, state: dict[str, torch.Tensor]) -> int:
    embedding = state.get("model.embed_tokens.weight")
    if embedding is None:
        raise CpmliveError("the state has no model.embed_tokens.weight (not an HF decoder checkpoint?)")
    rows = int(embedding.shape[0])
    if config.get("vocab_size", rows) != rows:
        raise CpmliveError(f"vocab_size {config.get('vocab_size')} does not match the embedding's {rows} rows")
    return rows


def _add_tensors(writer: gguf.GGUFWriter, arch: Arch, config: dict, rope: dict[str, Any],
                 state: dict[str, torch.Tensor], dtype: str) -> None:
    """llama.cpp's prepare_tensors: the extra rope tensors first, then each HF tensor renamed."""
    tensor_map = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    for name, data in _rope_tensors(arch, config, rope):
        _add_tensor(writer, name, data, dtype)
    tied = config.get("tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if hf_name.endswith(".rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and tied):
            continue
        name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CpmliveError(f"tensor {hf_name!r} has no name in GGUF's {arch.name} "
                               f"(not a {config.get('model_type')} checkpoint?)")
        data = tensor.detach().cpu()
        if data.dtype not in (torch.float16, torch.float32):
            data = data.float()
        if arch.interleave_rope:
            data = _permute_for_rope(hf_name, data, config, to_gguf=True)
        _add_tensor(writer, name, data.numpy(), dtype)


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, dtype: str) -> None:
    """One tensor in the type llama.cpp gives it: norms and vectors F32, the rest ``dtype``."""
    kind = TENSOR_TYPES[dtype]
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        kind = Q.F32
    if kind not in (Q.F32, Q.F16):
        data = data.astype(np.float32, copy=False)
    try:
        packed = gguf.quants.quantize(data, kind)
    except gguf.QuantError:  # rows not a whole number of blocks: llama.cpp falls back to F16
        kind = Q.F16
        packed = gguf.quants.quantize(data, kind)
    writer.add_tensor(name, packed, raw_dtype=kind)


def _permute_for_rope(hf_name: str, data: torch.Tensor, config: dict, to_gguf: bool) -> torch.Tensor:
    """LlamaModel.permute: each head's rows from HF's two halves to llama.cpp's pairs, or back."""
    heads = config["num_attention_heads"]
    if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
        return _permute(data, heads, to_gguf)
    if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
        return _permute(data, config.get("num_key_value_heads") or heads, to_gguf)
    return data


def _permute(data: torch.Tensor, heads: int, to_gguf: bool) -> torch.Tensor:
    half = data.shape[0] // heads // 2
    split = (heads, 2, half) if to_gguf else (heads, half, 2)
    return data.reshape(*split, *data.shape[1:]).transpose(1, 2).reshape(data.shape).contiguous()


def _rope_tensors(arch: Arch, config: dict, rope: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Llama 3's per-frequency factors (``rope_freqs``) and LongRoPE's two lists, as llama.cpp writes them."""
    if rope["rope_type"] == "llama3":
        return [("rope_freqs.weight", _llama3_factors(rope, _head_dim(config)))]
    if rope["rope_type"] == "longrope":
        return [("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)),
                ("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))]
    return []


def _llama3_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    base = rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hparams(writer: gguf.GGUFWriter, model_type: str, arch: Arch, config: dict, rope: dict[str, Any],
                 vocab_size: int, dtype: str) -> None:
    """TextModel.set_gguf_parameters and each architecture's additions."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    _add_rope(writer, rope)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if model_type == "minicpm3":
        writer.add_key_length(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
        writer.add_value_length(config["v_head_dim"])
        if config.get("q_lora_rank") is not None:
            writer.add_q_lora_rank(config["q_lora_rank"])
        writer.add_kv_lora_rank(config["kv_lora_rank"])
        writer.add_rope_dimension_count(config["qk_rope_head_dim"])
    elif config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch.writes_vocab_size:
        writer.add_vocab_size(vocab_size)
    if model_type in ("llama", "mistral"):
        writer.add_rope_dimension_count(_head_dim(config))
    if arch.partial_rotary:
        writer.add_rope_dimension_count(int(_head_dim(config) * rope["partial_rotary_factor"]))
    if model_type == "mistral" and config.get("sliding_window") is not None:
        writer.add_sliding_window(config["sliding_window"])
    if model_type == "minicpm":
        writer.add_embedding_scale(float(config["scale_emb"]))
        writer.add_residual_scale(config["scale_depth"] / config["num_hidden_layers"] ** 0.5)
        writer.add_logit_scale(config["hidden_size"] / config["dim_model_base"])
    writer.add_file_type(FILE_TYPES[dtype])


def _add_rope(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        yarn = {"original_max_position_embeddings": writer.add_rope_scaling_orig_ctx_len,
                "extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
                "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
        for key, add in yarn.items():
            if rope.get(key) is not None:
                add(rope[key])
    elif kind == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if rope.get("original_max_position_embeddings") is not None:
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_freq_base(rope["rope_theta"])
    if kind not in ("default", "linear"):
        writer.add_string(ROPE_KEY, json.dumps(_scaling(rope)))


def _add_metadata(writer: gguf.GGUFWriter, config: dict, tokenizer_dir: Path | None, out: Path) -> None:
    """general.*: the name, size label and sampling defaults llama.cpp's Metadata.load finds."""
    writer.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, experts = writer.get_total_parameter_count()
    named = Path(config.get("_name_or_path") or "").name or None
    metadata = gguf.Metadata.load(None, Path(tokenizer_dir) if tokenizer_dir else None, named, total)
    metadata.name = metadata.name or named or Path(out).stem
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    metadata.set_gguf_meta_model(writer)


def _write_atomically(writer: gguf.GGUFWriter, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)


# ---- the tokenizer, written -------------------------------------------------------------------------

# llama.cpp's get_vocab_base_pre: the sha256 of str(ids) of this text, for the tokenizers whose
# pre-tokenizer we can rebuild (the rest of its table names pre-tokenizers without a regex here).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",  # glm-4-9b-chat
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = None  # GPT-2's own: the ByteLevel pre-tokenizer's built-in regex
# tokenizer.ggml.pre -> the split regex of llama.cpp's llama-vocab.cpp for it, as tokenizer.json writes it.
PRE_REGEXES = {"llama-bpe": LLAMA3_REGEX, "llama3": LLAMA3_REGEX, "smaug-bpe": LLAMA3_REGEX, "dbrx": LLAMA3_REGEX,
               "chatglm-bpe": LLAMA3_REGEX, "glm4": LLAMA3_REGEX, "qwen2": QWEN2_REGEX,
               "deepseek-r1-qwen": QWEN2_REGEX, "stablelm2": QWEN2_REGEX, "gpt-2": GPT2_REGEX}
# A tokenizer llama.cpp does not know is written as the first of these with its regex.
REGEX_PRES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt-2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
T = gguf.TokenType


def _add_tokenizer(writer: gguf.GGUFWriter, model_type: str, tokenizer_dir: Path | None, vocab_size: int) -> None:
    if tokenizer_dir is None:
        writer.add_tokenizer_model("none")
        return
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise CpmliveError(f"{tokenizer_dir}: no tokenizer.json (GGUF needs the vocabulary)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CpmliveError(f"{path}: a {model.get('type')} tokenizer cannot be written to GGUF "
                           "(supported: byte-level BPE, SentencePiece-style BPE with byte fallback)")
    sentencepiece = bool(model.get("byte_fallback"))
    if not sentencepiece and "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise CpmliveError(f"{path}: a BPE tokenizer neither byte-level nor with byte fallback cannot be "
                           "written to GGUF")
    tokens, types, scores = _vocabulary(data, vocab_size, sentencepiece, path)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=vocab_size)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(data))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(path))
    writer.add_token_list(tokens)
    if sentencepiece:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if model_type in ("glm", "glm4"):  # llama.cpp's GLM vocabularies: these by name, and never a BOS
        _glm_special_tokens(special, tokens, model_type)
        special.add_special_token["bos"] = False
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _vocabulary(data: dict, vocab_size: int, sentencepiece: bool, path: Path) -> tuple[list[str], list[int],
                                                                                           list[float]]:
    """Tokens by id with llama.cpp's types (and SentencePiece scores), padded with [PAD{id}] to the embedding."""
    by_id = {index: token for token, index in data["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise CpmliveError(f"{path}: the tokenizer has ids up to {max(by_id)}, past the embedding's {vocab_size} rows")
    ranks = _merge_ranks(data["model"].get("merges") or []) if sentencepiece else {}
    unknown = data["model"].get("unk_token")
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
            continue
        kind, score = _token_kind(token, added.get(index), unknown, ranks, sentencepiece)
        tokens.append(token.replace("\u2581", " ") if kind == T.USER_DEFINED and not sentencepiece else token)
        types.append(kind)
        scores.append(score)
    return tokens, types, scores


def _token_kind(token: str, added: dict | None, unknown: str | None, ranks: dict[str, int],
                sentencepiece: bool) -> tuple[int, float]:
    if added is not None:
        looks_special = token.startswith("<|") and token.endswith("|>")
        return (T.CONTROL if added.get("special") or looks_special else T.USER_DEFINED), -1000.0
    if sentencepiece and token == unknown:
        return T.UNKNOWN, 0.0
    if sentencepiece and BYTE_TOKEN.fullmatch(token):
        return T.BYTE, 0.0
    # SentencePiece's BPE scores a piece by its merge order, best first, as llama.cpp's merging expects.
    return T.NORMAL, -float(ranks[token]) if token in ranks else 0.0


def _merge_ranks(merges: list) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank + 1)
    return ranks


def _adds_space_prefix(data: dict) -> bool:
    """Whether the SentencePiece-style tokenizer prefixes '▁' (a Metaspace or a Prepend normalizer)."""
    text = json.dumps([data.get("pre_tokenizer"), data.get("normalizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def _pre_name(path: Path) -> str:
    """tokenizer.ggml.pre as llama.cpp picks it (hash of the ids of CHECK_TEXT), else by the split regex."""
    ids = Tokenizer.from_file(str(path)).encode(CHECK_TEXT).ids
    known = KNOWN_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if known is not None:
        return known
    regex = _split_regex(json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer"))
    if regex is False or regex not in REGEX_PRES:
        raise CpmliveError(f"{path}: llama.cpp knows neither this tokenizer nor its pre-tokenizer "
                           f"(supported regexes: those of {', '.join(REGEX_PRES.values())})")
    name = REGEX_PRES[regex]
    warnings.warn(f"{path}: a tokenizer llama.cpp does not know; writing tokenizer.ggml.pre {name!r}, "
                  "which splits text with the same regex", stacklevel=4)
    return name


def _split_regex(pre: dict | None) -> str | None | bool:
    """The regex a byte-level pre-tokenizer splits with; None for ByteLevel's own (GPT-2's); False if other."""
    if pre is None:
        return False
    if pre.get("type") == "ByteLevel":
        return None if pre.get("use_regex", True) else False
    parts = pre.get("pretokenizers") or []
    kinds = [part.get("type") for part in parts]
    if pre.get("type") != "Sequence" or kinds != ["Split", "ByteLevel"] or parts[1].get("use_regex", True):
        return False
    split = parts[0]
    if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
        return False
    return split["pattern"]["Regex"]


def _glm_special_tokens(special: gguf.SpecialVocab, tokens: list[str], model_type: str) -> None:
    """ChatGLMModel's and Glm4Model's set_vocab: where the tokenizer files name none, these tokens."""
    ids = {token: index for index, token in enumerate(tokens)}
    named = [("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>")]
    if model_type == "glm4":
        named.append(("bos", "<|endoftext|>"))
    for kind, token in named:
        if token in ids:
            special._set_special_token(kind, ids[token])


# ---- reading --------------------------------------------------------------------------------------

def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """The HF config.json, HF-named tensors and tokenizer files (``tokenizer.json``,
    ``tokenizer_config.json``, ``generation_config.json``, as text) a GGUF of this family holds."""
    path = Path(path)
    meta, raw, arch_name, model_type = _open(path)
    config = _config_from(meta, raw, arch_name, model_type, path)
    state = _state_from(raw, arch_name, ARCHS[model_type], config, path)
    return config, state, _tokenizer_files(meta, config, path)


def read_gguf_tokenizer(path: Path) -> dict[str, str]:
    """read_gguf's tokenizer files alone (no weight is read)."""
    path = Path(path)
    meta, raw, arch_name, model_type = _open(path)
    return _tokenizer_files(meta, _config_from(meta, raw, arch_name, model_type, path), path)


def _open(path: Path) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """(metadata, tensors by name, GGUF architecture, HF model_type) of a GGUF of this family."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise CpmliveError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = {name: _value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch_name = meta.get("general.architecture")
    if arch_name not in MODEL_TYPES:
        raise CpmliveError(f"{path}: GGUF architecture {arch_name!r} is not supported "
                           f"(supported: {', '.join(MODEL_TYPES)})")
    model_type = MODEL_TYPES[arch_name]
    if model_type == "llama" and f"{arch_name}.attention.sliding_window" in meta:
        model_type = "mistral"
    return meta, {tensor.name: tensor for tensor in reader.tensors}, arch_name, model_type


def _value(field: Any) -> Any:
    """A field's value; a float32 scalar as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))
    return value


def _key(meta: dict, name: str, path: Path, default: Any = ...) -> Any:
    if name in meta:
        return meta[name]
    if default is ...:
        raise CpmliveError(f"{path}: the GGUF lacks {name}")
    return default


def _config_from(meta: dict, raw: dict, arch_name: str, model_type: str, path: Path) -> dict[str, Any]:
    """An HF config.json for the model (transformers 5's keys, and 4.x's rope_theta/rope_scaling)."""
    def key(name: str, default: Any = ...) -> Any:
        return _key(meta, f"{arch_name}.{name}", path, default)

    if "token_embd.weight" not in raw:
        raise CpmliveError(f"{path}: the GGUF has no token_embd.weight")
    heads, hidden = key("attention.head_count"), key("embedding_length")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise CpmliveError(f"{path}: per-layer head counts are not supported")
    embedding = raw["token_embd.weight"]
    vocab = int(embedding.shape[1])
    config: dict[str, Any] = {
        "architectures": [ARCHS[model_type].hf_class], "model_type": model_type, "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "output.weight" not in raw,
        "dtype": {Q.F16: "float16", Q.BF16: "bfloat16"}.get(embedding.tensor_type, "float32"),
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = meta[f"tokenizer.ggml.{gguf_key}"]
    head_dim = key("attention.key_length", None) or hidden // heads
    if model_type != "minicpm3":
        config["head_dim"] = head_dim
    if model_type != "mistral" and model_type != "qwen2":  # Qwen2 always has them, Mistral never
        config["attention_bias"] = "blk.0.attn_q.bias" in raw or "blk.0.attn_qkv.bias" in raw
    if model_type in ("llama", "mistral", "minicpm"):
        config["mlp_bias"] = "blk.0.ffn_up.bias" in raw
        if key("rope.dimension_count", head_dim) != head_dim:
            raise CpmliveError(f"{path}: a {arch_name} rotating part of a head is not supported")
    if model_type == "mistral":
        config["sliding_window"] = key("attention.sliding_window")
    config.update(_architecture_extras(model_type, key, config))
    rope = _rope_from(meta, raw, arch_name, config, path)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_parameters"] = rope
    scaling = _scaling(rope)
    if scaling["rope_type"] != "default":
        config["rope_scaling"] = scaling
    return config


def _architecture_extras(model_type: str, key: Callable[..., Any], config: dict) -> dict[str, Any]:
    if model_type == "minicpm":
        return {"scale_emb": key("embedding_scale"),
                # stored as scale_depth / sqrt(layers) in float32: the decimal it came from
                "scale_depth": float(str(np.float32(key("residual_scale") * config["num_hidden_layers"] ** 0.5))),
                "dim_model_base": round(config["hidden_size"] / key("logit_scale"))}
    if model_type == "minicpm3":
        rotary = key("rope.dimension_count")
        return {"q_lora_rank": key("attention.q_lora_rank", None), "kv_lora_rank": key("attention.kv_lora_rank"),
                "qk_rope_head_dim": rotary, "qk_nope_head_dim": key("attention.key_length") - rotary,
                "v_head_dim": key("attention.value_length", config["hidden_size"] // config["num_attention_heads"]),
                "head_dim": rotary, **MINICPM3_SCALES}
    return {}


def _rope_from(meta: dict, raw: dict, arch_name: str, config: dict, path: Path) -> dict[str, Any]:
    """HF 5's rope_parameters from the GGUF's rope keys (ours first) and rope tensors."""
    rope: dict[str, Any] = {"rope_type": "default"}
    kind = meta.get(f"{arch_name}.rope.scaling.type")
    if ROPE_KEY in meta:
        rope = json.loads(meta[ROPE_KEY])
    elif kind in ("linear", "yarn"):
        rope = {"rope_type": kind, "factor": meta[f"{arch_name}.rope.scaling.factor"]}
        yarn = {"original_context_length": "original_max_position_embeddings",
                "yarn_ext_factor": "extrapolation_factor", "yarn_attn_factor": "attention_factor",
                "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
        rope.update({hf: meta[f"{arch_name}.rope.scaling.{name}"] for name, hf in yarn.items()
                     if kind == "yarn" and f"{arch_name}.rope.scaling.{name}" in meta})
    elif "rope_factors_long.weight" in raw:
        rope = {"rope_type": "longrope", "long_factor": _floats(raw["rope_factors_long.weight"], path),
                "short_factor": _floats(raw["rope_factors_short.weight"], path),
                "original_max_position_embeddings": meta.get(f"{arch_name}.rope.scaling.original_context_length",
                                                             config["max_position_embeddings"])}
    rope["rope_theta"] = float(meta.get(f"{arch_name}.rope.freq_base", 10000.0))
    if "rope_freqs.weight" in raw and ROPE_KEY not in meta:
        rope.update(_llama3_from(_floats(raw["rope_freqs.weight"], path), rope["rope_theta"], config, path))
    if arch_name in ("chatglm", "glm4"):  # GLM rotates part of each head
        rotary = meta.get(f"{arch_name}.rope.dimension_count", config["head_dim"] // 2)
        rope["partial_rotary_factor"] = rotary / config["head_dim"]
    return rope


def _floats(tensor: Any, path: Path) -> list[float]:
    return [float(value) for value in _dequantize(tensor, path).flatten().tolist()]


def _llama3_from(factors: list[float], theta: float, config: dict, path: Path) -> dict[str, Any]:
    """Llama 3's scaling from llama.cpp's rope_freqs (which it computes with Llama 3's published defaults)."""
    rope = {"rope_type": "llama3", "factor": max(factors), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": theta}
    expected = _llama3_factors(rope, config["head_dim"])
    if len(expected) != len(factors) or not np.allclose(expected, factors, rtol=1e-4):
        raise CpmliveError(f"{path}: rope_freqs that are not Llama 3's scaling are not supported")
    rope.pop("rope_theta")
    return rope


def _state_from(raw: dict, arch_name: str, arch: Arch, config: dict, path: Path) -> dict[str, torch.Tensor]:
    """The HF-named tensors, dequantized where block-quantized, q/k rows back in HF's order."""
    names = _hf_names(arch, config["num_hidden_layers"])
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight") \
                or name.endswith(".attn_rot_embd.weight"):
            continue
        data = _dequantize(tensor, path)
        base, _, suffix = name.rpartition(".")
        if base.endswith(".attn_qkv"):
            state.update(_split_qkv(names, base, suffix, data, config))
            continue
        if base not in names:
            raise CpmliveError(f"{path}: tensor {name!r} is not one of GGUF's {arch_name} we read")
        hf_name = f"{names[base]}.{suffix}"
        state[hf_name] = _permute_for_rope(hf_name, data, config, to_gguf=False) if arch.interleave_rope else data
    return state


def _hf_names(arch: Arch, layers: int) -> dict[str, str]:
    """GGUF tensor name (less its suffix) -> HF name, from gguf-py's map for this architecture."""
    tensor_map = gguf.get_tensor_name_map(arch.gguf_arch, layers)
    hf_names = [*GLOBAL_NAMES, *(f"model.layers.{index}.{part}" for index in range(layers)
                                 for part in arch.layer_names)]
    return {tensor_map.get_name(hf_name): hf_name for hf_name in hf_names if tensor_map.get_name(hf_name)}


def _split_qkv(names: dict[str, str], base: str, suffix: str, data: torch.Tensor,
               config: dict) -> dict[str, torch.Tensor]:
    """ChatGLM's fused query_key_value, as q, k and v."""
    width = config["head_dim"]
    sizes = [config["num_attention_heads"] * width] + [config["num_key_value_heads"] * width] * 2
    layer = names[base.replace(".attn_qkv", ".attn_q")].rpartition(".")[0]
    parts = torch.split(data, sizes, dim=0)
    return {f"{layer}.{part}_proj.{suffix}": chunk.clone() for part, chunk in zip("qkv", parts)}


def _dequantize(tensor: Any, path: Path) -> torch.Tensor:
    kind = tensor.tensor_type
    shape = tuple(int(size) for size in reversed(tensor.shape.tolist()))
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape)
    if kind == Q.BF16:
        return torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    if kind in DEQUANTIZED_TYPES:
        return torch.from_numpy(gguf.quants.dequantize(tensor.data, kind).astype(np.float32)).reshape(shape)
    raise CpmliveError(f"{path}: tensor {tensor.name!r} is of type {kind.name}, which is not supported "
                       f"(supported: {READ_TYPES})")


# ---- the tokenizer, read ----------------------------------------------------------------------------

def _tokenizer_files(meta: dict, config: dict, path: Path) -> dict[str, str]:
    """tokenizer.json rebuilt from the vocabulary, tokenizer_config.json and generation_config.json."""
    files = {"generation_config.json": json.dumps(_generation_config(meta), indent=2)}
    model = meta.get("tokenizer.ggml.model", "none")
    if model == "none":
        return files
    if model not in ("gpt2", "llama"):
        raise CpmliveError(f"{path}: GGUF tokenizer {model!r} is not supported (supported: gpt2, llama)")
    tokens = _key(meta, "tokenizer.ggml.tokens", path)
    if len(tokens) != config["vocab_size"]:
        raise CpmliveError(f"{path}: {len(tokens)} tokens do not match the embedding's {config['vocab_size']} rows")
    types = meta.get("tokenizer.ggml.token_type") or [T.NORMAL] * len(tokens)
    special = _special_tokens(meta, tokens)
    tokenizer = _byte_level(meta, tokens, path) if model == "gpt2" else _sentencepiece(meta, tokens, types)
    for token, kind in zip(tokens, types):
        if kind == T.CONTROL:
            tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        elif kind == T.USER_DEFINED:
            tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
    tokenizer.post_processor = _post_processor(meta, special, model)
    files["tokenizer.json"] = tokenizer.to_str()
    files["tokenizer_config.json"] = json.dumps(_tokenizer_config(meta, special, config), indent=2,
                                                ensure_ascii=False)
    return files


def _special_tokens(meta: dict, tokens: list[str]) -> dict[str, tuple[str, int]]:
    found = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= index < len(tokens):
            found[name] = (tokens[index], index)
    return found


def _byte_level(meta: dict, tokens: list[str], path: Path) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_REGEXES:
        raise CpmliveError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                           f"{', '.join(PRE_REGEXES)})")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    ignore = PRE_REGEXES[pre] == LLAMA3_REGEX  # llama.cpp takes a whole word in the vocabulary as one token
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore))
    regex = PRE_REGEXES[pre]
    if regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    """SentencePiece-style BPE with byte fallback: the merges written, or those the scores imply."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    if not merges:
        merges = _merges_from_scores(tokens, types, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                     unk_token=tokens[unknown] if unknown is not None else None))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                       prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Each normal piece's splits into two pieces, the best-scored pieces' first (transformers' rule)."""
    index = {token: position for position, token in enumerate(tokens) if types[position] == T.NORMAL}
    found = []
    for token, position in index.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                found.append((-scores[position], index[left], index[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _post_processor(meta: dict, special: dict[str, tuple[str, int]], model: str) -> Any:
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama") and "bos" in special
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and "eos" in special
    if not add_bos and not add_eos:
        return processors.ByteLevel(trim_offsets=False) if model == "gpt2" else None
    first = [special["bos"][0]] if add_bos else []
    last = [special["eos"][0]] if add_eos else []
    single = " ".join([*first, "$A", *last])
    pair = " ".join([*first, "$A", *last, *first, "$B", *last])
    used = [special[name] for name, on in (("bos", add_bos), ("eos", add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)


def _tokenizer_config(meta: dict, special: dict[str, tuple[str, int]], config: dict) -> dict[str, Any]:
    data: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                            "model_max_length": config["max_position_embeddings"]}
    data.update({f"{name}_token": token for name, (token, _) in special.items()})
    data["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama"))
    data["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if "tokenizer.chat_template" in meta:
        data["chat_template"] = meta["tokenizer.chat_template"]
    return data


def _generation_config(meta: dict) -> dict[str, Any]:
    """Special ids and llama.cpp's sampling defaults (general.sampling.*) as HF's generation config."""
    data: dict[str, Any] = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            data[hf_key] = meta[f"tokenizer.ggml.{key}"]
    # llama.cpp's end-of-turn and end-of-message tokens also end generation, as HF's eos lists say
    ends = [meta[f"tokenizer.ggml.{key}"] for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if f"tokenizer.ggml.{key}" in meta]
    if len(set(ends)) > 1:
        data["eos_token_id"] = list(dict.fromkeys(ends))
    sampling = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    data.update({hf: meta[f"general.sampling.{key}"] for key, hf in sampling.items()
                 if f"general.sampling.{key}" in meta})
    return data
