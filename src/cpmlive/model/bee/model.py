"""CPM-Bee (spec section 7.2): CPM-Ant's blocks with a different way of telling tokens apart.

Shared with CPM-Ant (``model.ant``'s blocks on ``model.stack``): the RMS norms, the attention and
the gated-GELU FFN, with OpenBMB's 1/sqrt(fan-in) factors folded into the weights. What differs,
and is spelled out here:

* **Residuals are scaled:** ``h = (h + sublayer(norm(h))) / 1.05`` after both sub-blocks.
* **No prompt or segment embedding.** A token is its embedding ``E[id]`` (stored as
  ``E / sqrt(d)``, which is what both the input and the tied output head use), rotated as a whole
  by the angle ``sub * 16 * inv_freq`` where ``sub`` tells ``<mask_1>`` from ``<mask_2>``
  (``sub == 0``: no rotation).
* **Position bias from the JSON tree:** within one segment, the bucketed distance of token
  positions; between segments, an entry for how the two tree nodes relate (``segment_rel``,
  built by ``data.bee``), or bucket 1 for different samples.
* **Extra output columns:** logits are ``h @ E^T`` followed by ``h @ ext^T`` for the batch's
  extra tokens (``<mask_1>``, ``<option_2>`` ...), each embedded as an input would be.
* **Masks:** CPM-Ant's context/direction/span mask, plus: a token of an in-context example
  (``sample_ids > 0``) sees only its own example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.bee.config import BeeConfig
from cpmlive.model.cache import MASK_INPUTS, KVCache, new_positions
from cpmlive.model.stack import (Embedding, FeedForward, RMSNorm, Transformer, build, gated_block, init_stack,
                                 relative_position_bucket)
from cpmlive.utils import compute_dtype

RESIDUAL_SCALE = 1.05
SUB_DISTANCE_SCALE = 16
KEY_INPUTS = (*MASK_INPUTS, "sample_ids")


@dataclass
class BeeCache(KVCache):
    """:class:`~cpmlive.model.cache.KVCache` that also keeps each cached position's sample id,
    and each row's segment relation table (fixed for a row's whole decoding)."""

    inputs: ClassVar[tuple[str, ...]] = KEY_INPUTS

    sample_ids: Tensor | None = None
    segment_rel: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        if self.segment_rel is not None:
            self.segment_rel = self.segment_rel.index_select(0, index)


def rotate_by_sub(x: Tensor, sub: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate each vector of ``x`` (rotate-half form) by ``sub * 16 * inv_freq``."""
    freqs = (sub * SUB_DISTANCE_SCALE)[..., None].to(inv_freq.dtype) * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


