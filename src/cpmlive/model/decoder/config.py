"""The decoder family's config: one dataclass for every architecture it reads (litgpt's idea: the
differences are fields, not classes), HF's ``config.json`` both ways, and its presets."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from cpmlive.config import StackConfig, read_json_object
from cpmlive.errors import CpmliveError

# The HF ``model_type`` values this family reads, each a config of the same stack.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "glm", "minicpm", "minicpm3")
SLIDING, FULL = "sliding_attention", "full_attention"

# HF key -> ours, shared by every architecture.
HF_KEY_NAMES = {"vocab_size": "vocab_size", "hidden_size": "dim_model", "intermediate_size": "dim_ff",
                "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads", "head_dim": "dim_head", "rms_norm_eps": "eps",
                "max_position_embeddings": "max_length", "tie_word_embeddings": "tie_word_embeddings",
                "sliding_window": "sliding_window", "layer_types": "layer_types"}
MINICPM_KEYS = ("scale_emb", "scale_depth", "dim_model_base")
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# The projection biases each architecture's ``attention_bias`` switches on: (q/k/v, output).
ATTENTION_BIAS = {"llama": (True, True), "mistral": (False, False), "qwen2": (True, False), "qwen3": (True, True),
                  "glm": (True, False), "minicpm": (True, True), "minicpm3": (False, False)}
# Architectures whose attention biases are fixed whatever the config says (Qwen2 always has q/k/v biases).
FIXED_BIAS = {"qwen2": (True, False), "mistral": (False, False)}
# What HF's config class of each architecture assumes for a key its config.json leaves out, where
# that is not Llama's default (transformers 5.25's GlmConfig, MistralConfig, MiniCPM3Config).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "glm": {"attention_bias": True, "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "head_dim": 128,
            "num_key_value_heads": 2, "max_position_embeddings": 131072},
    "mistral": {"sliding_window": 4096, "num_key_value_heads": 8, "max_position_embeddings": 131072},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "minicpm3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                 "kv_lora_rank": 256, "q_lora_rank": 768, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
                 "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256},
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ROPE_KEYS = ("rope_type", "type", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


@dataclass
class DecoderConfig(StackConfig):
    """A pre-norm decoder of RMS norms, rotary attention and a SwiGLU MLP, as Llama made it.

    ``architecture`` is the HF ``model_type`` it reads and writes; the fields say what sets the
    architectures apart: grouped keys (``num_kv_heads``), projection biases, per-head q/k norms
    (Qwen3), partial rotary (GLM-4), sliding windows (Mistral, Qwen2's ``layer_types``), tied or
    untied heads, MiniCPM's muP scales (``scale_emb``, ``scale_depth``, ``dim_model_base``) and
    MiniCPM3's multi-head latent attention (``kv_lora_rank`` set; ``q_lora_rank`` optional).
    """

    architecture: str = "llama"
    vocab_size: int = 32000
    dim_model: int = 4096
    dim_ff: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    dim_head: int = 128
    eps: float = 1e-6
    half: bool = False
    max_length: int = 2048
    model_type: str = "decoder"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    family_name = "decoder"
    positive_fields: ClassVar[tuple[str, ...]] = ("num_kv_heads",)

    def validate(self) -> None:
        super().validate()
        if self.architecture not in ARCHITECTURES:
            raise CpmliveError(f"config: architecture {self.architecture!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        if self.num_heads % self.num_kv_heads:
            raise CpmliveError(f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                               f"{self.num_kv_heads}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise CpmliveError(f"config: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise CpmliveError(f"config: the rotary width {self.rotary_dim} must be a positive even number")
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers
                                             or any(kind not in (SLIDING, FULL) for kind in self.layer_types)):
            raise CpmliveError(f"config: layer_types must list {self.num_layers} of {FULL!r} or {SLIDING!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise CpmliveError(f"config: sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.mla and min(self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank) < 1:
            raise CpmliveError("config: multi-head latent attention needs positive kv_lora_rank, qk_nope_head_dim, "
                               "qk_rope_head_dim and v_head_dim")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise CpmliveError(f"config: rope_scaling type {kind!r} is not supported "
                               f"(supported: {', '.join(ROPE_TYPES)})")

    # ---- what the model reads ----------------------------------------------------------------

    @property
    def prompt_length(self) -> int:
        """No soft prompt: a row is its text's tokens."""
        return 0

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (MiniCPM3)."""
        return self.kv_lora_rank is not None

    @property
    def qk_head_dim(self) -> int:
        """Width of a query/key head (MLA: its no-rope and rope parts together)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.mla else self.dim_head

    @property
    def rotary_dim(self) -> int:
        if self.mla:
            return self.qk_rope_head_dim
        return int(self.dim_head * self.partial_rotary_factor)

    @property
    def dim_attention(self) -> int:
        return self.num_heads * (self.v_head_dim if self.mla else self.dim_head)

    @property
    def dim_kv(self) -> int:
        return self.num_kv_heads * self.dim_head

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention, or None where it sees every earlier key."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def residual_scale(self) -> float:
        """What each residual branch is multiplied by (MiniCPM's ``scale_depth / sqrt(layers)``)."""
        return 1.0 if self.scale_depth is None else self.scale_depth / math.sqrt(self.num_layers)

    @property
    def logit_scale(self) -> float:
        """What the head's input is divided by (MiniCPM's ``hidden / dim_model_base``)."""
        return 1.0 if self.dim_model_base is None else self.dim_model / self.dim_model_base

    # ---- HF's config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, data: dict[str, Any], source: str = "config") -> "DecoderConfig":
        """An HF ``config.json`` of a supported architecture; anything it cannot be refused in one line."""
        architecture = data.get("model_type")
        if architecture not in ARCHITECTURES:
            raise CpmliveError(f"{source}: model_type {architecture!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)}, cpm-ant, cpm-bee, gpt2)")
        data = {**HF_DEFAULTS.get(architecture, {}), **data}
        activation = data.get("hidden_act", "silu")
        if activation != "silu":
            raise CpmliveError(f"{source}: hidden_act {activation!r} is not supported (the decoder family uses silu)")
        mapped: dict[str, Any] = {ours: data[hf] for hf, ours in HF_KEY_NAMES.items() if data.get(hf) is not None}
        mapped["architecture"] = architecture
        heads = mapped.get("num_heads", cls.num_heads)
        mapped.setdefault("num_kv_heads", heads)
        if "dim_head" not in mapped:
            width = mapped.get("dim_model", cls.dim_model)
            if not isinstance(heads, int) or heads <= 0 or width % heads:
                raise CpmliveError(f"{source}: hidden_size {width!r} is not a multiple of "
                                   f"num_attention_heads {heads!r}")
            mapped["dim_head"] = width // heads
        mapped.update(_rope_from_hf(data, source))
        biased = bool(data.get("attention_bias", False))
        if biased and architecture == "minicpm3":
            raise CpmliveError(f"{source}: attention_bias is not supported for minicpm3")
        qkv, out = FIXED_BIAS.get(architecture, (ATTENTION_BIAS[architecture][0] and biased,
                                                 ATTENTION_BIAS[architecture][1] and biased))
        if data.get("mlp_bias"):
            raise CpmliveError(f"{source}: mlp_bias is not supported (no published model of these "
                               "architectures has it)")
        mapped.update(qkv_bias=qkv, out_bias=out,
                      qk_norm=architecture == "qwen3", half=cls.half_in_hf(data))
        if architecture == "qwen2" or architecture == "qwen3":
            if not data.get("use_sliding_window", False):
                mapped.pop("sliding_window", None)
                mapped.pop("layer_types", None)
        if mapped.get("sliding_window") is None:
            mapped.pop("layer_types", None)
        if architecture in ("minicpm", "minicpm3"):
            mapped.update({key: data[key] for key in MINICPM_KEYS if data.get(key) is not None})
            mapped.setdefault("tie_word_embeddings", True)
        if architecture == "minicpm3":
            mapped.update({key: data[key] for key in MLA_KEYS if data.get(key) is not None})
            mapped.setdefault("v_head_dim", mapped["dim_model"] // heads if "dim_model" in mapped else 0)
            mapped["dim_head"] = mapped.get("qk_rope_head_dim", 0)
            mapped["num_kv_heads"] = heads  # latent attention expands keys and values for every head
        if mapped.get("dim_model_base") is None and architecture in ("minicpm", "minicpm3"):
            mapped.pop("dim_model_base", None)
        return cls.from_dict(mapped)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` HF's class for ``architecture`` reads."""
        if self.mask_modules is not None:
            raise CpmliveError("HF's decoder classes need every sub-block (this model has pruned ones)")
        qkv, out = ATTENTION_BIAS[self.architecture]
        mismatched = qkv and out and self.qkv_bias != self.out_bias
        if (self.qkv_bias and not qkv) or (self.out_bias and not out) or mismatched:
            raise CpmliveError(f"HF's {self.architecture} has no config for these attention biases")
        data: dict[str, Any] = {
            "architectures": [HF_CLASSES[self.architecture]], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "hidden_size": self.dim_model, "intermediate_size": self.dim_ff,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.dim_head, "hidden_act": "silu",
            "max_position_embeddings": self.max_length, "rms_norm_eps": self.eps,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.qkv_bias or self.out_bias,
            "mlp_bias": False, "rope_parameters": self.rope_parameters(),
            "rope_theta": self.rope_theta, "dtype": "float16" if self.half else "float32", "use_cache": True,
        }
        if self.rope_scaling is not None:
            data["rope_scaling"] = dict(self.rope_scaling)
        if self.sliding_window is not None:
            data["sliding_window"] = self.sliding_window
            if self.architecture in ("qwen2", "qwen3"):
                data["use_sliding_window"] = True
                data["layer_types"] = [FULL if self.window(i) is None else SLIDING for i in range(self.num_layers)]
                first = next((i for i in range(self.num_layers) if self.window(i) is not None), self.num_layers)
                data["max_window_layers"] = first
        if self.architecture in ("minicpm", "minicpm3"):
            data.update(scale_emb=self.scale_emb, scale_depth=self.scale_depth, dim_model_base=self.dim_model_base)
        if self.mla:
            data.update({key: getattr(self, key) for key in MLA_KEYS})
            data["head_dim"] = self.qk_rope_head_dim
        return data

    def rope_parameters(self) -> dict[str, Any]:
        """HF 5's ``rope_parameters``: the theta, the scaling and the rotary fraction in one object."""
        params: dict[str, Any] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        params.pop("type", None)
        if self.partial_rotary_factor != 1.0:
            params["partial_rotary_factor"] = self.partial_rotary_factor
        return params

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DecoderConfig":
        """Read our ``config.json`` (``model_type`` ``"decoder"``) or an HF one of a supported architecture."""
        data = read_json_object(path)
        if data.get("model_type") == cls.model_type:
            return cls.from_dict(data)
        return cls.from_hf(data, str(path))


def _rope_from_hf(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Our rope fields from HF's ``rope_parameters`` (5.x) or ``rope_theta`` + ``rope_scaling``."""
    params = data.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CpmliveError(f"{source}: rope_parameters must be an object")
    legacy = data.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, dict):
        raise CpmliveError(f"{source}: rope_scaling must be an object or null")
    merged = {**(legacy or {}), **(params or {})}
    theta = merged.pop("rope_theta", data.get("rope_theta", 10000.0))
    partial = merged.pop("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    scaling = {key: value for key, value in merged.items() if key in ROPE_KEYS or key.endswith("_factor")}
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        scaling = None
    return {"rope_theta": float(theta), "rope_scaling": scaling, "partial_rotary_factor": float(partial)}


HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "glm": "GlmForCausalLM", "minicpm": "MiniCPMForCausalLM",
              "minicpm3": "MiniCPM3ForCausalLM"}


def _tiny(architecture: str = "llama", **fields: Any) -> DecoderConfig:
    base = dict(architecture=architecture, vocab_size=512, dim_model=64, dim_ff=160, num_layers=2, num_heads=4,
                num_kv_heads=2, dim_head=16, max_length=256)
    return DecoderConfig(**{**base, **fields})


def _llama(dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int = 32000,
           **fields: Any) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab, dim_model=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                         dim_head=dim // heads, dim_ff=ffn, **fields)


PRESETS: dict[str, Any] = {
    # Shapes of published models (random weights until converted ones are loaded), and a tiny one for tests.
    "llama-2-7b": lambda: _llama(4096, 32, 32, 32, 11008, max_length=4096, eps=1e-5),
    "llama-3.2-1b": lambda: _llama(2048, 16, 32, 8, 8192, vocab=128256, max_length=131072, rope_theta=500000.0,
                                   tie_word_embeddings=True, eps=1e-5,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": lambda: _llama(896, 24, 14, 2, 4864, vocab=151936, architecture="qwen2", qkv_bias=True,
                                   max_length=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "minicpm-2b": lambda: _llama(2304, 40, 36, 36, 5760, vocab=122753, architecture="minicpm", max_length=4096,
                                 scale_emb=12.0, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=True,
                                 eps=1e-5),
    "decoder-tiny": _tiny,
}
