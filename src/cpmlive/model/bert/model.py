"""The BERT family's model: HF's ``BertModel`` (and ``RobertaModel``) with its heads.

Post-norm blocks ``h = LN(h + attn(h))``, ``h = LN(h + ffn(h))`` with biases everywhere and the
erf GELU, over token + learned position + token-type embeddings and a LayerNorm. The attention is
the shared stack's (``Attention`` with its biases beside bias-free products), so LoRA, quantization
and the CPU products treat it as every family's. Heads, present where the weights have them:
``mlm`` (a dense + GELU + LayerNorm transform, then the token table's transpose plus a bias),
``pooler`` (tanh of a dense over the first token) and ``classifier`` (BERT: a projection of the
pooled vector; RoBERTa: dense, tanh, projection of the first token).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.errors import CpmliveError
from cpmlive.model.bert.config import BertConfig
from cpmlive.model.runtime.kernels import project
from cpmlive.model.stack import (Attention, Embedding, GeluFeedForward, Transformer, add_bias, autocast_input, build,
                                 init_gpt2)
from cpmlive.utils import compute_dtype


class BiasedLinear(nn.Module):
    """A bias-free product with its bias beside it (``weight`` in ``dense``, then ``bias``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return add_bias(project(x, self.dense), self.bias)


class BertBlock(nn.Module):
    """A post-norm block: ``LN(h + attn(h))``, then ``LN(h + ffn(h))``."""

    def __init__(self, config: BertConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn = Attention(config, biases=True)
        self.attn_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
        self.ffn = GeluFeedForward(config, approximate="none")  # BERT's erf GELU
        self.ffn_norm = nn.LayerNorm(config.dim_model, eps=config.eps)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        h = self.attn_norm(self.attn(autocast_input(h), bias, None, self.index, 0, residual=h))
        return self.ffn_norm(self.ffn(autocast_input(h), residual=h))


class Bert(Transformer):
    config: BertConfig
    fills_in_place = True  # ``fill`` turns each mask token into a token, all at once (not generated spans)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.position_table = Embedding(config.max_length, config.dim_model)  # CPM-1 has "position_embedding"
        self.token_type_embedding = Embedding(config.type_vocab_size, config.dim_model)
        self.embedding_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
        self.layers = nn.ModuleList(BertBlock(config, i) for i in range(config.num_layers))
        if "mlm" in config.heads:
            self.mlm_transform = BiasedLinear(config.dim_model, config.dim_model)
            self.mlm_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
            self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        if "pooler" in config.heads:
            self.pooler = BiasedLinear(config.dim_model, config.dim_model)
        if "classifier" in config.heads:
            if config.architecture == "roberta":
                self.classifier_dense = BiasedLinear(config.dim_model, config.dim_model)
            self.classifier = BiasedLinear(config.dim_model, config.num_labels)

    def positions(self, input_ids: Tensor, valid: Tensor) -> Tensor:
        """Each token's position row: its index (BERT), or RoBERTa's count of the real tokens up to
        it after ``pad_id`` (right padding keeps the same rows either way)."""
        if self.config.architecture == "roberta":
            counted = valid.int().cumsum(-1) * valid.int()
            return counted + self.config.pad_id
        return torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: Tensor, segment: Tensor | None = None, context: Tensor | None = None,
                span: Tensor | None = None, valid: Tensor | None = None, cache: object = None,
                position: Tensor | None = None, last: int | None = None, token_types: Tensor | None = None) -> Tensor:
        """The encoder's final hidden states ``[B, L, d]``; ``valid`` marks padding (right-padded
        rows), ``token_types`` the sentence of each token (0 by default)."""
        if cache is not None:
            raise CpmliveError("a BERT encoder reads a whole text at once: it has no decoding cache")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        positions = self.positions(input_ids, valid)
        if int(positions.max()) >= self.config.max_length:
            raise CpmliveError(f"the text is longer than the model's {self.config.max_length} positions")
        types = torch.zeros_like(input_ids) if token_types is None else token_types
        hidden = self.input_embedding(input_ids) + self.position_table(positions) + self.token_type_embedding(types)
        hidden = self.embedding_norm(hidden)
        dtype = compute_dtype(hidden)
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)
        bias = mask[:, None, None, :].expand(-1, self.config.num_heads, input_ids.size(1), -1)
        for block in self.layers:
            hidden = block(hidden, bias)
        return hidden

    def encoder_states(self, input_ids: Tensor, valid: Tensor) -> Tensor:
        """The final hidden states of right-padded rows (what embeddings pool)."""
        return self(input_ids, valid=valid)

    def logits(self, hidden: Tensor) -> Tensor:
        """The masked-token head's logits over the vocabulary."""
        if not hasattr(self, "mlm_transform"):
            raise CpmliveError("this BERT checkpoint has no masked-token head (its weights hold none)")
        hidden = self.mlm_norm(F.gelu(self.mlm_transform(hidden)))
        return add_bias(super().logits(hidden), self.mlm_bias)

    def pooled(self, hidden: Tensor) -> Tensor:
        """BERT's pooler output: ``tanh(dense(h[:, 0]))``."""
        if not hasattr(self, "pooler"):
            raise CpmliveError("this BERT checkpoint has no pooler (its weights hold none)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def classify(self, hidden: Tensor) -> Tensor:
        """The classifier's logits ``[B, num_labels]``."""
        if not hasattr(self, "classifier"):
            raise CpmliveError("this BERT checkpoint has no classifier head")
        if hasattr(self, "classifier_dense"):
            return self.classifier(torch.tanh(self.classifier_dense(hidden[:, 0])))
        return self.classifier(self.pooled(hidden))

    def add_classifier(self, labels: list[str]) -> None:
        """A new classification head for ``labels`` (and BERT's pooler, which it reads, where the
        checkpoint has none), N(0, 0.02) as BERT starts its heads; the config lists them."""
        config = self.config
        generator = torch.Generator().manual_seed(0)
        device = self.input_embedding.weight.device

        def fresh(dim_out: int) -> BiasedLinear:
            layer = BiasedLinear(config.dim_model, dim_out).to(device)
            with torch.no_grad():
                layer.dense.weight.copy_(torch.randn(layer.dense.weight.shape, generator=generator) * 0.02)
            return layer

        heads = [head for head in config.heads if head != "classifier"]
        if config.architecture == "bert" and "pooler" not in heads:
            self.pooler = fresh(config.dim_model)
            heads.append("pooler")
        if config.architecture == "roberta":
            self.classifier_dense = fresh(config.dim_model)
        self.classifier = fresh(len(labels))
        self.config = dataclasses.replace(config, heads=[*heads, "classifier"], num_labels=len(labels),
                                          labels=list(labels))

    def new_cache(self, batch: int, capacity: int) -> object:
        raise CpmliveError("a BERT encoder does not generate: it fills masks, embeds and classifies texts")

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """BERT's init: N(0, 0.02) matrices and tables, zero biases, unit LayerNorms."""
        init_gpt2(self, self.config.num_layers, seed)


def build_bert(config: BertConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int | None = 0) -> Bert:
    return build(Bert, config, device, dtype, seed)


__all__ = ["Bert", "BertBlock", "BiasedLinear", "build_bert"]
