"""CPM-Ant's config (OpenBMB's key names: an OpenBMB ``config.json`` reads as is;
:meth:`AntConfig.from_hf` maps HF ``CpmAntConfig`` names) and its presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import MoEConfig, QuantConfig, StackConfig, read_json_config, spread_mask
from cpmlive.errors import CpmliveError

HF_KEY_NAMES = {
    "hidden_size": "dim_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "max_position_embeddings": "max_length",
}


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


def _ant(**overrides: Any) -> AntConfig:
    return AntConfig(**overrides)


PRESETS: dict[str, Any] = {
    "ant-10b": lambda: _ant(),
    "ant-7b": lambda: _ant(mask_modules=spread_mask(48, 37, 32)),
    "ant-3b": lambda: _ant(num_heads=20, dim_ff=3735, mask_modules=spread_mask(48, 37, 32)),
    "ant-1b": lambda: _ant(num_heads=16, dim_ff=700, mask_modules=spread_mask(48, 25, 21)),
    "ant-300m": lambda: _ant(num_heads=4, dim_ff=350, mask_modules=spread_mask(48, 25, 21)),
    "tiny": lambda: _ant(dim_model=64, dim_ff=128, num_layers=2, num_heads=4, dim_head=16,
                         half=False),
}
