"""A memory budget for a model's weights (``--memory-limit``): blocks stream from the checkpoint.

A loaded checkpoint's tensors are views of a private map of its safetensors files
(``model.checkpoint.read_safetensors``): a page of weights enters the process's resident memory
when it is first read and stays. :func:`stream_weights` keeps some blocks resident and lets the
others *stream*: just before a streamed block runs, a background thread maps its pages in
(``MADV_POPULATE_READ``: from the page cache, or from disk on the first pass) while the
previous block computes; right after it ran, its pages are dropped from the process
(``MADV_DONTNEED``; the file's pages stay in the page cache for the next token). So at most two
streamed blocks (the one computing and the one being fetched) are resident beside the
resident ones, and the process's RSS, not just a count of tensors, stays within the budget.

Which blocks stay resident is chosen by bytes (pruned checkpoints have blocks of different
sizes) and spread over the depth, so every streamed block follows a resident one whose compute
time hides part of its fetch. Only tensors that really are file-backed stream (dropping
anonymous memory would lose it): a half-precision checkpoint computed in float32 keeps its
matrices in their stored dtype for this (``keep_matrices`` in ``model.checkpoint``), and only its
small tensors, converted, stay resident; a model whose matrices were converted is refused.
Weights must not be changed in place while streaming: a dropped page comes back from
the file. On a GPU the same plan keeps streamed blocks in pinned host memory and copies them on a
side stream (``runtime.offload``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from torch import Tensor, nn

from cpmlive.errors import CpmliveError
from cpmlive.utils import parse_size

MADV_DONTNEED = 4
MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _madvise(start: int, end: int, advice: int) -> bool:
    """``madvise`` over the whole pages inside ``[start, end)``; whether the kernel accepted it."""
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    return last <= first or _libc.madvise(first, last - first, advice) == 0


def file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (``/proc/self/maps``)."""
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def _is_file_backed(tensor: Tensor, ranges: list[tuple[int, int]]) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(a <= start and end <= b for a, b in ranges)


def _tensors(module: nn.Module) -> list[Tensor]:
    seen, found = set(), []
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() not in seen and tensor.numel():
            seen.add(tensor.data_ptr())
            found.append(tensor)
    return found


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def next_after(order: list[int], index: int) -> int | None:
    """The first streamed block after ``index`` in ``order`` (wrapping to the next step's first)."""
    for i in order:
        if i > index:
            return i
    return order[0] if order else None


