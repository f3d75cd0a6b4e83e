"""CPM-1 (TsinghuaAI CPM-Generate, 2020): a GPT-2 decoder.

Pre-LN blocks ``h + attn(LN(h))`` and ``h + mlp(LN(h))`` with LayerNorms and biases, a
``gelu_new`` (tanh) MLP of width ``dim_ff``, learned absolute positions added to the token
embedding, a final LayerNorm and a head tied to the embedding: what HF ``GPT2LMHeadModel``
computes (``transformer.h.N.attn.c_attn`` ...), with the fused qkv kept as three products.

The model takes CPM-Ant's inputs (``model.ant``) so that decoding, the engine, fine-tuning and
pretraining drive it unchanged: ``valid`` marks padding, ``span`` packed samples, and the
``position`` inputs only order tokens. ``segment`` and ``context`` do not exist in GPT-2 and are
ignored: every token sees the tokens at or before it in its span. A token's absolute position is
the number of valid tokens of its span before it, so left padding, packed rows and cached
decoding all give every token the position an unpadded forward gives it.

The blocks are the shared stack's (``model.stack``): bias-free ``nn.Linear`` matrices with their
biases kept beside them (``bias_q`` ...), so that quantization, LoRA and the fast CPU products
(``model.runtime.kernels``) treat them as they treat CPM-Ant's; the bias is added after the product.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.cache import KVCache, left_to_right
from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.model.stack import Attention, Block, Embedding, GeluFeedForward, Transformer, build, init_gpt2
from cpmlive.utils import compute_dtype


def cpm1_block(config: Cpm1Config, index: int) -> Block:
    """GPT-2's pre-LN block: LayerNorms, attention with biases, the ``gelu_new`` MLP."""
    return Block(config, index, norm=lambda: nn.LayerNorm(config.dim_model, eps=config.eps),
                 attention=lambda: Attention(config, biases=True), ffn=lambda: GeluFeedForward(config))


class Cpm1(Transformer):
    causal_prompt = True

    def __init__(self, config: Cpm1Config) -> None:
        super().__init__(config)
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.position_embedding = Embedding(config.max_length, config.dim_model)
        self.layers = nn.ModuleList(cpm1_block(config, i) for i in range(config.num_layers))
        self.output_norm = nn.LayerNorm(config.dim_model, eps=config.eps)

    def attention_mask(self, seen: Tensor, dtype: torch.dtype) -> Tensor:
        """The additive mask ``[B, H, Lq, Lk]``: 0 where a key is seen, the dtype's finite minimum
        elsewhere (a fully masked padding row stays finite in fp16/bf16 instead of NaN)."""
        batch, length, keys = seen.shape
        bias = torch.zeros(batch, 1, length, keys, dtype=dtype, device=seen.device)
        bias.masked_fill_(~seen[:, None], torch.finfo(dtype).min)
        return bias.expand(batch, self.config.num_heads, length, keys)

    def forward(self, input_ids: Tensor, segment: Tensor | None = None, context: Tensor | None = None,
                span: Tensor | None = None, valid: Tensor | None = None, cache: KVCache | None = None,
                position: Tensor | None = None, last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given (new) positions, as ``CpmAnt.forward``."""
        seen, absolute = left_to_right(input_ids, span, valid, cache, position, self.config.max_length)
        hidden = self.input_embedding(input_ids) + self.position_embedding(absolute)
        bias = self.attention_mask(seen, compute_dtype(hidden))
        decoded = native_decode.decode_step(self, hidden, cache, nn.LayerNorm, GeluFeedForward, bias[:, :1])
        if decoded is not None:  # a decoding step in one native call (model.runtime.native_decode)
            return self.output_norm(decoded)
        return self.output_norm(self.run_layers(hidden, bias, cache, last))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.make_cache(batch, capacity, "the text and the new tokens")

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's init: N(0, 0.02) matrices and embeddings, the projections into the residual
        stream further scaled by 1/sqrt(2 * layers), zero biases, unit LayerNorms."""
        init_gpt2(self, self.config.num_layers, seed)


def build_cpm1(config: Cpm1Config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int | None = 0) -> Cpm1:
    return build(Cpm1, config, device, dtype, seed)


__all__ = ["Cpm1", "build_cpm1", "cpm1_block"]
