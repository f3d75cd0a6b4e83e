"""The BERT family's config (BERT and RoBERTa: their differences are fields), HF's ``config.json``
both ways, and its presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from cpmlive.config import StackConfig, read_json_object
from cpmlive.errors import CpmliveError

ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}
HF_KEY_NAMES = {"vocab_size": "vocab_size", "hidden_size": "dim_model", "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads", "intermediate_size": "dim_ff", "layer_norm_eps": "eps",
                "max_position_embeddings": "max_length", "type_vocab_size": "type_vocab_size",
                "pad_token_id": "pad_id"}


@dataclass
class BertConfig(StackConfig):
    """A post-norm encoder with learned absolute positions and token types (BERT), or RoBERTa's
    positions counted from ``pad_id + 1``. ``heads`` lists the heads its weights have: ``mlm``
    (masked-token prediction, tied to the token table), ``pooler`` (BERT's tanh over the first
    token) and ``classifier`` (``num_labels`` outputs: BERT's over the pooler, RoBERTa's own
    dense-tanh-projection over the first token)."""

    architecture: str = "bert"
    vocab_size: int = 30522
    dim_model: int = 768
    dim_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    dim_head: int = 64
    eps: float = 1e-12
    half: bool = False
    max_length: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0
    heads: list[str] | None = None
    num_labels: int = 0
    labels: list[str] | None = None
    model_type: str = "bert"

    family_name = "BERT"
    positive_fields: ClassVar[tuple[str, ...]] = ("type_vocab_size",)

    def __post_init__(self) -> None:
        if self.heads is None:
            self.heads = ["mlm"]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.architecture not in ARCHITECTURES:
            raise CpmliveError(f"config: architecture {self.architecture!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        unknown = [head for head in self.heads if head not in ("mlm", "pooler", "classifier")]
        if unknown:
            raise CpmliveError(f"config: unknown head {unknown[0]!r} (heads: mlm, pooler, classifier)")
        if ("classifier" in self.heads) != (self.num_labels > 0):
            raise CpmliveError("config: a classifier head needs num_labels > 0, and num_labels a classifier head")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise CpmliveError(f"config: {len(self.labels)} labels for {self.num_labels} outputs")
        if self.mask_modules is not None:
            raise CpmliveError("config: a BERT encoder has no pruned sub-blocks (mask_modules must be null)")

    @property
    def prompt_length(self) -> int:
        return 0

    @property
    def position_offset(self) -> int:
        """The first position's row: 0 for BERT, ``pad_id + 1`` for RoBERTa."""
        return self.pad_id + 1 if self.architecture == "roberta" else 0

    @classmethod
    def from_hf(cls, data: dict[str, Any], source: str = "config", heads: list[str] | None = None) -> "BertConfig":
        """An HF ``config.json`` of BERT or RoBERTa; ``heads``: the heads its weights have."""
        architecture = data.get("model_type")
        if architecture not in ARCHITECTURES:
            raise CpmliveError(f"{source}: model_type {architecture!r} is not a BERT config "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        if data.get("hidden_act", "gelu") != "gelu":
            raise CpmliveError(f"{source}: hidden_act {data.get('hidden_act')!r} is not supported (BERT's is gelu)")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise CpmliveError(f"{source}: position_embedding_type {data['position_embedding_type']!r} is not "
                               "supported (absolute)")
        mapped = {ours: data[key] for key, ours in HF_KEY_NAMES.items() if data.get(key) is not None}
        width, count = mapped.get("dim_model", cls.dim_model), mapped.get("num_heads", cls.num_heads)
        if not isinstance(count, int) or count <= 0 or width % count:
            raise CpmliveError(f"{source}: hidden_size {width!r} is not a multiple of num_attention_heads {count!r}")
        heads = list(heads or ["mlm"])
        labels = data.get("id2label")
        num_labels = len(labels) if "classifier" in heads and isinstance(labels, dict) else 0
        mapped.update(architecture=architecture, dim_head=width // count, heads=heads, num_labels=num_labels,
                      half=cls.half_in_hf(data))
        if num_labels:
            mapped["labels"] = [str(labels.get(str(i), labels.get(i, i))) for i in range(num_labels)]
        return cls.from_dict(mapped)

    def to_hf(self) -> dict[str, Any]:
        prefix = "Bert" if self.architecture == "bert" else "Roberta"
        task = "ForSequenceClassification" if "classifier" in self.heads else "ForMaskedLM"
        data: dict[str, Any] = {
            "architectures": [prefix + (task if "mlm" in self.heads or "classifier" in self.heads else "Model")],
            "model_type": self.architecture, "vocab_size": self.vocab_size, "hidden_size": self.dim_model,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.dim_ff, "hidden_act": "gelu", "layer_norm_eps": self.eps,
            "max_position_embeddings": self.max_length, "type_vocab_size": self.type_vocab_size,
            "pad_token_id": self.pad_id, "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "dtype": "float16" if self.half else "float32",
        }
        if self.num_labels:
            names = self.labels or [f"LABEL_{i}" for i in range(self.num_labels)]
            data["id2label"] = {str(i): name for i, name in enumerate(names)}
            data["label2id"] = {name: i for i, name in enumerate(names)}
        return data

    @classmethod
    def load(cls, path: str | os.PathLike, heads: list[str] | None = None) -> "BertConfig":
        data = read_json_object(path)
        if "architecture" in data and data.get("model_type") == cls.model_type:
            return cls.from_dict(data)
        return cls.from_hf(data, str(path), heads)


def _bert(dim: int, layers: int, heads: int, vocab: int = 30522, **fields: Any) -> BertConfig:
    return BertConfig(vocab_size=vocab, dim_model=dim, dim_ff=4 * dim, num_layers=layers, num_heads=heads,
                      dim_head=dim // heads, **fields)


PRESETS: dict[str, Any] = {
    "bert-base-uncased": lambda: _bert(768, 12, 12),
    "bert-base-chinese": lambda: _bert(768, 12, 12, vocab=21128),
    "chinese-roberta-wwm-ext": lambda: _bert(768, 12, 12, vocab=21128),
    "roberta-base": lambda: _bert(768, 12, 12, vocab=50265, architecture="roberta", max_length=514, type_vocab_size=1,
                                  pad_id=1, eps=1e-5),
    "bert-tiny": lambda: _bert(64, 2, 4, vocab=4000, max_length=128),
}
