"""The decoding cache every family uses: keys, values and the per-token mask inputs of the
positions decoded so far (:class:`KVCache`), and the engine's view of its running rows
(:class:`SlotCache`). A family whose masks need more inputs extends ``inputs`` (``BeeCache``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError

MASK_INPUTS = ("context", "span", "segment", "valid", "position")
FLAGS = ("context", "valid")  # the mask inputs kept as booleans; the others are int32


def mask_inputs(context: Tensor, span: Tensor, segment: Tensor, valid: Tensor, position: Tensor) -> dict[str, Tensor]:
    """The per-token inputs the attention mask and position bias are made of, as the cache keeps them."""
    return {"context": context.bool(), "span": span, "segment": segment, "valid": valid.bool(), "position": position}


def token_positions(input_ids: Tensor, start: int = 0) -> Tensor:
    """Position of every token when none are given: its index, counted from ``start``."""
    return torch.arange(start, start + input_ids.size(1), dtype=torch.int32,
                        device=input_ids.device).expand_as(input_ids)


def new_positions(input_ids: Tensor, cache: "KVCache | None") -> Tensor:
    """The token positions of ``input_ids`` when the caller gives none: their indices in the row,
    after the cached positions with a cache."""
    return token_positions(input_ids) if cache is None else cache.next_positions(input_ids.size(1))


def left_to_right(input_ids: Tensor, span: Tensor | None, valid: Tensor | None, cache: "KVCache | None",
                  position: Tensor | None, max_length: int) -> tuple[Tensor, Tensor]:
    """What a left-to-right model (CPM-1, the decoder family) sees, from CPM-Ant's inputs: which
    keys each query sees (``[B, Lq, Lk]``: valid ones at or before it in its span, none for a
    padding query) and each query's absolute position (the valid tokens of its span before it, so
    left padding, packed rows and cached decoding give every token its unpadded position). The
    new positions' inputs go into ``cache``; a position past ``max_length`` is refused."""
    zeros = torch.zeros_like(input_ids, dtype=torch.int32)
    position = new_positions(input_ids, cache) if position is None else position
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
    query = mask_inputs(zeros, zeros if span is None else span, zeros, valid, position)
    key = cache.append_inputs(query) if cache is not None else query
    seen = key["position"][:, None, :] <= query["position"][:, :, None]
    seen = seen & (query["span"][:, :, None] == key["span"][:, None, :]) & key["valid"][:, None, :]
    absolute = (seen.sum(-1) - 1).clamp(min=0)
    furthest = int(absolute.max()) if absolute.numel() else 0
    if furthest >= max_length:
        raise CpmliveError(f"position {furthest} is past the model's {max_length} positions")
    return seen & query["valid"][:, :, None], absolute


def _too_long(capacity: int, needed: int) -> CpmliveError:
    return CpmliveError(f"KV cache holds {capacity} positions, {needed} needed")


@dataclass
class KVCache:
    """Keys, values and the mask inputs of every position decoded so far.

    Buffers hold ``capacity`` positions and are allocated on first use with the dtype the
    layers produce (so bf16 autocast gets a bf16 cache).
    """

    inputs: ClassVar[tuple[str, ...]] = MASK_INPUTS  # the mask inputs kept for every position

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
        for name in self.inputs:
            dtype = torch.bool if name in FLAGS else torch.int32
            setattr(self, name, torch.zeros((self.batch, self.capacity), dtype=dtype, device=self.device))

    def append_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Record the mask inputs of new positions; return those of every cached position."""
        start, end = self.length, self.length + inputs["context"].size(1)
        if end > self.capacity:
            raise _too_long(self.capacity, end)
        for name in self.inputs:
            getattr(self, name)[:, start:end] = inputs[name]
        return {name: getattr(self, name)[:, :end] for name in self.inputs}

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

    def adopt(self, rows: Tensor, columns: Tensor, other: "KVCache") -> None:
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
        for name in self.inputs:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.batch = int(index.numel())


class SlotCache(KVCache):
    """A :class:`KVCache` whose rows have lengths of their own (``lengths``, ``[B]`` int64): the
    rows of an engine's running batch, each a request that joined at another time.

    It takes ``n`` new positions per row per forward (one for a plain step; a speculative step
    verifies drafted tokens in the same forward): row ``r``'s go to columns ``lengths[r] ..
    lengths[r] + n - 1``, which are also their token positions (a row's columns are its
    positions, from its own prefill on). Attention spans ``max(lengths) + n`` columns; what a
    shorter row has not written is invalid in its mask inputs, so it is never seen. The buffers
    are given (views of the engine's pool).
    """

    def __init__(self, keys: list[Tensor | None], values: list[Tensor | None], masks: dict[str, Tensor],
                 lengths: Tensor) -> None:
        batch, capacity = masks["valid"].shape
        self.batch, self.capacity, self.num_layers = batch, capacity, len(keys)
        self.device = lengths.device
        self.keys, self.values, self.lengths = keys, values, lengths
        self.inputs = tuple(masks)  # the mask inputs its engine keeps (a family's own kind's)
        for name in self.inputs:
            setattr(self, name, masks[name])
        self.length = int(lengths.max()) if batch else 0

    def _rows(self) -> Tensor:
        return torch.arange(self.batch, device=self.device)

    def _columns(self, count: int) -> Tensor:
        """``[B, count]``: the columns of each row's ``count`` new positions."""
        return self.lengths[:, None] + torch.arange(count, device=self.device)

    def append_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        count = inputs["context"].size(1)
        if self.length + count > self.capacity:
            raise _too_long(self.capacity, self.length + count)
        rows, columns = self._rows()[:, None], self._columns(count)
        for name in self.inputs:
            getattr(self, name)[rows, columns] = inputs[name]
        return {name: getattr(self, name)[:, :self.length + count] for name in self.inputs}

    def store(self, layer: int, start: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        count = key.size(2)
        rows, columns = self._rows()[:, None], self._columns(count)
        self.keys[layer][rows, :, columns] = key.transpose(1, 2)
        self.values[layer][rows, :, columns] = value.transpose(1, 2)
        end = self.length + count
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_columns(self) -> Tensor:
        return self.lengths

    def next_positions(self, count: int) -> Tensor:
        return self._columns(count).to(torch.int32)

    def advance(self, count: int) -> None:
        self.lengths += count
        self.length = int(self.lengths.max())

    def adopt(self, rows: Tensor, columns: Tensor, other: KVCache) -> None:
        raise NotImplementedError("a slot cache is filled by its engine")

    def reorder(self, index: Tensor) -> None:
        raise NotImplementedError("a slot cache is reordered by its engine")


__all__ = ["FLAGS", "MASK_INPUTS", "KVCache", "SlotCache", "left_to_right", "mask_inputs", "new_positions",
           "token_positions"]
