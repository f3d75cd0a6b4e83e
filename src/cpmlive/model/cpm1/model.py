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

The matrices are bias-free ``nn.Linear`` layers with their biases kept beside them (``bias_q``
...), so that quantization, LoRA and the fast CPU products (``model.kernels``) treat them as
they treat CPM-Ant's; the bias is added after the product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpmlive.model.cpm1.config import Cpm1Config
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import AntCache, Embedding, autocast_input, mask_inputs, token_positions
from cpmlive.model.runtime.kernels import attention, project
from cpmlive.model.runtime.quant import count_parameters
from cpmlive.utils import compute_dtype


def _with_bias(out: Tensor, bias: Tensor) -> Tensor:
    """``out + bias``; in place outside autograd (``out`` is the product's own fresh tensor)."""
    bias = bias.to(out.dtype)
    return out.add_(bias) if not torch.is_grad_enabled() else out + bias


class Cpm1Attention(nn.Module):
    """GPT-2 attention: q, k, v and output projections with biases around scaled dot products."""

    def __init__(self, config: Cpm1Config) -> None:
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        self.dropout_p = config.dropout_p
        width = config.dim_attention
        self.project_q = nn.Linear(config.dim_model, width, bias=False)
        self.project_k = nn.Linear(config.dim_model, width, bias=False)
        self.project_v = nn.Linear(config.dim_model, width, bias=False)
        self.attention_out = nn.Linear(width, config.dim_model, bias=False)
        self.bias_q = nn.Parameter(torch.zeros(width))
        self.bias_k = nn.Parameter(torch.zeros(width))
        self.bias_v = nn.Parameter(torch.zeros(width))
        self.bias_out = nn.Parameter(torch.zeros(config.dim_model))

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, cache: AntCache | None, layer: int, start: int,
                residual: Tensor, queries: int | None = None) -> Tensor:
        q = self._heads(_with_bias(project(x if queries is None else x[:, -queries:], self.project_q), self.bias_q))
        k = self._heads(_with_bias(project(x, self.project_k), self.bias_k))
        v = self._heads(_with_bias(project(x, self.project_v), self.bias_v))
        if cache is not None:
            k, v = cache.store(layer, start, k, v)
        out = attention(q, k, v, bias, self.dropout_p if self.training else 0.0)
        batch, _, length, _ = out.shape
        out = project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)
        return _with_bias(out, self.bias_out)


class Cpm1FeedForward(nn.Module):
    """``w_out(gelu_new(w_in x + b_in)) + b_out``."""

    def __init__(self, config: Cpm1Config) -> None:
        super().__init__()
        self.w_in = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.bias_in = nn.Parameter(torch.zeros(config.dim_ff))
        self.bias_out = nn.Parameter(torch.zeros(config.dim_model))

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        hidden = F.gelu(_with_bias(project(x, self.w_in), self.bias_in), approximate="tanh")
        return _with_bias(project(hidden, self.w_out, "residual", residual), self.bias_out)


class Cpm1Block(nn.Module):
    """Pre-LN GPT-2 block; a removed sub-block (a pruned checkpoint) is absent."""

    def __init__(self, config: Cpm1Config, index: int) -> None:
        super().__init__()
        self.index = index
        if config.has_attention(index):
            self.attn_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
            self.attn = Cpm1Attention(config)
        if config.has_ffn(index):
            self.ffn_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
            self.ffn = Cpm1FeedForward(config)

    def forward(self, h: Tensor, bias: Tensor, cache: AntCache | None = None, start: int = 0,
                keep: int | None = None) -> Tensor:
        if hasattr(self, "attn"):
            x = autocast_input(self.attn_norm(h))
            if keep is not None:
                h, bias = h[:, -keep:], bias[:, :, -keep:]
            h = self.attn(x, bias, cache, self.index, start, residual=h, queries=keep)
        elif keep is not None:
            h = h[:, -keep:]
        if hasattr(self, "ffn"):
            h = self.ffn(autocast_input(self.ffn_norm(h)), residual=h)
        return h


