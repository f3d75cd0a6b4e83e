"""CPM-Ant (spec section 1): one pre-LN Transformer stack that both reads and writes.

Which token sees which is decided by three per-token inputs only:

* ``context``: context tokens see every context token of their span, in both directions;
  other tokens see the context plus every token at or before themselves (left-to-right);
* ``span``: packed samples in one row never see each other;
* ``valid``: padding is neither a query nor a key.

Positions enter only through a bias shared by all layers: a bucketed relative distance for
pairs in the same segment, a learned (query segment, key segment) entry otherwise.

Weights are stored with OpenBMB's 1/sqrt(fan-in) factors folded in (the HF layout), so every
layer is a plain ``nn.Linear`` and the tied output head is ``hidden @ input_embedding.T``.
How those products and attention are computed on CPU is ``model.kernels``' business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cpmlive.model.ant.config import AntConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.runtime.kernels import attention, project
import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.runtime.moe import MoEFeedForward
from cpmlive.model.runtime.quant import count_parameters
from cpmlive.utils import compute_dtype


class Embedding(nn.Embedding):
    """``nn.Embedding`` without its random init on the meta device (shapes only, no values).

    Every load builds the model on meta first (``empty_model``); there torch draws ``normal_``
    through a Python reference wrapped in ``torch._dynamo.disable``, so the first meta embedding
    imports all of ``torch._dynamo``, which costs more than the rest of the load. On a real
    device the init is torch's, drawing from the same generator as before."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Weight-only RMS norm; the normalisation is done in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # The same float32 arithmetic in one call (fewer dispatches when decoding).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


@dataclass
class AntCache:
    """Keys, values and the mask inputs of every position decoded so far.

    Buffers hold ``capacity`` positions and are allocated on first use with the dtype the
    layers produce (so bf16 autocast gets a bf16 cache).
    """

    batch: int
    capacity: int
    num_layers: int
    device: torch.device | str = "cpu"
    length: int = 0
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    context: Tensor | None = None
    span: Tensor | None = None
    segment: Tensor | None = None
    valid: Tensor | None = None
    position: Tensor | None = None

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        shape = (self.batch, self.capacity)
        self.context = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.span = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.segment = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.position = torch.zeros(shape, dtype=torch.int32, device=self.device)

    def append_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Record the mask inputs of new positions; return those of every cached position."""
        start, end = self.length, self.length + inputs["context"].size(1)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} needed")
        for name in MASK_INPUTS:
            getattr(self, name)[:, start:end] = inputs[name]
        return {name: getattr(self, name)[:, :end] for name in MASK_INPUTS}

    def store(self, layer: int, start: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values and return everything cached up to them."""
        if self.keys[layer] is None:
            shape = (self.batch, key.size(1), self.capacity, key.size(3))
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        end = start + key.size(2)
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def adopt(self, rows: Tensor, columns: Tensor, other: "AntCache") -> None:
        """Copy the keys and values of ``other``'s positions ``0..len(columns)`` into ``rows`` x
        ``columns`` of this cache (a group of prompts prefilled on its own; see ``infer.generate``)."""
        for store, source in ((self.keys, other.keys), (self.values, other.values)):
            for layer, tensor in enumerate(source):
                if tensor is None:  # a layer without attention
                    continue
                if store[layer] is None:
                    store[layer] = tensor.new_zeros(self.batch, tensor.size(1), self.capacity, tensor.size(3))
                piece = tensor[:, :, :columns.numel()]
                for index, row in enumerate(rows.tolist()):
                    store[layer][row].index_copy_(1, columns, piece[index])

    def write_columns(self) -> Tensor:
        """The column each row's next position goes to (``[B]``, int64): ``length`` for all rows."""
        return torch.full((self.batch,), self.length, dtype=torch.int64, device=self.device)

    def next_positions(self, count: int) -> Tensor:
        """Token positions of ``count`` new positions per row when the caller gives none."""
        return torch.arange(self.length, self.length + count, dtype=torch.int32,
                            device=self.device).expand(self.batch, count)

    def advance(self, count: int) -> None:
        self.length += count

    def reorder(self, index: Tensor) -> None:
        """Keep the rows ``index`` (beam search re-ranks its hypotheses every step)."""
        for store in (self.keys, self.values):
            for layer, tensor in enumerate(store):
                if tensor is not None:
                    store[layer] = tensor.index_select(0, index)
        for name in MASK_INPUTS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.batch = int(index.numel())


