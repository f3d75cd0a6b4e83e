"""The encoder-decoder stack (T5's), which the T5 family (T5, mT5, UMT5) and the CPM-2 family
(CPM-2, CPM-2.1, EVA) compose: pre-norm blocks of RMS norms, attention without biases over a
relative position bias, a ReLU or gated-GELU feed-forward, an encoder read both ways and a
causal decoder that also attends to the encoder's output.

The engine, ``generate`` and the server drive it with the inputs of every other family
(``model.ant``): a prompt row is the encoder's tokens followed by the decoder's start token, and
every later position is a decoder token. The encoder runs once, in the prefill; its output's keys
and values for each decoder block stay in the decoding cache beside the decoder's own
(:class:`EncoderDecoderCache`: cache layers ``L .. 2L - 1`` hold them at the encoder's columns),
so a decoding step is one decoder position per row, cross-attending to cached keys, in the
engine's continuous batch like any decoder's.

Teacher-forced training and scoring call :meth:`EncoderDecoder.seq2seq` with the encoder's and
the decoder's tokens apart.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.config import EncoderDecoderConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.cache import KVCache, mask_inputs, new_positions
import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.runtime.kernels import attention, project
from cpmlive.model.stack import Attention, Embedding, RMSNorm, Transformer, autocast_input, init_stack, \
    relative_position_bucket
from cpmlive.utils import compute_dtype


class EncoderDecoderCache(KVCache):
    """A :class:`KVCache` of ``2 L`` layers: the decoder's self-attention keys and values in
    layers ``0 .. L - 1``, the encoder output's keys and values for each decoder block's
    cross-attention in ``L .. 2 L - 1``. The first write (the prefill) holds the encoder's
    columns and, last, the decoder's start token: it marks those columns as context (what
    cross-attention reads) and the last as the decoder's."""

    def append_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.length == 0:
            inputs = {**inputs, "context": prompt_context(inputs["context"])}
        return super().append_inputs(inputs)


def prompt_context(like: Tensor) -> Tensor:
    """``[B, W]``: true for a prompt row's encoder columns, false for its last (the decoder's start)."""
    context = torch.ones_like(like, dtype=torch.bool)
    context[:, -1] = False
    return context


class CrossAttention(nn.Module):
    """Attention of the decoder's positions to the encoder's output (its keys and values are
    computed once, by :meth:`keys_values`); no position bias, the encoder's padding masked."""

    def __init__(self, config: EncoderDecoderConfig, scale: float) -> None:
        super().__init__()
        self.num_heads, self.dim_head, self.scale = config.num_heads, config.dim_head, scale
        width = config.dim_attention
        self.project_q = nn.Linear(config.dim_model, width, bias=False)
        self.project_k = nn.Linear(config.dim_model, width, bias=False)
        self.project_v = nn.Linear(config.dim_model, width, bias=False)
        self.attention_out = nn.Linear(width, config.dim_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.dim_head).transpose(1, 2)

    def keys_values(self, encoded: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(project(encoded, self.project_k)), self._heads(project(encoded, self.project_v))

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, bias: Tensor, residual: Tensor) -> Tensor:
        q = self._heads(project(x, self.project_q))
        out = attention(q, keys, values, bias.expand(-1, q.size(1), q.size(2), -1), 0.0, self.scale)
        batch, _, length, _ = out.shape
        return project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)


