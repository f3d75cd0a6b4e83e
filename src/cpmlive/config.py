"""What every model config shares (:class:`StackConfig`), and the configs of quantization and
mixture-of-experts layers. Each family's own config and presets live in its folder,
``cpmlive.model.<family>.config``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpmlive.errors import CpmliveError
from cpmlive.utils import dataclass_from_dict


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


def spread_mask(num_layers: int, keep_attention: int, keep_ffn: int) -> list[list[bool]]:
    """Remove sub-blocks evenly over depth (the published counts; the exact layers come with
    the checkpoint's own config, which always wins)."""

    def removed(keep: int) -> set[int]:
        drop = num_layers - keep
        return {int((i + 0.5) * num_layers / drop) for i in range(drop)} if drop else set()

    attention, ffn = removed(keep_attention), removed(keep_ffn)
    return [[i in attention, i in ffn] for i in range(num_layers)]


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