MASK_INPUTS = ("context", "span", "segment", "valid", "position")


class SlotCache(AntCache):
    """An :class:`AntCache` whose rows have lengths of their own (``lengths``, ``[B]`` int64): the
    rows of an engine's running batch, each a request that joined at another time.

    It takes one new position per row per forward: row ``r``'s goes to column ``lengths[r]`` and
    is also its token position (a row's columns are its positions, from its own prefill on).
    Attention spans ``max(lengths) + 1`` columns; what a shorter row has not written is invalid
    in its mask inputs, so it is never seen. The buffers are given (views of the engine's pool).
    """

    def __init__(self, keys: list[Tensor | None], values: list[Tensor | None], masks: dict[str, Tensor],
                 lengths: Tensor) -> None:
        batch, capacity = masks["valid"].shape
        self.batch, self.capacity, self.num_layers = batch, capacity, len(keys)
        self.device = lengths.device
        self.keys, self.values, self.lengths = keys, values, lengths
        for name in MASK_INPUTS:
            setattr(self, name, masks[name])
        self.length = int(lengths.max()) if batch else 0

    def _rows(self) -> Tensor:
        return torch.arange(self.batch, device=self.device)

    def append_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if inputs["context"].size(1) != 1:
            raise ValueError("a slot cache takes one new position per row")
        if self.length + 1 > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {self.length + 1} needed")
        rows = self._rows()
        for name in MASK_INPUTS:
            getattr(self, name)[rows, self.lengths] = inputs[name][:, 0]
        return {name: getattr(self, name)[:, :self.length + 1] for name in MASK_INPUTS}

    def store(self, layer: int, start: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        rows = self._rows()
        self.keys[layer][rows, :, self.lengths] = key[:, :, 0]
        self.values[layer][rows, :, self.lengths] = value[:, :, 0]
        end = self.length + 1
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_columns(self) -> Tensor:
        return self.lengths

    def next_positions(self, count: int) -> Tensor:
        return self.lengths.to(torch.int32)[:, None]

    def advance(self, count: int) -> None:
        self.lengths += count
        self.length = int(self.lengths.max())

    def adopt(self, rows: Tensor, columns: Tensor, other: AntCache) -> None:
        raise NotImplementedError("a slot cache is filled by its engine")

    def reorder(self, index: Tensor) -> None:
        raise NotImplementedError("a slot cache is reordered by its engine")


class Attention(nn.Module):
    """Bias-free q, k, v and output projections around ``softmax(q kᵀ / sqrt(d_head) + bias) v``."""

    def __init__(self, config: AntConfig) -> None:
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        self.dropout_p = config.dropout_p
        self.project_q = nn.Linear(config.dim_model, config.dim_attention, bias=False)
        self.project_k = nn.Linear(config.dim_model, config.dim_attention, bias=False)
        self.project_v = nn.Linear(config.dim_model, config.dim_attention, bias=False)
        self.attention_out = nn.Linear(config.dim_attention, config.dim_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, cache: AntCache | None, layer: int, start: int,
                residual: Tensor, queries: int | None = None) -> Tensor:
        """``residual`` plus the attention output (the sum is the output projection's epilogue);
        with ``queries``, only for the last ``queries`` positions (keys and values still cover
        them all)."""
        q = self._heads(project(x if queries is None else x[:, -queries:], self.project_q))
        k, v = self._heads(project(x, self.project_k)), self._heads(project(x, self.project_v))
        if cache is not None:
            k, v = cache.store(layer, start, k, v)
        out = attention(q, k, v, bias, self.dropout_p if self.training else 0.0)
        batch, _, length, _ = out.shape
        return project(out.transpose(1, 2).reshape(batch, length, -1), self.attention_out, "residual", residual)


class FeedForward(nn.Module):
    """Gated GELU: ``w_out(gelu(w_0 x) * w_1 x)``."""

    def __init__(self, config: AntConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual`` plus the FFN output (the sum is the last projection's epilogue)."""
        gated = project(x, self.w_1, "gate", project(x, self.w_0, "gelu"))
        return project(gated, self.w_out, "residual", residual)


class Block(nn.Module):
    """Pre-LN block; a removed sub-block (compressed checkpoints) is simply absent."""

    def __init__(self, config: AntConfig, index: int) -> None:
        super().__init__()
        self.index = index
        if config.has_attention(index):
            self.attn_norm = RMSNorm(config.dim_model, config.eps)
            self.attn = Attention(config)
        if config.has_ffn(index):
            self.ffn_norm = RMSNorm(config.dim_model, config.eps)
            self.ffn = FeedForward(config) if config.moe is None else MoEFeedForward(config)

    def forward(self, h: Tensor, bias: Tensor, cache: AntCache | None = None, start: int = 0,
                keep: int | None = None) -> Tensor:
        """``keep``: compute the output of the last ``keep`` positions only."""
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


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype when autocast is on: cast once here rather than once by each
    of the projections that read it (three for attention, two for the FFN)."""
    return x.to(compute_dtype(x))


def token_positions(input_ids: Tensor, start: int = 0) -> Tensor:
    """Position of every token when none are given: its index, counted from ``start``."""
    return torch.arange(start, start + input_ids.size(1), dtype=torch.int32,
                        device=input_ids.device).expand_as(input_ids)


def mask_inputs(context: Tensor, span: Tensor, segment: Tensor, valid: Tensor, position: Tensor) -> dict[str, Tensor]:
    """The per-token inputs the attention mask and position bias are made of, as the cache keeps them."""
    return {"context": context.bool(), "span": span, "segment": segment, "valid": valid.bool(), "position": position}


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional buckets; float32 ``log`` exactly as the reference computes it."""
    half = num_buckets // 2
    offset = (relative > 0).to(torch.int32) * half
    distance = relative.abs()
    max_exact = half // 2
    scaled = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    large = torch.clamp(max_exact + scaled.to(torch.int32), max=half - 1)
    return offset + torch.where(distance < max_exact, distance.to(torch.int32), large)


class CpmAnt(nn.Module):
    def __init__(self, config: AntConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim_model
        self.input_embedding = Embedding(config.vocab_size, d)
        self.prompt_embedding = Embedding(config.prompt_types * config.prompt_length, d)
        self.segment_embedding = Embedding(config.segment_types, d)
        self.position_bias = Embedding(
            config.segment_types**2 + config.position_bias_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.output_norm = RMSNorm(d, config.eps)
        self.gradient_checkpointing = False

    # ---- the pieces of the forward pass ---------------------------------------------------

    def embed(self, input_ids: Tensor, segment: Tensor, start: int = 0) -> Tensor:
        """Prompt-table rows are named two ways: by the first ``prompt_length`` columns of a row
        (OpenBMB's generation layout) or by ids ``vocab_size + k`` anywhere (HF's layout, and how
        our packed training rows give every span its own prompt)."""
        vocab = self.config.vocab_size
        in_prompt = max(0, min(input_ids.size(1), self.config.prompt_length - start))
        if in_prompt:
            head = input_ids[:, :in_prompt]
            input_ids = torch.cat([torch.where(head < vocab, head + vocab, head), input_ids[:, in_prompt:]], dim=1)
        is_prompt = input_ids >= vocab
        hidden = self.input_embedding(input_ids.clamp(max=vocab - 1))
        if is_prompt.any():
            prompt = self.prompt_embedding((input_ids - vocab).clamp(min=0))
            hidden = torch.where(is_prompt[..., None], prompt, hidden)
        return hidden + self.segment_embedding(segment)

    def attention_bias(self, query: dict[str, Tensor], key: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Position bias plus the unified mask, ``[B, H, Lq, Lk]``, computed once per forward.

        ``query``/``key`` hold ``context``, ``span``, ``segment``, ``valid`` and ``position`` of
        the query rows and of all key columns. Positions are token indices unless the caller
        gives others (infilling decodes blanks after the text to their right).
        """
        cfg = self.config
        q_pos, k_pos = query["position"][:, :, None], key["position"][:, None, :]
        distance = relative_position_bucket(k_pos - q_pos, cfg.position_bias_num_buckets,
                                            cfg.position_bias_max_distance)
        q_seg, k_seg = query["segment"][:, :, None], key["segment"][:, None, :]
        segment_pair = cfg.position_bias_num_buckets + q_seg * cfg.segment_types + k_seg
        bucket = torch.where(q_seg == k_seg, distance, segment_pair)
        # Contiguous: attention kernels read a permuted [B, H, Lq, Lk] mask more slowly (benchmarks/README.md).
        bias = self.position_bias(bucket).permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)

        visible = key["context"][:, None, :] | (~query["context"][:, :, None] & (k_pos <= q_pos))
        visible = visible & (query["span"][:, :, None] == key["span"][:, None, :])
        visible = visible & query["valid"][:, :, None] & key["valid"][:, None, :]
        # A finite fill keeps fully masked (padding) rows finite instead of NaN.
        return bias.masked_fill_(~visible[:, None], torch.finfo(dtype).min)

    def forward(self, input_ids: Tensor, segment: Tensor, context: Tensor, span: Tensor,
                valid: Tensor, cache: AntCache | None = None, position: Tensor | None = None,
                last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given (new) positions.

        Without a cache the inputs are whole rows. With one, they are the positions after
        ``cache.length``; mask inputs of the earlier positions come from the cache. ``last``
        returns only the last ``last`` positions, and the final block computes only those (a
        prompt's prefill needs the last position's output and every position's keys and values).
        """
        start = cache.length if cache is not None else 0
        if position is None:
            position = token_positions(input_ids) if cache is None else cache.next_positions(input_ids.size(1))
        query = mask_inputs(context, span, segment, valid, position)
        key = cache.append_inputs(query) if cache is not None else query
        hidden = self.embed(input_ids, segment, start)
        bias = self.attention_bias(query, key, compute_dtype(hidden))
        decoded = self._decode_natively(hidden, bias, cache)
        if decoded is not None:
            cache.advance(1)
            return self.output_norm(decoded)
        for index, block in enumerate(self.layers):
            keep = last if index == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = checkpoint(block, hidden, bias, None, 0, keep, use_reentrant=False)
            else:
                hidden = block(hidden, bias, cache, start, keep)
        if cache is not None:
            cache.advance(input_ids.size(1))
        return self.output_norm(hidden)

    def _decode_natively(self, hidden: Tensor, bias: Tensor, cache: AntCache | None) -> Tensor | None:
        """The blocks' output from one native call (``model.native_decode``) when this is a
        decoding step it can take, else ``None``."""
        if not native_decode.applies(self, hidden, cache):
            return None
        step = native_decode.plan(self, RMSNorm, FeedForward)
        return None if step is None else native_decode.decode_blocks(self, step, hidden, bias, cache)

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output head over the real vocabulary (prompt rows are never outputs)."""
        head = getattr(self.input_embedding, "head", None)  # a quantized table multiplies itself
        return head(hidden) if head is not None else project(hidden, self.input_embedding.weight)

    def head_weight(self) -> Tensor:
        """The tied head's float weight (dequantized for a quantized table)."""
        dequantized = getattr(self.input_embedding, "dequantized", None)
        return dequantized() if dequantized is not None else self.input_embedding.weight

    # ---- helpers ----------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> AntCache:
        """A cache for ``capacity`` positions (prompt ids, text and new tokens): at most the
        model's ``max_length``, which also bounds what a huge ``max_new_tokens`` would allocate."""
        if capacity > self.config.max_length:
            raise CpmliveError(f"{capacity} positions needed (the {self.config.prompt_length} prompt ids, the text "
                               f"and the new tokens); the model takes at most {self.config.max_length}: "
                               "shorten the text or lower max_new_tokens")
        return AntCache(batch=batch, capacity=capacity, num_layers=self.config.num_layers,
                        device=self.input_embedding.weight.device)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def init_weights(self, seed: int | None = None) -> None:
        """An init that trains stably from scratch (:func:`init_stack`)."""
        init_stack(self, self.config.num_layers, (self.input_embedding, self.prompt_embedding, self.segment_embedding),
                   seed)


@torch.no_grad()
def init_stack(model: nn.Module, num_layers: int, embeddings: tuple[nn.Embedding, ...], seed: int | None) -> None:
    """Linear layers get std 1/sqrt(fan_in) (OpenBMB's unit-scaled N(0,1) with the scale
    folded in); the projections that write into the residual stream are further divided
    by sqrt(2 * num_layers) so the stream does not grow with depth; embeddings start small
    (std 0.02, as OpenBMB's) and the position bias at zero."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    depth_scale = 1.0 / math.sqrt(2 * num_layers)

    def normal(tensor: Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            if name.endswith(("attention_out", "w_out")):
                std *= depth_scale
            normal(module.weight, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    for embedding in embeddings:
        normal(embedding.weight, 0.02)
    model.position_bias.weight.zero_()


def build_model(config: AntConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = 0) -> CpmAnt:
    """A freshly initialised model (``seed=None`` leaves torch's global RNG in charge)."""
    model = CpmAnt(config)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


__all__ = ["AntCache", "CpmAnt", "Embedding", "RMSNorm", "SlotCache", "build_model", "relative_position_bucket"]
