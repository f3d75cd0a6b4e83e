"""CPM-Ant's config (OpenBMB's key names: an OpenBMB ``config.json`` reads as is;
:meth:`AntConfig.from_hf` maps HF ``CpmAntConfig`` names) and its presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cpmlive.config import MoEConfig, StackConfig, read_json_object, spread_mask
from cpmlive.errors import CpmliveError

HF_KEY_NAMES = {
    "hidden_size": "dim_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "max_position_embeddings": "max_length",
}


@dataclass
class AntConfig(StackConfig):
    """Every CPM-Ant hyper-parameter, named as in OpenBMB's ``cpm-ant-10b.json`` (the shared ones
    in :class:`~cpmlive.config.StackConfig`, whose defaults are CPM-Ant 10B's).

    ``mask_modules`` is ``None`` for a full model, or one ``[attention_removed, ffn_removed]``
    pair per layer, as in the compressed CPM-Ant checkpoints (spec section 8).
    """

    position_bias_num_buckets: int = 512
    position_bias_max_distance: int = 2048
    prompt_types: int = 32
    prompt_length: int = 32
    segment_types: int = 32
    model_type: str = "cpm-ant"
    moe: MoEConfig | None = None

    family_name = "CPM-Ant"
    positive_fields = ("position_bias_num_buckets", "position_bias_max_distance", "prompt_types", "prompt_length",
                       "segment_types")
    sections = {**StackConfig.sections, "moe": MoEConfig}
    key_order = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "dropout_p",
                 "position_bias_num_buckets", "position_bias_max_distance", "eps", "half", "prompt_types",
                 "prompt_length", "segment_types")

    def validate(self) -> None:
        super().validate()
        if self.max_length <= self.prompt_length + 1:
            raise CpmliveError(f"config: max_length ({self.max_length}) must exceed prompt_length + 1 "
                               f"({self.prompt_length + 1})")
        if self.moe is not None and self.dim_ff % self.moe.experts:
            raise CpmliveError(f"moe: {self.moe.experts} experts do not split dim_ff {self.dim_ff} evenly")
        if self.moe is not None and self.quantization is not None:
            raise CpmliveError("config: a MoEfied model cannot be quantized (yet): quantize before moefying")

    @classmethod
    def from_openbmb(cls, data: dict[str, Any]) -> "AntConfig":
        """An OpenBMB json: extra keys are ignored, as OpenBMB's ``**kwargs`` does."""
        return cls.from_dict(data, strict=False)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "AntConfig":
        mapped = {HF_KEY_NAMES.get(k, k): v for k, v in data.items()}
        mapped.pop("model_type", None)
        mapped["half"] = cls.half_in_hf(data)
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
        data = read_json_object(path)
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
    "ant-tiny": lambda: _ant(dim_model=64, dim_ff=128, num_layers=2, num_heads=4, dim_head=16,
                             half=False),
}
PRESET_ALIASES = {"tiny": "ant-tiny"}  # its name before bee-tiny and cpm1-tiny: old recipes and tests use it
