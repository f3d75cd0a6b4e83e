"""Model configuration and the named presets (the one place presets live).

``AntConfig`` uses the OpenBMB key names (``dim_model``, ``num_heads`` ...), so an OpenBMB
``config.json`` reads as is; :meth:`AntConfig.from_hf` maps HF ``CpmAntConfig`` names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpmlive.errors import CpmliveError
from cpmlive.utils import dataclass_from_dict

HF_KEY_NAMES = {
    "hidden_size": "dim_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "max_position_embeddings": "max_length",
}


QUANT_BITS = (8, 4)
QUANT_METHODS = ("rtn", "gptq", "awq")
QUANT_ACTIVATIONS = ("none", "int8")
DEFAULT_GROUP_SIZE = 64


@dataclass
class QuantConfig:
    """How a checkpoint's weights are quantized (``config.json``'s ``quantization``).

    ``bits`` 8: int8 per output channel; 4: int4 in groups of ``group_size`` inputs.
    ``activations`` ``"int8"``: products also quantize their input per token (dynamic W8A8;
    8 bits only). ``embedding``: the tied embedding / head is int8 per row too.
    ``method`` and ``calibration`` record how the codes were chosen (``cpmlive info`` shows them);
    ``source`` names the float weights they came from.
    """

    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"
    activations: str = "none"
    embedding: bool = True
    calibration: dict[str, Any] | None = None
    source: str | None = None  # fingerprint of the float weights (adapters trained on them still load)

    def __post_init__(self) -> None:
        if self.bits == 4 and self.group_size is None:
            self.group_size = DEFAULT_GROUP_SIZE
        self.validate()

    def validate(self) -> None:
        if self.bits not in QUANT_BITS or isinstance(self.bits, bool):
            raise CpmliveError(f"quantization: bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise CpmliveError("quantization: 8 bits are per output channel; group_size is for 4 bits")
        if self.bits == 4 and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                               or self.group_size < 2 or self.group_size % 2):
            raise CpmliveError(f"quantization: group_size must be an even integer >= 2, got {self.group_size!r}")
        if self.method not in QUANT_METHODS:
            raise CpmliveError(f"quantization: method must be one of {', '.join(QUANT_METHODS)}, "
                               f"got {self.method!r}")
        if self.activations not in QUANT_ACTIVATIONS:
            raise CpmliveError(f"quantization: activations must be one of {', '.join(QUANT_ACTIVATIONS)}, "
                               f"got {self.activations!r}")
        if self.activations == "int8" and self.bits != 8:
            raise CpmliveError("quantization: int8 activations go with 8-bit weights")
        if not isinstance(self.embedding, bool):
            raise CpmliveError(f"quantization: embedding must be true or false, got {self.embedding!r}")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise CpmliveError("quantization: calibration must be an object")

    @property
    def scheme(self) -> str:
        """A short name: ``int8``, ``w8a8`` or ``int4-g64``."""
        if self.bits == 4:
            return f"int4-g{self.group_size}"
        return "w8a8" if self.activations == "int8" else "int8"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        return dataclass_from_dict(cls, data, "quantization", "config: quantization must be an object")


MOE_ROUTERS = ("similarity", "mlp", "oracle")


@dataclass
class MoEConfig:
    """A MoEfied FFN (``config.json``'s ``moe``): ``experts`` equal blocks of neurons, ``top_k`` of
    them per token, chosen by ``router`` (``similarity``: the input against each expert's mean
    ``w_0`` row; ``mlp``: a trained ``d -> router_hidden -> experts`` predictor; ``oracle``: the
    true activation norms, for analysis)."""

    experts: int = 16
    top_k: int = 4
    router: str = "similarity"
    router_hidden: int = 128

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "router_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CpmliveError(f"moe: {name} must be a positive integer, got {value!r}")
        if self.top_k > self.experts:
            raise CpmliveError(f"moe: top_k must be in [1, {self.experts}], got {self.top_k}")
        if self.router not in MOE_ROUTERS:
            raise CpmliveError(f"moe: router must be one of {', '.join(MOE_ROUTERS)}, got {self.router!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        return dataclass_from_dict(cls, data, "moe", "config: moe must be an object")


class StackConfig:
    """What CPM-Ant's and CPM-Bee's configs share: both are dataclasses with OpenBMB's
    ``num_heads``, ``dim_head``, ``mask_modules`` and a ``quantization``."""

    @property
    def dim_attention(self) -> int:
        """Width of q/k/v: may differ from ``dim_model`` in pruned models."""
        return self.num_heads * self.dim_head

    def has_attention(self, layer: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer][0]

    def has_ffn(self, layer: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer][1]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def dequantized(self) -> Any:
        """The same architecture with float weights."""
        return dataclasses.replace(self, quantization=None)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if strict and unknown:
            raise CpmliveError(f"config: unknown key {unknown[0]!r}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CpmliveError(f"config: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")


@dataclass
class AntConfig(StackConfig):
    """Every CPM-Ant hyper-parameter, named as in OpenBMB's ``cpm-ant-10b.json``.

    ``mask_modules`` is ``None`` for a full model, or one ``[attention_removed, ffn_removed]``
    pair per layer, as in the compressed CPM-Ant checkpoints (spec section 8).
    """

    vocab_size: int = 30720
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 512
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    half: bool = True
    prompt_types: int = 32
    prompt_length: int = 32
    segment_types: int = 32
    mask_modules: list[list[bool]] | None = None
    max_length: int = 1024
    model_type: str = "cpm-ant"
    quantization: QuantConfig | None = None
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig.from_dict(self.quantization)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head",
                    "position_bias_num_buckets", "prompt_types", "prompt_length", "segment_types",
                    "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CpmliveError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("eps", "dropout_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CpmliveError(f"config: {name} must be a number, got {value!r}")
        if not self.eps > 0:
            raise CpmliveError(f"config: eps must be > 0, got {self.eps!r}")
        if not 0 <= self.dropout_p < 1:
            raise CpmliveError(f"config: dropout_p must be in [0, 1), got {self.dropout_p!r}")
        if not isinstance(self.position_bias_max_distance, int) or self.position_bias_max_distance <= 0:
            raise CpmliveError(f"config: position_bias_max_distance must be a positive integer, "
                               f"got {self.position_bias_max_distance!r}")
        if not isinstance(self.half, bool):
            raise CpmliveError(f"config: half must be true or false, got {self.half!r}")
        if self.max_length <= self.prompt_length + 1:
            raise CpmliveError(f"config: max_length ({self.max_length}) must exceed prompt_length + 1 "
                               f"({self.prompt_length + 1})")
        if self.mask_modules is not None:
            if len(self.mask_modules) != self.num_layers:
                raise CpmliveError(
                    f"config: mask_modules has {len(self.mask_modules)} entries for "
                    f"{self.num_layers} layers")
            if any(len(pair) != 2 for pair in self.mask_modules):
                raise CpmliveError("config: every mask_modules entry must be [attention_removed, ffn_removed]")
        if self.model_type != "cpm-ant":
            raise CpmliveError(f"config: model_type {self.model_type!r} is not a CPM-Ant config")
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise CpmliveError("config: quantization must be an object")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise CpmliveError("config: moe must be an object")
        if self.moe is not None and self.dim_ff % self.moe.experts:
            raise CpmliveError(f"moe: {self.moe.experts} experts do not split dim_ff {self.dim_ff} evenly")
        if self.moe is not None and self.quantization is not None:
            raise CpmliveError("config: a MoEfied model cannot be quantized (yet): quantize before moefying")

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("quantization", "moe"):
            if data[name] is None:
                del data[name]  # plain checkpoints keep the config.json they always had
        return data

    @classmethod
    def from_openbmb(cls, data: dict[str, Any]) -> "AntConfig":
        """An OpenBMB json: extra keys are ignored, as OpenBMB's ``**kwargs`` does."""
        return cls.from_dict(data, strict=False)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "AntConfig":
        mapped = {HF_KEY_NAMES.get(k, k): v for k, v in data.items()}
        mapped.pop("model_type", None)
        mapped["half"] = str(data.get("torch_dtype", data.get("dtype", "float32"))) in ("float16", "torch.float16")
        return cls.from_dict(mapped, strict=False)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` for HF ``CpmAntForCausalLM`` (which has no ``mask_modules``)."""
        reverse = {v: k for k, v in HF_KEY_NAMES.items()}
        skip = {"mask_modules", "half", "model_type", "quantization", "moe"}
        out = {reverse.get(k, k): v for k, v in self.to_dict().items() if k not in skip}
        out.update(model_type="cpmant", architectures=["CpmAntForCausalLM"], init_std=1.0,
                   use_cache=True, tie_word_embeddings=False,
                   dtype="float16" if self.half else "float32")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AntConfig":
        """Read our, OpenBMB's or HF's ``config.json`` (told apart by their key names)."""
        data = read_json_config(path)
        if data.get("model_type") == "cpmant" or "hidden_size" in data:
            return cls.from_hf(data)
        if data.get("model_type", "cpm-ant") == "cpm-ant" and set(data) <= {f.name for f in dataclasses.fields(cls)}:
            return cls.from_dict(data)
        return cls.from_openbmb(data)


def _spread_mask(num_layers: int, keep_attention: int, keep_ffn: int) -> list[list[bool]]:
    """Remove sub-blocks evenly over depth (the published counts; the exact layers come with
    the checkpoint's own config, which always wins)."""

    def removed(keep: int) -> set[int]:
        drop = num_layers - keep
        return {int((i + 0.5) * num_layers / drop) for i in range(drop)} if drop else set()

    attention, ffn = removed(keep_attention), removed(keep_ffn)
    return [[i in attention, i in ffn] for i in range(num_layers)]


def _ant(**overrides: Any) -> AntConfig:
    return AntConfig(**overrides)


PRESETS: dict[str, Any] = {
    "ant-10b": lambda: _ant(),
    "ant-7b": lambda: _ant(mask_modules=_spread_mask(48, 37, 32)),
    "ant-3b": lambda: _ant(num_heads=20, dim_ff=3735, mask_modules=_spread_mask(48, 37, 32)),
    "ant-1b": lambda: _ant(num_heads=16, dim_ff=700, mask_modules=_spread_mask(48, 25, 21)),
    "ant-300m": lambda: _ant(num_heads=4, dim_ff=350, mask_modules=_spread_mask(48, 25, 21)),
    "tiny": lambda: _ant(dim_model=64, dim_ff=128, num_layers=2, num_heads=4, dim_head=16,
                         half=False),
}


@dataclass
class BeeConfig(StackConfig):
    """Every CPM-Bee hyper-parameter, named as in OpenBMB's ``cpm-bee-10b.json``.

    ``mask_modules`` as for CPM-Ant: the compressed CPM-Bee 5B/2B/1B keep 24 layers and drop
    attention from some of them.
    """

    vocab_size: int = 86583
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    half: bool = True
    mask_modules: list[list[bool]] | None = None
    max_length: int = 2048
    model_type: str = "cpm-bee"
    quantization: QuantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig.from_dict(self.quantization)
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head",
                    "position_bias_num_buckets", "position_bias_num_segment_buckets",
                    "position_bias_max_distance", "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CpmliveError(f"config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise CpmliveError(f"config: eps must be a number > 0, got {self.eps!r}")
        if not isinstance(self.dropout_p, (int, float)) or not 0 <= self.dropout_p < 1:
            raise CpmliveError(f"config: dropout_p must be in [0, 1), got {self.dropout_p!r}")
        if not isinstance(self.half, bool):
            raise CpmliveError(f"config: half must be true or false, got {self.half!r}")
        if self.dim_model % 2:
            raise CpmliveError(f"config: dim_model must be even (the ext-token rotation pairs halves), got {self.dim_model}")
        if self.position_bias_num_segment_buckets < MAX_SEGMENT_RELATION + 1:
            raise CpmliveError(f"config: position_bias_num_segment_buckets must be at least {MAX_SEGMENT_RELATION + 1}")
        if self.mask_modules is not None and (len(self.mask_modules) != self.num_layers
                                              or any(len(pair) != 2 for pair in self.mask_modules)):
            raise CpmliveError(f"config: mask_modules needs one [attention_removed, ffn_removed] pair per layer "
                               f"({self.num_layers})")
        if self.model_type != "cpm-bee":
            raise CpmliveError(f"config: model_type {self.model_type!r} is not a CPM-Bee config")
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise CpmliveError("config: quantization must be an object")

    @property
    def moe(self) -> None:
        """CPM-Bee blocks are dense (``moefy`` is CPM-Ant's)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BeeConfig":
        """Read our or OpenBMB's ``config.json`` (OpenBMB's has no ``model_type``)."""
        data = read_json_config(path)
        if data.get("model_type", "cpm-bee") != "cpm-bee":
            raise CpmliveError(f"{path}: model_type {data['model_type']!r} is not a CPM-Bee config")
        return cls.from_dict(data, strict="model_type" in data)


# The deepest segment relation: (7 up, 7 down) is bucket 7 * 8 + 7 + 1 (spec section 7.4).
MAX_SEGMENT_RELATION = 64


def _bee(**overrides: Any) -> BeeConfig:
    return BeeConfig(**overrides)


# The compressed CPM-Bee sizes (CPM-Bee README): 24 layers, 19 with attention; attention width
# and dim_ff shrink, dim_model stays. The exact layers come with a checkpoint's own config.
BEE_PRESETS: dict[str, Any] = {
    "bee-10b": lambda: _bee(),
    "bee-5b": lambda: _bee(num_layers=24, mask_modules=_spread_mask(24, 19, 24)),
    "bee-2b": lambda: _bee(num_layers=24, num_heads=16, dim_ff=5120, mask_modules=_spread_mask(24, 19, 24)),
    "bee-1b": lambda: _bee(num_layers=24, num_heads=10, dim_ff=1024, mask_modules=_spread_mask(24, 19, 24)),
    # The published 3B config leaves out the vocabulary's last three tokens (spec section 7.1).
    "bee-3b": lambda: _bee(vocab_size=86580, dim_model=2560, dim_ff=3072, num_layers=32, dim_head=80),
    "bee-tiny": lambda: _bee(vocab_size=86583, dim_model=32, dim_ff=160, num_layers=3, num_heads=4, dim_head=16,
                             half=False),
}


# HF ``GPT2Config`` key -> ours (``n_inner`` may be null: 4 x n_embd).
GPT2_KEY_NAMES = {"n_embd": "dim_model", "n_layer": "num_layers", "n_head": "num_heads", "n_positions": "max_length",
                  "n_inner": "dim_ff", "layer_norm_epsilon": "eps", "vocab_size": "vocab_size"}


@dataclass
class Cpm1Config(StackConfig):
    """CPM-1 (TsinghuaAI CPM-Generate): a GPT-2 decoder, named as our other configs.

    Pre-LN blocks with LayerNorms and biases, learned absolute positions, ``gelu_new`` and a head
    tied to the embedding. No soft prompt (``prompt_length`` is 0) and no segments.
    """

    vocab_size: int = 30000
    dim_model: int = 2560
    dim_ff: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    dim_head: int = 80
    dropout_p: float = 0.0
    eps: float = 1e-5
    half: bool = True
    mask_modules: list[list[bool]] | None = None
    max_length: int = 1024
    model_type: str = "cpm1"
    quantization: QuantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig.from_dict(self.quantization)
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CpmliveError(f"config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise CpmliveError(f"config: eps must be a number > 0, got {self.eps!r}")
        if not isinstance(self.dropout_p, (int, float)) or not 0 <= self.dropout_p < 1:
            raise CpmliveError(f"config: dropout_p must be in [0, 1), got {self.dropout_p!r}")
        if not isinstance(self.half, bool):
            raise CpmliveError(f"config: half must be true or false, got {self.half!r}")
        if self.mask_modules is not None and (len(self.mask_modules) != self.num_layers
                                              or any(len(pair) != 2 for pair in self.mask_modules)):
            raise CpmliveError(f"config: mask_modules needs one [attention_removed, ffn_removed] pair per layer "
                               f"({self.num_layers})")
        if self.model_type != "cpm1":
            raise CpmliveError(f"config: model_type {self.model_type!r} is not a CPM-1 config")
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise CpmliveError("config: quantization must be an object")

    @property
    def prompt_length(self) -> int:
        """CPM-1 has no soft prompt: a row is its text's pieces."""
        return 0

    @property
    def moe(self) -> None:
        return None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "Cpm1Config":
        """HF ``GPT2Config`` json (``model_type`` ``"gpt2"``); refused where it is not CPM-1's block."""
        activation = data.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CpmliveError(f"config: activation_function {activation!r}: CPM-1 uses gelu_new")
        for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                             ("tie_word_embeddings", True)):
            if data.get(flag, wanted) != wanted:
                raise CpmliveError(f"config: {flag}={data[flag]!r} is not CPM-1's GPT-2 block")
        mapped = {ours: data[hf] for hf, ours in GPT2_KEY_NAMES.items() if data.get(hf) is not None}
        mapped.setdefault("dim_ff", 4 * mapped.get("dim_model", cls.dim_model))
        heads = mapped.get("num_heads", cls.num_heads)
        width = mapped.get("dim_model", cls.dim_model)
        if not isinstance(heads, int) or not isinstance(width, int) or heads <= 0 or width % heads:
            raise CpmliveError(f"config: n_embd {width!r} is not a multiple of n_head {heads!r}")
        mapped["dim_head"] = width // heads
        mapped["half"] = str(data.get("torch_dtype", data.get("dtype", "float32"))) in ("float16", "torch.float16")
        return cls.from_dict(mapped)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` for HF ``GPT2LMHeadModel``."""
        if self.dim_head * self.num_heads != self.dim_model or self.mask_modules is not None:
            raise CpmliveError("HF GPT2LMHeadModel needs num_heads x dim_head == dim_model and every sub-block")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                "n_positions": self.max_length, "n_ctx": self.max_length, "n_embd": self.dim_model,
                "n_layer": self.num_layers, "n_head": self.num_heads, "n_inner": self.dim_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": self.eps, "resid_pdrop": self.dropout_p,
                "embd_pdrop": self.dropout_p, "attn_pdrop": self.dropout_p, "scale_attn_weights": True,
                "tie_word_embeddings": True, "use_cache": True, "dtype": "float16" if self.half else "float32"}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cpm1Config":
        """Read our ``config.json`` (``model_type`` ``"cpm1"``) or HF's GPT-2 one."""
        data = read_json_config(path)
        if data.get("model_type") == "gpt2":
            return cls.from_hf(data)
        if data.get("model_type") != "cpm1":
            raise CpmliveError(f"{path}: model_type {data.get('model_type')!r} is not a CPM-1 config")
        return cls.from_dict(data)


def read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CpmliveError(f"{path}: config file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: a config must be a JSON object")
    return data


# CPM-Generate's 2.6B (32 x 2560, 32 heads) and the 12 x 768 CPM-Distill; the tiny one is for tests.
CPM1_PRESETS: dict[str, Any] = {
    "cpm1-2.6b": lambda: Cpm1Config(),
    "cpm1-distill": lambda: Cpm1Config(dim_model=768, dim_ff=3072, num_layers=12, num_heads=12, dim_head=64),
    "cpm1-tiny": lambda: Cpm1Config(dim_model=64, dim_ff=256, num_layers=2, num_heads=4, dim_head=16, half=False,
                                    max_length=128),
}
ALL_PRESETS: dict[str, Any] = {**PRESETS, **BEE_PRESETS, **CPM1_PRESETS}


def preset(name: str) -> AntConfig | BeeConfig | Cpm1Config:
    if name not in ALL_PRESETS:
        raise CpmliveError(f"unknown preset {name!r} (known: {', '.join(sorted(ALL_PRESETS))})")
    return ALL_PRESETS[name]()


def check_model(name_or_path: str | os.PathLike) -> Path:
    """The path a model name stands for (:func:`cpmlive.resources.model_path`), refusing a name
    that is neither a path nor a preset. Light (no torch): the CLI calls it before it imports
    anything that loads models."""
    from cpmlive.resources import model_path

    path = model_path(name_or_path)
    if not path.exists() and str(name_or_path) not in ALL_PRESETS:
        raise CpmliveError(f"{name_or_path}: no such checkpoint or preset (presets: {', '.join(sorted(ALL_PRESETS))})")
    return path


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(AntConfig)]


__all__ = ["AntConfig", "BeeConfig", "BEE_PRESETS", "CPM1_PRESETS", "Cpm1Config", "ALL_PRESETS", "MoEConfig", "QuantConfig", "PRESETS", "check_model", "preset", "field_names"]