class CpmBee(Transformer):
    cache_kind = BeeCache

    def __init__(self, config: BeeConfig) -> None:
        super().__init__(config)
        self.input_embedding = Embedding(config.vocab_size, config.dim_model)
        self.position_bias = Embedding(config.position_bias_num_buckets + config.position_bias_num_segment_buckets,
                                          config.num_heads)
        self.layers = nn.ModuleList(gated_block(config, i, RESIDUAL_SCALE) for i in range(config.num_layers))
        self.output_norm = RMSNorm(config.dim_model, config.eps)
        self._inv_freq: Tensor | None = None

    # ---- embeddings -----------------------------------------------------------------------------

    def inv_freq(self, device: torch.device) -> Tensor:
        """The rotation's frequencies (made on first use: a model built on the meta device and
        then given weights still has real ones); float16 checkpoints round them to float16,
        as the original does."""
        if self._inv_freq is None or self._inv_freq.device != device:
            dim = self.config.dim_model
            inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
            self._inv_freq = inv_freq.to(torch.float16 if self.config.half else torch.float32)
        return self._inv_freq

    def embed(self, ids: Tensor, sub: Tensor) -> Tensor:
        hidden = self.input_embedding(ids)
        if not bool((sub != 0).any()):
            return hidden  # a zero angle is the identity
        return rotate_by_sub(hidden, sub, self.inv_freq(hidden.device))

    def logits(self, hidden: Tensor, ext_ids: Tensor | None = None, ext_subs: Tensor | None = None) -> Tensor:
        """``[..., vocab + E]``: the tied head, then one column per extra token."""
        logits = super().logits(hidden)
        if ext_ids is None or ext_ids.numel() == 0:
            return logits
        ext = self.embed(ext_ids.long(), ext_subs).to(logits.dtype)
        return torch.cat([logits, hidden.to(ext.dtype) @ ext.T], dim=-1)

    # ---- the bias and mask ----------------------------------------------------------------------

    def attention_bias(self, query: dict[str, Tensor], key: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Position bias plus mask, ``[B, H, Lq, Lk]``.

        ``query`` holds ``context``, ``span``, ``segment``, ``valid``, ``position``,
        ``sample_ids``, ``num_segments``, ``segment_rel_offset`` and ``segment_rel`` (``[B, R]``);
        ``key`` the first six for every key column.
        """
        cfg = self.config
        same = (query["sample_ids"][:, :, None] == key["sample_ids"][:, None, :]) & \
               (query["span"][:, :, None] == key["span"][:, None, :])
        pair = (query["segment"][:, :, None] * query["num_segments"][:, :, None] + key["segment"][:, None, :]
                + query["segment_rel_offset"][:, :, None])
        pair = pair.masked_fill(~same, 0).clamp(0, query["segment_rel"].size(1) - 1)
        batch, len_q, len_k = pair.shape
        relation = torch.gather(query["segment_rel"].long(), 1, pair.view(batch, -1).long()).view(batch, len_q, len_k)
        relation = relation.masked_fill(~same, 1)
        q_pos, k_pos = query["position"][:, :, None], key["position"][:, None, :]
        distance = relative_position_bucket(k_pos - q_pos, cfg.position_bias_num_buckets,
                                            cfg.position_bias_max_distance)
        bucket = torch.where(relation == 0, distance.long(), relation - 1 + cfg.position_bias_num_buckets)
        bias = self.position_bias(bucket).permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)

        visible = key["context"][:, None, :] | (~query["context"][:, :, None] & (k_pos <= q_pos))
        visible = visible & ((query["sample_ids"][:, :, None] == 0) |
                             (query["sample_ids"][:, :, None] == key["sample_ids"][:, None, :]))
        visible = visible & (query["span"][:, :, None] == key["span"][:, None, :])
        visible = visible & query["valid"][:, :, None] & key["valid"][:, None, :]
        return bias.masked_fill_(~visible[:, None], torch.finfo(dtype).min)

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, input_sub: Tensor, context: Tensor, segment: Tensor, segment_rel: Tensor,
                num_segments: Tensor, valid: Tensor, span: Tensor | None = None, sample_ids: Tensor | None = None,
                segment_rel_offset: Tensor | None = None, position: Tensor | None = None,
                cache: BeeCache | None = None, last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given positions (see ``CpmAnt.forward``: with
        a cache they are the positions after ``cache.length``; ``segment_rel`` is then the
        cache's own when not given)."""
        zeros = torch.zeros_like(input_ids, dtype=torch.int32)
        position = new_positions(input_ids, cache) if position is None else position
        query = {"context": context.bool(), "span": zeros if span is None else span, "segment": segment,
                 "valid": valid.bool(), "position": position, "sample_ids": zeros if sample_ids is None else sample_ids}
        if cache is not None:
            if isinstance(cache, BeeCache) and cache.segment_rel is None:
                cache.segment_rel = segment_rel
            key = cache.append_inputs(query)
        else:
            key = query
        query.update(num_segments=num_segments, segment_rel=segment_rel,
                     segment_rel_offset=zeros if segment_rel_offset is None else segment_rel_offset)
        hidden = self.embed(input_ids.long(), input_sub)
        bias = self.attention_bias(query, key, compute_dtype(hidden))
        decoded = native_decode.decode_step(self, hidden, cache, RMSNorm, FeedForward, bias)
        if decoded is not None:  # a decoding step in one native call (model.runtime.native_decode)
            return self.output_norm(decoded)
        return self.output_norm(self.run_layers(hidden, bias, cache, last))

    # ---- helpers ----------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> BeeCache:
        return self.make_cache(batch, capacity, "the task and its answers", shorten="the input")

    def init_weights(self, seed: int | None = None) -> None:
        """As CPM-Ant's (:func:`~cpmlive.model.stack.init_stack`)."""
        init_stack(self, self.config.num_layers, (self.input_embedding,), seed, zeroed=(self.position_bias,))


def build_bee(config: BeeConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              seed: int | None = 0) -> CpmBee:
    return build(CpmBee, config, device, dtype, seed)


__all__ = ["BeeCache", "CpmBee", "build_bee", "rotate_by_sub"]