class T5FeedForward(nn.Module):
    """``w_out(relu(w_in x))`` (T5 v1.0) or ``w_out(gelu(w_0 x) * w_1 x)`` (the gated kinds: GELU's
    tanh form, or its erf form for ``gated-gelu-erf``)."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.kind = config.ffn
        # the activation as the native step (``runtime.native_decode``) names it
        self.activation = {"relu": "relu", "gated-gelu": "gelu_tanh"}.get(config.ffn, "gelu")
        if config.gated:
            self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
            self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        else:
            self.w_in = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        if self.kind == "relu":
            hidden = F.relu(project(x, self.w_in))
        elif self.kind == "gated-gelu":
            hidden = project(x, self.w_1, "gate", F.gelu(project(x, self.w_0), approximate="tanh"))
        else:
            hidden = project(x, self.w_1, "gate", project(x, self.w_0, "gelu"))
        return project(hidden, self.w_out, "residual", residual)


# A block's feed-forward sub-block: (its norm, the FFN that adds its output to the residual).
FeedForwardMaker = Callable[[], tuple[nn.Module, nn.Module]]


def t5_feed_forward(config: EncoderDecoderConfig) -> FeedForwardMaker:
    return lambda: (RMSNorm(config.dim_model, config.eps), T5FeedForward(config))


class EncoderBlock(nn.Module):
    """``h + attn(norm(h))`` over the whole input (both ways), then ``h + ffn(norm(h))``."""

    def __init__(self, config: EncoderDecoderConfig, scale: float, feed_forward: FeedForwardMaker) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim_model, config.eps)
        self.attn = Attention(config, scale=scale)
        self.ffn_norm, self.ffn = feed_forward()

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        h = self.attn(autocast_input(self.attn_norm(h)), bias, None, 0, 0, residual=h)
        return self.ffn(autocast_input(self.ffn_norm(h)), residual=h)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, the feed-forward: each
    ``h + f(norm(h))``."""

    def __init__(self, config: EncoderDecoderConfig, index: int, scale: float, feed_forward: FeedForwardMaker) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(config.dim_model, config.eps)
        self.attn = Attention(config, scale=scale)
        self.cross_norm = RMSNorm(config.dim_model, config.eps)
        self.cross = CrossAttention(config, scale)
        self.ffn_norm, self.ffn = feed_forward()

    def forward(self, h: Tensor, bias: Tensor, keys: Tensor, values: Tensor, cross_bias: Tensor,
                cache: KVCache | None, start: int) -> Tensor:
        h = self.attn(autocast_input(self.attn_norm(h)), bias, cache, self.index, start, residual=h)
        h = self.cross(autocast_input(self.cross_norm(h)), keys, values, cross_bias, residual=h)
        return self.ffn(autocast_input(self.ffn_norm(h)), residual=h)


def additive(seen: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, 1, Lq, Lk]``: 0 where a key is seen, the dtype's finite minimum elsewhere."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