def spread_order(count: int) -> list[int]:
    """Indices ``0 .. count-1`` in an order that spreads any prefix over the whole range
    (the midpoints of ever finer halvings: 0, 8, 4, 12, 2, ... for 16)."""
    order, seen, step = [], set(), 1
    while step < count:
        step *= 2
    while step >= 1:
        for i in range(0, count, step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order


@dataclass
class StreamedBlock:
    index: int
    tensors: list[Tensor]
    nbytes: int
    fetched: threading.Event = field(default_factory=threading.Event)
    versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.versions = [t._version for t in self.tensors]

    def check_unchanged(self) -> None:
        """Refuse to drop pages a caller wrote to: they would come back from the file as they were."""
        if any(t._version != v for t, v in zip(self.tensors, self.versions)):
            raise CpmliveError(f"a weight of streamed block {self.index} was changed in place; a model under "
                               "--memory-limit is read-only (load it without the limit to change its weights)")

    def ranges(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in self.tensors]


class WeightStream:
    """The budget of one model (see the module docstring); made by :func:`stream_weights`."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        self.limit = limit
        blocks = model.blocks()
        ranges = file_backed_ranges()
        # A block streams its file-backed tensors; the rest (norms converted on load) stays resident.
        block_tensors = [[t for t in _tensors(block) if _is_file_backed(t, ranges)] for block in blocks]
        in_blocks = {t.data_ptr() for tensors in block_tensors for t in tensors}
        self.fixed = _nbytes(t for t in _tensors(model) if t.data_ptr() not in in_blocks)
        sizes = [_nbytes(tensors) for tensors in block_tensors]
        streamable = [bool(tensors) for tensors in block_tensors]
        if not any(streamable):
            raise CpmliveError("--memory-limit streams weights from the checkpoint's files, but this model's were "
                               "copied into memory when loaded (converted to another dtype): load it in the dtype "
                               "it is stored in")
        window = 2 * max(s for s, ok in zip(sizes, streamable) if ok)
        needed = self.fixed + window
        if limit < needed:
            raise CpmliveError(f"memory limit {_gb(limit)} is smaller than the model's embeddings and norms "
                               f"({_gb(self.fixed)}) plus two of its largest blocks ({_gb(window)}): "
                               f"give at least {_gb(needed)}")
        budget = limit - needed
        resident = set(i for i, ok in enumerate(streamable) if not ok)
        budget -= sum(sizes[i] for i in resident)
        for i in spread_order(len(blocks)):
            if i not in resident and sizes[i] <= budget:
                resident.add(i)
                budget -= sizes[i]
        self.resident = sorted(resident)
        self.streamed = {i: StreamedBlock(i, block_tensors[i], sizes[i])
                         for i in range(len(blocks)) if i not in resident}
        self.order = sorted(self.streamed)
        self.total = sum(sizes) + self.fixed
        self.population = MADV_POPULATE_READ
        self._work: queue.SimpleQueue[StreamedBlock | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._fetch_loop, name="cpmlive-weight-fetch", daemon=True)
        self._thread.start()
        for block in self.streamed.values():  # start out dropped (loading may have touched them)
            self._drop(block)
            block.fetched.set()

    # ---- the fetching thread ----------------------------------------------------------------

    def _fetch_loop(self) -> None:
        while (block := self._work.get()) is not None:
            try:
                for start, end in block.ranges():
                    if not _madvise(start, end, self.population):
                        self.population = MADV_WILLNEED  # an older kernel: read ahead at least
                        _madvise(start, end, MADV_WILLNEED)
            finally:
                block.fetched.set()

    # ---- called around each block ------------------------------------------------------------

    def next_streamed(self, index: int) -> int | None:
        return next_after(self.order, index)

    def fetch(self, index: int) -> None:
        """Ask for streamed block ``index`` to be mapped in (in the background)."""
        block = self.streamed.get(index)
        if block is not None and block.fetched.is_set():
            block.fetched.clear()
            self._work.put(block)

    def before(self, index: int) -> None:
        """Block ``index`` is about to run: fetch the next streamed block meanwhile."""
        following = self.next_streamed(index)
        if following is not None and following != index:
            self.fetch(following)

    def after(self, index: int) -> None:
        """Block ``index`` ran: drop its pages when it streams."""
        block = self.streamed.get(index)
        if block is not None:
            block.fetched.wait()
            block.check_unchanged()
            self._drop(block)

    def _drop(self, block: StreamedBlock) -> None:
        for start, end in block.ranges():
            _madvise(start, end, MADV_DONTNEED)

    def describe(self) -> str:
        streamed = sum(b.nbytes for b in self.streamed.values())
        return (f"memory limit {_gb(self.limit)}: {len(self.resident)} of {len(self.resident) + len(self.streamed)} "
                f"blocks resident, {len(self.streamed)} ({_gb(streamed)}) streamed from the checkpoint")

    def close(self) -> None:
        """Stop the fetching thread (blocks then fault their pages in themselves)."""
        self._work.put(None)
        self._thread.join(timeout=10)
        for block in self.streamed.values():
            block.fetched.set()
        self.fetch = lambda index: None


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def stream_weights(model: nn.Module, limit: int) -> WeightStream:
    """Hold ``model``'s weights to ``limit`` bytes of resident memory (see the module docstring):
    its blocks call the stream around their forward, and the native decoding step goes block by
    block while a stream is attached (``model.weight_stream``)."""
    stream = WeightStream(model, limit)
    for index, block in enumerate(model.blocks()):
        block.register_forward_pre_hook(lambda _m, _a, i=index: stream.before(i))
        block.register_forward_hook(lambda _m, _a, _o, i=index: stream.after(i))
    model.weight_stream = stream
    return stream


def resident_bytes(paths: Iterable[str | Path] | None = None) -> int:
    """This process's resident bytes in mappings of ``paths`` (every file mapping when ``None``),
    from ``/proc/self/smaps``: what a budget of weights is measured against."""
    wanted = {str(Path(p).resolve()) for p in paths} if paths is not None else None
    total, counting = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(maxsplit=5)
                name = parts[5].strip() if len(parts) == 6 else ""
                counting = name.startswith("/") and (wanted is None or name in wanted)
            elif counting and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


__all__ = ["WeightStream", "next_after", "parse_size", "resident_bytes", "spread_order", "stream_weights"]
