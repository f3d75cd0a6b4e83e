"""The engine's KV memory: one row per running sequence, rows kept packed at the front.

Every attention layer has a key and a value buffer ``[rows, heads, width, dim_head]``; row ``i``
holds running sequence ``i``. When a sequence leaves, the last row moves into its place, so the
running rows are always ``0 .. count - 1`` and a step reads contiguous views of them (what the
native decoding step needs). The buffers grow when a request needs more rows or columns, shrink
once the batch uses a quarter of them, and are released when nothing runs, so a finished
request's memory is reused at once and given back without waiting for the server to go idle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpmlive.model.cache import FLAGS, MASK_INPUTS, KVCache, SlotCache

ROW_STEP = 4  # rows are allocated in multiples of this
COLUMN_STEP = 64  # and columns in multiples of this (up to the model's max_length)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class KVPool:
    """Keys, values and mask inputs of the running sequences (see the module docstring)."""

    def __init__(self, num_layers: int, max_width: int, device: torch.device | str = "cpu",
                 inputs: tuple[str, ...] = MASK_INPUTS) -> None:
        self.num_layers, self.max_width, self.device = num_layers, max_width, torch.device(device)
        self.inputs = inputs  # the mask inputs kept per position (the model's cache kind's)
        self.count = 0
        self.rows = self.width = 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.masks: dict[str, Tensor] = {}
        self.lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.layout: list[tuple[tuple[int, int], torch.dtype] | None] = [None] * num_layers  # (heads, dim_head), dtype

    # ---- sizes ------------------------------------------------------------------------------

    def bytes_reserved(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def bytes_used(self) -> int:
        """Bytes of the keys and values the running sequences have written."""
        rows, width, count, lengths = self.rows, self.width, self.count, self.lengths  # read from other threads too
        tensors = [t for t in (*self.keys, *self.values) if t is not None]
        if not rows or not width or not tensors:
            return 0
        per_column = sum(t[0, :, 0].numel() * t.element_size() for t in tensors)
        return int(lengths[:count].sum()) * per_column

    # ---- allocation -------------------------------------------------------------------------

    def _allocate(self, rows: int, width: int) -> None:
        """Buffers of ``rows`` x ``width`` holding the running rows' contents."""
        keep, old_width = self.count, self.width
        copy = min(old_width, width)
        keys, values = [], []
        for layer, spec in enumerate(self.layout):
            if spec is None:
                keys.append(None)
                values.append(None)
                continue
            (heads, dim_head), dtype = spec
            for store, old in ((keys, self.keys[layer]), (values, self.values[layer])):
                fresh = torch.zeros(rows, heads, width, dim_head, dtype=dtype, device=self.device)
                if old is not None and keep:
                    fresh[:keep, :, :copy] = old[:keep, :, :copy]
                store.append(fresh)
        masks = {}
        for name in self.inputs:
            dtype = torch.bool if name in FLAGS else torch.int32
            fresh = torch.zeros(rows, width, dtype=dtype, device=self.device)
            if name in self.masks and keep:
                fresh[:keep, :copy] = self.masks[name][:keep, :copy]
            masks[name] = fresh
        lengths = torch.zeros(rows, dtype=torch.int64, device=self.device)
        lengths[:keep] = self.lengths[:keep]
        self.keys, self.values, self.masks, self.lengths = keys, values, masks, lengths
        self.rows, self.width = rows, width

    def reserve(self, rows: int, width: int) -> None:
        """Room for ``rows`` running rows of ``width`` columns each."""
        if rows <= self.rows and width <= self.width:
            return
        self._allocate(max(_round_up(rows, ROW_STEP), self.rows),
                       min(max(_round_up(width, COLUMN_STEP), self.width), self.max_width))

    def fit(self, width: int) -> None:
        """Shrink to the running rows (needing ``width`` columns) when they use a quarter or less."""
        if self.count == 0:
            self.release()
            return
        rows, columns = _round_up(self.count, ROW_STEP), min(_round_up(width, COLUMN_STEP), self.max_width)
        if 4 * rows <= self.rows or 4 * columns <= self.width:  # a quarter: a batch that wavers never thrashes
            self._allocate(rows, columns)

    def release(self) -> None:
        """Give every buffer back (nothing runs)."""
        self.count = self.rows = self.width = 0
        self.keys, self.values = [None] * self.num_layers, [None] * self.num_layers
        self.masks = {}
        self.lengths = torch.zeros(0, dtype=torch.int64, device=self.device)

    # ---- rows -------------------------------------------------------------------------------

    def insert(self, cache: KVCache, row: int, width: int) -> int:
        """Copy row ``row`` of a prefilled ``cache`` (its first ``width`` columns) into a new last
        row; returns that row's index. :meth:`reserve` room first."""
        for layer, key in enumerate(cache.keys):
            if key is not None and self.layout[layer] is None:
                self.layout[layer] = ((key.size(1), key.size(3)), key.dtype)
        if all(k is None for k in self.keys) and any(spec is not None for spec in self.layout):
            self._allocate(self.rows, self.width)
        slot = self.count
        for layer in range(self.num_layers):
            if self.keys[layer] is not None:
                self.keys[layer][slot, :, :width] = cache.keys[layer][row, :, :width]
                self.values[layer][slot, :, :width] = cache.values[layer][row, :, :width]
        for name in self.inputs:
            self.masks[name][slot] = 0
            self.masks[name][slot, :width] = getattr(cache, name)[row, :width]
        self.lengths[slot] = width
        self.count += 1
        return slot

    def remove(self, slot: int) -> int | None:
        """Free row ``slot``; the last row moves into it. Returns the moved row's old index (or
        ``None`` when ``slot`` was the last)."""
        last = self.count - 1
        moved = None
        if slot != last:
            used = int(self.lengths[last])
            for store in (self.keys, self.values):
                for tensor in store:
                    if tensor is not None:
                        tensor[slot, :, :used] = tensor[last, :, :used]
            for name in self.inputs:
                self.masks[name][slot] = self.masks[name][last]
            self.lengths[slot] = self.lengths[last]
            moved = last
        self.count -= 1
        return moved

    def view(self) -> SlotCache:
        """The running rows as the cache a decoding step writes into."""
        count = self.count
        keys = [t[:count] if t is not None else None for t in self.keys]
        values = [t[:count] if t is not None else None for t in self.values]
        return SlotCache(keys, values, {name: m[:count] for name, m in self.masks.items()}, self.lengths[:count])


__all__ = ["KVPool"]
