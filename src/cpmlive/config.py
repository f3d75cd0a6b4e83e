"""What every model config shares (:class:`StackConfig`), and the configs of quantization and
mixture-of-experts layers. Each family's own config and presets live in its folder,
``cpmlive.model.<family>.config``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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


@dataclass
class StackConfig:
    """What every family's config shares: the stack's shape, named as OpenBMB names it
    (``num_heads``, ``dim_head``), ``mask_modules`` (one ``[attention_removed, ffn_removed]`` pair
    per layer, or ``None`` for every sub-block), ``model_type`` and a ``quantization``, with their
    checks and their JSON form. A family subclasses it (a dataclass too), adds its own fields and
    checks, and sets the defaults that differ: these are the 10B shape of OpenBMB's CPM-Ant.
    """

    vocab_size: int = 30720
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    eps: float = 1e-6
    half: bool = True
    mask_modules: list[list[bool]] | None = None
    max_length: int = 1024
    model_type: str = ""  # each family's own, the only one its config accepts
    quantization: QuantConfig | None = None

    # How a refusal names the family: "model_type 'x' is not a CPM-Ant config".
    family_name: ClassVar[str] = ""
    # The family's own fields that must be positive integers, beside the shared ones.
    positive_fields: ClassVar[tuple[str, ...]] = ()
    # Nested objects (name -> their config class): read from a JSON object, left out of it when absent.
    sections: ClassVar[dict[str, type]] = {"quantization": QuantConfig}
    # The first keys of the family's ``config.json``, in its published config's order (the other
    # fields follow in field order): the family's own fields stand among the shared ones there.
    key_order: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name, section in self.sections.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, section.from_dict(getattr(self, name)))
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]
        self.validate()

    def validate(self) -> None:
        """Refuse, in one line naming the key, a value the stack cannot be built with; a family
        extends it with its own checks."""
        positive = ("vocab_size", "dim_model", "dim_ff", "num_layers", "num_heads", "dim_head", "max_length",
                    *self.positive_fields)
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
        if not isinstance(self.half, bool):
            raise CpmliveError(f"config: half must be true or false, got {self.half!r}")
        self._check_mask()
        if self.model_type != type(self).model_type:
            raise CpmliveError(f"config: model_type {self.model_type!r} is not a {self.family_name} config")
        for name, section in self.sections.items():
            if getattr(self, name) is not None and not isinstance(getattr(self, name), section):
                raise CpmliveError(f"config: {name} must be an object")

    def _check_mask(self) -> None:
        if self.mask_modules is None:
            return
        if len(self.mask_modules) != self.num_layers:
            raise CpmliveError(f"config: mask_modules has {len(self.mask_modules)} entries for "
                               f"{self.num_layers} layers")
        if any(len(pair) != 2 for pair in self.mask_modules):
            raise CpmliveError("config: every mask_modules entry must be [attention_removed, ffn_removed]")

    @property
    def dim_attention(self) -> int:
        """Width of q/k/v: may differ from ``dim_model`` in pruned models."""
        return self.num_heads * self.dim_head

    @property
    def moe(self) -> MoEConfig | None:
        """The MoEfied FFN, for a family that has one (CPM-Ant's ``moefy``); dense blocks here."""
        return None

    def has_attention(self, layer: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer][0]

    def has_ffn(self, layer: int) -> bool:
        return self.mask_modules is None or not self.mask_modules[layer][1]

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` object; an absent section is left out (plain checkpoints keep the
        ``config.json`` they always had)."""
        data = dataclasses.asdict(self)
        for name in self.sections:
            if data[name] is None:
                del data[name]
        place = {name: i for i, name in enumerate(self.key_order)}
        return dict(sorted(data.items(), key=lambda item: place.get(item[0], len(place))))

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

    @staticmethod
    def half_in_hf(data: dict[str, Any]) -> bool:
        """Whether an HF ``config.json`` stores float16 weights (``torch_dtype`` or, newer, ``dtype``)."""
        return str(data.get("torch_dtype", data.get("dtype", "float32"))) in ("float16", "torch.float16")

    def save(self, path: str | os.PathLike) -> None:
        from cpmlive.utils import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")


FFN_KINDS = ("relu", "gated-gelu", "gated-gelu-erf")


@dataclass
class EncoderDecoderConfig(StackConfig):
    """What the encoder-decoder families share (T5's stack: ``model/encoder_decoder.py``).

    ``num_layers`` counts the decoder's blocks (what decoding walks through), ``num_encoder_layers``
    the encoder's. ``ffn`` is ``relu`` (T5 v1.0: ``w_out(relu(w_in x))``), ``gated-gelu`` (T5 v1.1,
    mT5, UMT5, CPM-2, EVA: ``w_out(gelu_tanh(w_0 x) * w_1 x)``) or ``gated-gelu-erf`` (the same with
    the erf GELU). The relative position bias (``relative_buckets`` buckets up to
    ``relative_max_distance``) is one table per stack shared by its blocks, or one per block
    (``bias_per_layer``, UMT5). ``attention_scale``: scores divided by ``sqrt(dim_head)`` (EVA2.0;
    T5 and CPM-2 do not scale). The head is the token table (``tie_word_embeddings``) or its own
    matrix; ``scale_head`` multiplies its input by ``dim_model ** -0.5`` first (T5 v1.0's tied
    head; transformers 5's ``scale_decoder_outputs``). The decoder starts from ``decoder_start_id``.
    """

    vocab_size: int = 32128
    dim_model: int = 512
    dim_ff: int = 2048
    num_layers: int = 6
    num_encoder_layers: int = 6
    num_heads: int = 8
    dim_head: int = 64
    half: bool = False
    max_length: int = 512
    relative_buckets: int = 32
    relative_max_distance: int = 128
    ffn: str = "gated-gelu"
    bias_per_layer: bool = False
    attention_scale: bool = False
    tie_word_embeddings: bool = False
    scale_head: bool = False
    decoder_start_id: int = 0

    positive_fields: ClassVar[tuple[str, ...]] = ("num_encoder_layers", "relative_buckets", "relative_max_distance")

    def validate(self) -> None:
        super().validate()
        if self.ffn not in FFN_KINDS:
            raise CpmliveError(f"config: ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        if self.mask_modules is not None:
            raise CpmliveError("config: an encoder-decoder has no pruned sub-blocks (mask_modules must be null)")
        for name in ("bias_per_layer", "attention_scale", "tie_word_embeddings", "scale_head"):
            if not isinstance(getattr(self, name), bool):
                raise CpmliveError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        start = self.decoder_start_id
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < self.vocab_size:
            raise CpmliveError(f"config: decoder_start_id must be a token id below {self.vocab_size}, got {start!r}")
        if self.relative_buckets % 2:
            raise CpmliveError(f"config: relative_buckets must be even, got {self.relative_buckets}")

    @property
    def prompt_length(self) -> int:
        """No soft prompt: a prompt row is its encoder tokens (and the decoder's start)."""
        return 0

    @property
    def gated(self) -> bool:
        return self.ffn != "relu"


def spread_mask(num_layers: int, keep_attention: int, keep_ffn: int) -> list[list[bool]]:
    """Remove sub-blocks evenly over depth (the published counts; the exact layers come with
    the checkpoint's own config, which always wins)."""

    def removed(keep: int) -> set[int]:
        drop = num_layers - keep
        return {int((i + 0.5) * num_layers / drop) for i in range(drop)} if drop else set()

    attention, ffn = removed(keep_attention), removed(keep_ffn)
    return [[i in attention, i in ffn] for i in range(num_layers)]


def read_json_object(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """The JSON object in ``path``, or a one-line error naming the file and, by ``what``, what it
    should have held."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CpmliveError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid JSON {what} ({exc})") from None
    if not isinstance(data, dict):
        article = "an" if what[:1] in tuple("aeiou") else "a"
        raise CpmliveError(f"{path}: {article} {what} must be a JSON object")
    return data