class EncoderDecoder(Transformer):
    """T5's encoder-decoder on the shared stack (see the module docstring).

    State-dict names: ``input_embedding`` (the token table both stacks read), ``encoder_layers``,
    ``encoder_norm``, ``encoder_position_bias.{i}`` and ``decoder_position_bias.{i}`` (one table
    per stack, or one per block with ``bias_per_layer``), ``layers`` (the decoder's blocks),
    ``output_norm`` and, untied, ``output_head``.
    """

    cache_kind: ClassVar[type[KVCache]] = EncoderDecoderCache
    block_lists = ("encoder_layers", "layers")

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__(config)
        scale = config.dim_head ** -0.5 if config.attention_scale else 1.0
        tables = lambda count: nn.ModuleList(  # noqa: E731
            Embedding(config.relative_buckets, config.num_heads) for _ in range(count if config.bias_per_layer else 1))
        ffn = self.feed_forward(config)
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.encoder_position_bias = tables(config.num_encoder_layers)
        self.encoder_layers = nn.ModuleList(EncoderBlock(config, scale, ffn) for _ in range(config.num_encoder_layers))
        self.encoder_norm = RMSNorm(config.dim_model, config.eps)
        self.decoder_position_bias = tables(config.num_layers)
        self.layers = nn.ModuleList(DecoderBlock(config, i, scale, ffn) for i in range(config.num_layers))
        self.output_norm = RMSNorm(config.dim_model, config.eps)
        if not config.tie_word_embeddings:
            self.output_head = nn.Linear(config.dim_model, config.vocab_size, bias=False)

    def feed_forward(self, config: EncoderDecoderConfig) -> FeedForwardMaker:
        """What makes each block's feed-forward sub-block (a family with experts makes its own)."""
        return t5_feed_forward(config)

    # ---- the two stacks ---------------------------------------------------------------------

    def _position_bias(self, table: nn.Module, relative: Tensor, bidirectional: bool, dtype: torch.dtype) -> Tensor:
        buckets = relative_position_bucket(relative, self.config.relative_buckets, self.config.relative_max_distance,
                                           bidirectional)
        return table(buckets).permute(0, 3, 1, 2).to(dtype)  # [B, H, Lq, Lk]

    def _biases(self, tables: nn.ModuleList, count: int, relative: Tensor, bidirectional: bool,
                mask: Tensor) -> list[Tensor]:
        """Each block's attention bias: its stack's position bias (shared or its own) plus ``mask``."""
        shared = [self._position_bias(table, relative, bidirectional, mask.dtype) + mask for table in tables]
        return shared * count if len(shared) == 1 else shared

    def encode(self, input_ids: Tensor, valid: Tensor | None = None, position: Tensor | None = None) -> Tensor:
        """The encoder's output ``[B, E, d]`` (after its final norm); ``valid`` marks padding,
        ``position`` orders tokens (their indices by default)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        position = new_positions(input_ids, None) if position is None else position
        hidden = self.input_embedding(input_ids).to(self.encoder_norm.weight.dtype)
        seen = valid[:, None, :] & valid[:, :, None]
        mask = additive(seen, compute_dtype(hidden))
        relative = position[:, None, :] - position[:, :, None]
        biases = self._biases(self.encoder_position_bias, len(self.encoder_layers), relative, True, mask)
        for block, bias in zip(self.encoder_layers, biases):
            hidden = block(hidden, bias)
        return self.encoder_norm(hidden)

    def encoder_states(self, input_ids: Tensor, valid: Tensor) -> Tensor:
        """The encoder's output for right-padded rows (what embeddings pool)."""
        return self.encode(input_ids, valid)

    def forward(self, input_ids: Tensor, segment: Tensor | None = None, context: Tensor | None = None,
                span: Tensor | None = None, valid: Tensor | None = None, cache: KVCache | None = None,
                position: Tensor | None = None, last: int | None = None) -> Tensor:
        """The decoder's final hidden states ``[B, n, d]`` of the new decoder positions: with an
        empty cache (or none) the row is a prompt (encoder tokens, then the decoder's start:
        ``n`` is 1), else every position is a decoder token. ``segment``, ``context`` and
        ``span`` are ignored (CPM-Ant's inputs, which the engine passes every family)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        position = new_positions(input_ids, cache) if position is None else position
        prompt = cache is None or cache.length == 0
        zeros = torch.zeros_like(input_ids, dtype=torch.int32)
        flags = prompt_context(input_ids) if prompt else torch.zeros_like(input_ids, dtype=torch.bool)
        query = mask_inputs(flags, zeros, zeros, valid, position)
        key = cache.append_inputs(query) if cache is not None else query
        encoded = self.encode(input_ids[:, :-1], valid[:, :-1], position[:, :-1]) if prompt else None
        new = slice(-1, None) if prompt else slice(None)
        hidden = self.input_embedding(input_ids[:, new]).to(self.output_norm.weight.dtype)
        dtype = compute_dtype(hidden)
        q_position, q_valid = position[:, new], valid[:, new]
        seen = (~key["context"] & key["valid"])[:, None, :] & (key["position"][:, None, :] <= q_position[:, :, None])
        relative = key["position"][:, None, :] - q_position[:, :, None]
        biases = self._biases(self.decoder_position_bias, len(self.layers), relative, False,
                              additive(seen & q_valid[:, :, None], dtype))
        cross_bias = additive((key["context"] & key["valid"])[:, None, :], dtype)
        if cache is None:  # a prompt read without a cache: the start token's only key is itself
            biases = [bias[..., -1:] for bias in biases]
        if not prompt:
            decoded = native_decode.decode_step(self, hidden, cache, RMSNorm, T5FeedForward,
                                                lambda block: biases[block.index], cross_bias=cross_bias)
            if decoded is not None:
                return self.output_norm(decoded)
        start = (cache.length if cache is not None else 0) + (input_ids.size(1) - 1 if prompt else 0)
        columns = key["valid"].size(1)
        for block, bias in zip(self.layers, biases):
            keys, values = self._cross_keys(block, encoded, cache, columns)
            hidden = block(hidden, bias, keys, values, cross_bias[..., :keys.size(2)], cache, start)
        if cache is not None:
            cache.advance(input_ids.size(1))
        return self.output_norm(hidden)

    def _cross_keys(self, block: DecoderBlock, encoded: Tensor | None, cache: KVCache | None,
                    columns: int) -> tuple[Tensor, Tensor]:
        """A decoder block's cross-attention keys and values: from the encoder's output in a
        prefill (and kept in the cache's layer ``L + block``), else from the cache."""
        layer = len(self.layers) + block.index
        if encoded is not None:
            keys, values = block.cross.keys_values(encoded)
            return cache.store(layer, 0, keys, values) if cache is not None else (keys, values)
        if cache is None or cache.keys[layer] is None:
            raise CpmliveError("an encoder-decoder's decoding step needs the cache its prompt was read into")
        return cache.keys[layer][:, :, :columns], cache.values[layer][:, :, :columns]

    def seq2seq(self, encoder_ids: Tensor, decoder_ids: Tensor, encoder_valid: Tensor | None = None,
                decoder_valid: Tensor | None = None) -> Tensor:
        """Teacher forcing: the decoder's final hidden states ``[B, D, d]`` for ``decoder_ids``
        (right-padded, starting with the start token) reading ``encoder_ids`` (padding anywhere,
        marked by ``encoder_valid``)."""
        encoder_valid = encoder_ids >= 0 if encoder_valid is None else encoder_valid.bool()
        decoder_valid = decoder_ids >= 0 if decoder_valid is None else decoder_valid.bool()
        encoded = self.encode(encoder_ids, encoder_valid)
        hidden = self.input_embedding(decoder_ids).to(self.output_norm.weight.dtype)
        dtype = compute_dtype(hidden)
        position = new_positions(decoder_ids, None)
        seen = decoder_valid[:, None, :] & (position[:, None, :] <= position[:, :, None])
        relative = position[:, None, :] - position[:, :, None]
        biases = self._biases(self.decoder_position_bias, len(self.layers), relative, False, additive(seen, dtype))
        cross_bias = additive(encoder_valid[:, None, :], dtype)
        for block, bias in zip(self.layers, biases):
            keys, values = block.cross.keys_values(encoded)
            hidden = block(hidden, bias, keys, values, cross_bias, None, 0)
        return self.output_norm(hidden)

    # ---- the head and the cache -------------------------------------------------------------

    def _head_scale(self) -> float:
        return self.config.dim_model ** -0.5 if self.config.scale_head else 1.0

    def logits(self, hidden: Tensor) -> Tensor:
        """The head (its own matrix, or the token table), its input scaled by ``dim_model ** -0.5``
        first where the config says so (T5 v1.0)."""
        scale = self._head_scale()
        hidden = hidden if scale == 1.0 else hidden * scale
        return project(hidden, self.output_head) if hasattr(self, "output_head") else super().logits(hidden)

    def head_weight(self) -> Tensor:
        """The head as one float matrix: ``logits == hidden @ head_weight().T``."""
        if not hasattr(self, "output_head"):
            weight = super().head_weight()
        else:
            dequantized = getattr(self.output_head, "dequantized", None)
            weight = dequantized() if dequantized is not None else self.output_head.weight
        return weight * self._head_scale()

    def prompt_tail(self) -> list[int]:
        """A prompt row is the encoder's tokens, then the decoder's start token."""
        return [self.config.decoder_start_id]

    @property
    def cache_layers(self) -> int:
        """Layers of its decoding cache: the decoder's own, then the cross-attention's."""
        return 2 * self.config.num_layers

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if capacity > self.config.max_length:
            raise CpmliveError(f"{capacity} positions needed (the input and the new tokens); the model takes at most "
                               f"{self.config.max_length}: shorten the input or lower max_new_tokens")
        return self.cache_kind(batch=batch, capacity=capacity, num_layers=self.cache_layers,
                               device=self.input_embedding.weight.device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Linear layers N(0, 1/fan_in) (the residual writers scaled down with depth), unit norms,
        small token and position-bias tables."""
        tables = (self.input_embedding, *self.encoder_position_bias, *self.decoder_position_bias)
        init_stack(self, len(self.layers) + len(self.encoder_layers), tables, seed)


__all__ = ["CrossAttention", "DecoderBlock", "EncoderBlock", "EncoderDecoder", "EncoderDecoderCache",
           "FeedForwardMaker", "T5FeedForward", "prompt_context", "t5_feed_forward"]
