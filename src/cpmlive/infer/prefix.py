"""Prefix caching: the keys and values of prompts kept across requests (chat turns, a shared system
prompt, few-shot examples), so that a new prompt prefills only what it does not share.

A left-to-right model (the decoder family, CPM-1) computes a prompt token's keys and values from
the tokens before it alone, so any shared prefix can be reused: prompts are cut into blocks of
:data:`BLOCK` tokens, each block keyed by a hash of everything up to its end (the adapter and its
prompt task included), and a new prompt takes the longest run of cached blocks from its start
(at least its last token is always computed: the first new token needs its output).

CPM-Ant reads its prompt in both directions: every prompt token's keys depend on every other one,
so a prompt that shares only a prefix with another must be computed anew. There only an identical
prompt is reused, whole, with the hidden state its first token is chosen from.

Blocks live in an LRU within ``capacity`` bytes (``Engine(prefix_cache_bytes=...)``, ``serve
--prefix-cache``); the hit rate (prompt tokens reused / prompt tokens) is in ``/metrics``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from cpmlive.model.cache import KVCache

BLOCK = 16  # prompt tokens a block holds
DEFAULT_BYTES = 256 * 2**20


@dataclass
class Block:
    """The keys, values (per layer ``[heads, columns, dim_head]``, ``None`` for a layer without
    attention) and mask inputs (``[columns]``) of some cache columns; ``hidden``: the last
    position's output where the block ends a whole prompt (CPM-Ant's reuse)."""

    tokens: tuple[int, ...]
    parent: int | None  # the key of the block before it (a chain is checked link by link)
    keys: list[Tensor | None]
    values: list[Tensor | None]
    inputs: dict[str, Tensor]
    hidden: Tensor | None = None

    def nbytes(self) -> int:
        tensors = [t for t in (*self.keys, *self.values, *self.inputs.values(), self.hidden) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """Prompt blocks by content hash, least recently used first out (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_BYTES, causal: bool = True) -> None:
        self.capacity, self.causal = capacity, causal
        self.blocks: OrderedDict[int, Block] = OrderedDict()
        self.bytes = 0
        self.queried_tokens = self.hit_tokens = 0

    # ---- lookup -----------------------------------------------------------------------------

    def _keys(self, scope: tuple, ids: list[int]) -> list[tuple[int, tuple[int, ...], int | None]]:
        """(hash, tokens, the previous block's hash) of each whole block of ``ids`` (CPM-Ant: one
        key for the whole prompt)."""
        if not self.causal:
            return [(hash((scope, tuple(ids))), tuple(ids), None)]
        keys, chain, parent = [], hash(scope), None
        for start in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
            tokens = tuple(ids[start:start + BLOCK])
            chain = hash((chain, tokens))
            keys.append((chain, tokens, parent))
            parent = chain
        return keys

    def lookup(self, scope: tuple, ids: list[int]) -> list[Block]:
        """The cached blocks ``ids`` starts with (counted in the hit rate): for a left-to-right
        model whole blocks short of its last token, for CPM-Ant the whole prompt or nothing."""
        found: list[tuple[int, Block]] = []
        if self.capacity > 0:
            usable = ids if not self.causal else ids[:len(ids) - 1]
            for key, tokens, parent in self._keys(scope, usable):
                block = self.blocks.get(key)
                if block is None or block.tokens != tokens or block.parent != parent:
                    break
                found.append((key, block))
        self._touch([key for key, _ in found])
        blocks = [block for _, block in found]
        self.queried_tokens += len(ids)
        self.hit_tokens += sum(len(b.tokens) for b in blocks)
        return blocks

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain's blocks used, its first block last: eviction then takes a chain's tail
        before its head (a head evicted first would strand every block after it)."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    # ---- filling ----------------------------------------------------------------------------

    def store(self, scope: tuple, ids: list[int], cache: KVCache, row: int, offset: int,
              hidden: Tensor | None = None) -> None:
        """Keep the blocks of prompt ``ids`` held in row ``row`` of ``cache`` (its text from column
        ``offset`` on; CPM-Ant's prompt ids before it come with the whole-prompt block)."""
        if self.capacity <= 0:
            return
        start = 0 if self.causal else -offset
        keys = self._keys(scope, ids)
        per_column = sum(t[row, :, 0].numel() * t.element_size() for t in (*cache.keys, *cache.values) if t is not None)
        for index, (key, tokens, parent) in enumerate(keys):
            if key in self.blocks:
                continue
            if per_column * (len(tokens) + (0 if self.causal else offset)) > self.capacity:
                break  # never cloned to be thrown away
            first = offset + (index * BLOCK if self.causal else start)
            columns = slice(first, offset + (index + 1) * BLOCK if self.causal else offset + len(ids))
            inputs = {name: getattr(cache, name)[row, columns].clone() for name in cache.inputs}
            if self.causal:  # positions order the keys: count them from the text's start, as a fresh row does
                inputs["position"] -= offset
            block = Block(tokens, parent, [k[row, :, columns].clone() if k is not None else None for k in cache.keys],
                          [v[row, :, columns].clone() if v is not None else None for v in cache.values],
                          inputs, None if self.causal else hidden.clone())
            self._add(key, block, {k for k, _, _ in keys})
        self._touch([key for key, _, _ in keys])

    def _add(self, key: int, block: Block, keep: set[int]) -> None:
        """Add ``block``, evicting the least recently used blocks (never those of ``keep``, the
        chain being stored) to make room; a block that does not fit is left out."""
        size = block.nbytes()
        while self.bytes + size > self.capacity:
            victim = next((k for k in self.blocks if k not in keep), None)
            if victim is None:
                return
            self.bytes -= self.blocks.pop(victim).nbytes()
        self.blocks[key] = block
        self.bytes += size

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_bytes": self.bytes, "prefix_queried_tokens": self.queried_tokens,
                "prefix_hit_tokens": self.hit_tokens}


def restore(blocks: list[Block], cache: KVCache) -> int:
    """Write ``blocks`` into row 0 of ``cache`` from column 0, in order; returns the columns filled."""
    column = 0
    for block in blocks:
        width = next(iter(block.inputs.values())).numel()
        for store, tensors in ((cache.keys, block.keys), (cache.values, block.values)):
            for layer, tensor in enumerate(tensors):
                if tensor is None:
                    continue
                if store[layer] is None:
                    store[layer] = tensor.new_zeros(cache.batch, tensor.size(0), cache.capacity, tensor.size(2))
                store[layer][0, :, column:column + width] = tensor
        for name, values in block.inputs.items():
            getattr(cache, name)[0, column:column + width] = values
        column += width
    cache.length = column
    return column


__all__ = ["BLOCK", "Block", "DEFAULT_BYTES", "PrefixCache", "restore"]
