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
The blocks, the layer loop and the head are the shared stack's (``model.stack``); how those
products and attention are computed on CPU is ``model.runtime.kernels``' business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cpmlive.model.ant.config import AntConfig
from cpmlive.model.cache import KVCache, mask_inputs, new_positions
import cpmlive.model.runtime.native_decode as native_decode
from cpmlive.model.stack import (Embedding, FeedForward, RMSNorm, Transformer, build, gated_block, init_stack,
                                 relative_position_bucket)
from cpmlive.utils import compute_dtype


class CpmAnt(Transformer):
    def __init__(self, config: AntConfig) -> None:
        super().__init__(config)
        d = config.dim_model
        self.input_embedding = Embedding(config.vocab_size, d)
        self.prompt_embedding = Embedding(config.prompt_types * config.prompt_length, d)
        self.segment_embedding = Embedding(config.segment_types, d)
        self.position_bias = Embedding(
            config.segment_types**2 + config.position_bias_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(gated_block(config, i) for i in range(config.num_layers))
        self.output_norm = RMSNorm(d, config.eps)

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
                valid: Tensor, cache: KVCache | None = None, position: Tensor | None = None,
                last: int | None = None) -> Tensor:
        """Final hidden states ``[B, L, d]`` of the given (new) positions.

        Without a cache the inputs are whole rows. With one, they are the positions after
        ``cache.length``; mask inputs of the earlier positions come from the cache. ``last``
        returns only the last ``last`` positions, and the final block computes only those (a
        prompt's prefill needs the last position's output and every position's keys and values).
        """
        start = cache.length if cache is not None else 0
        position = new_positions(input_ids, cache) if position is None else position
        query = mask_inputs(context, span, segment, valid, position)
        key = cache.append_inputs(query) if cache is not None else query
        hidden = self.embed(input_ids, segment, start)
        bias = self.attention_bias(query, key, compute_dtype(hidden))
        decoded = self._decode_natively(hidden, bias, cache)
        if decoded is not None:
            cache.advance(hidden.size(1))
            return self.output_norm(decoded)
        return self.output_norm(self.run_layers(hidden, bias, cache, last))

    def _decode_natively(self, hidden: Tensor, bias: Tensor, cache: KVCache | None) -> Tensor | None:
        """The blocks' output from one native call (``model.native_decode``) when this is a
        decoding step it can take, else ``None``."""
        if not native_decode.applies(self, hidden, cache):
            return None
        step = native_decode.plan(self, RMSNorm, FeedForward)
        return None if step is None else native_decode.decode_blocks(self, step, hidden, bias, cache)

    # ---- helpers ----------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A cache for ``capacity`` positions (prompt ids, text and new tokens)."""
        holding = f"the {self.config.prompt_length} prompt ids, the text and the new tokens"
        return self.make_cache(batch, capacity, holding)

    def init_weights(self, seed: int | None = None) -> None:
        """An init that trains stably from scratch (:func:`~cpmlive.model.stack.init_stack`)."""
        init_stack(self, self.config.num_layers, (self.input_embedding, self.prompt_embedding, self.segment_embedding),
                   seed, zeroed=(self.position_bias,))


def build_model(config: AntConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = 0) -> CpmAnt:
    """A freshly initialised model (``seed=None`` leaves torch's global RNG in charge)."""
    return build(CpmAnt, config, device, dtype, seed)


__all__ = ["CpmAnt", "build_model"]