class Cpm1(nn.Module):
    def __init__(self, config: Cpm1Config) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.position_embedding = Embedding(config.max_length, config.dim_model)
        self.layers = nn.ModuleList(Cpm1Block(config, i) for i in range(config.num_layers))
        self.output_norm = nn.LayerNorm(config.dim_model, eps=config.eps)
        self.gradient_checkpointing = False

    @staticmethod
    def visibility(query: dict[str, Tensor], key: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Which keys each query sees (``[B, Lq, Lk]``: those at or before it in its span, valid
        ones, none for a padding query) and each query's absolute position (how many valid
        tokens of its span come before it)."""
        seen = key["position"][:, None, :] <= query["position"][:, :, None]
        seen = seen & (query["span"][:, :, None] == key["span"][:, None, :]) & key["valid"][:, None, :]
        absolute = (seen.sum(-1) - 1).clamp(min=0)
        return seen & query["valid"][:, :, None], absolute

    def attention_mask(self, seen: Tensor, dtype: torch.dtype) -> Tensor:
        """The additive mask ``[B, H, Lq, Lk]``: 0 where a key is seen, the dtype's finite minimum
        elsewhere (a fully masked padding row stays finite in fp16/bf16 instead of NaN)."""
        batch, length, keys = seen.shape
        bias = torch.zeros(batch, 1, length, keys, dtype=dtype, device=seen.device)
        bias.masked_fill_(~seen[:, None], torch.finfo(dtype).min)
        return bias.expand(batch, self.config.num_heads, length, keys)

    def forward(self, input_ids: Tensor, segment: Tensor | None = None, context: Tensor | None = None,
                span: Tensor | None = None, valid: Tensor | None = None, cache: AntCache | None = None,
                position: Tensor | None = None, last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given (new) positions, as ``CpmAnt.forward``."""
        zeros = torch.zeros_like(input_ids, dtype=torch.int32)
        start = cache.length if cache is not None else 0
        if position is None:
            position = token_positions(input_ids) if cache is None else cache.next_positions(input_ids.size(1))
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        query = mask_inputs(zeros, zeros if span is None else span, zeros, valid, position)
        key = cache.append_inputs(query) if cache is not None else query
        seen, absolute = self.visibility(query, key)
        furthest = int(absolute.max()) if absolute.numel() else 0
        if furthest >= self.config.max_length:
            raise CpmliveError(f"position {furthest} is past the model's {self.config.max_length} positions")
        hidden = self.input_embedding(input_ids) + self.position_embedding(absolute)
        bias = self.attention_mask(seen, compute_dtype(hidden))
        for index, block in enumerate(self.layers):
            keep = last if index == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = checkpoint(block, hidden, bias, None, 0, keep, use_reentrant=False)
            else:
                hidden = block(hidden, bias, cache, start, keep)
        if cache is not None:
            cache.advance(input_ids.size(1))
        return self.output_norm(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        """The head tied to the token embedding."""
        head = getattr(self.input_embedding, "head", None)  # a quantized table multiplies itself
        return head(hidden) if head is not None else project(hidden, self.input_embedding.weight)

    def head_weight(self) -> Tensor:
        dequantized = getattr(self.input_embedding, "dequantized", None)
        return dequantized() if dequantized is not None else self.input_embedding.weight

    def new_cache(self, batch: int, capacity: int) -> AntCache:
        if capacity > self.config.max_length:
            raise CpmliveError(f"{capacity} positions needed (the text and the new tokens); the model takes at most "
                               f"{self.config.max_length}: shorten the text or lower max_new_tokens")
        return AntCache(batch=batch, capacity=capacity, num_layers=self.config.num_layers,
                        device=self.input_embedding.weight.device)

    def num_parameters(self) -> int:
        return count_parameters(self)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's init: N(0, 0.02) matrices and embeddings, the projections into the residual
        stream further scaled by 1/sqrt(2 * layers), zero biases, unit LayerNorms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        depth_scale = 1.0 / math.sqrt(2 * self.config.num_layers)
        for name, parameter in self.named_parameters():
            if name.endswith(("attention_out.weight", "w_out.weight")):
                std = 0.02 * depth_scale
            elif parameter.dim() == 2:
                std = 0.02
            else:
                parameter.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                continue
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std)


def build_cpm1(config: Cpm1Config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int | None = 0) -> Cpm1:
    model = Cpm1(config)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


__all__ = ["Cpm1", "Cpm1Attention", "Cpm1Block", "Cpm1FeedForward", "build_cpm1"]
