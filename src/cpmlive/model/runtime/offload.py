"""A memory budget on an accelerator (``--memory-limit`` with ``--device cuda``): BMInf's scheme.

The embeddings, norms and as many blocks as the budget allows live on the device; the other
blocks live in host memory (pinned, so copies are asynchronous DMA) and are copied to the device
one block ahead: while block ``i`` computes, a side stream copies the next streamed block, and
the compute stream waits on that copy's event only when it reaches the block. After a streamed
block ran, its device copies are released (``record_stream`` keeps the caching allocator from
reusing them before the compute stream is done). So at most two streamed blocks (the one
computing and the one in flight) occupy the device beside the resident ones.

The plan (which blocks stay, chosen by bytes and spread over the depth) is the CPU budget's
(``runtime.streaming.spread_order``). On a CPU "device" the same code runs with plain copies
and no streams, which is how the tests check it without a GPU; the CPU budget proper is
``runtime.streaming`` (file pages, not copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cpmlive.errors import CpmliveError
from cpmlive.model.runtime.streaming import next_after, spread_order


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _module_tensors(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(owner, name, tensor) of every parameter and buffer of ``module``."""
    found = []
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                found.append((owner, name, tensor))
    return found


def _nbytes(tensors: list[tuple[nn.Module, str, Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, _, t in tensors)


@dataclass
class OffloadedBlock:
    index: int
    host: list[tuple[nn.Module, str, Tensor]]  # the block's tensors in (pinned) host memory
    nbytes: int
    device_copies: list[Tensor] | None = None
    ready: object | None = None  # the CUDA event of the copy in flight
    placed: bool = field(default=False)


class DeviceWeightStream:
    """The budget of one model on ``device`` (see the module docstring); :func:`offload_to_device`."""

    def __init__(self, model: nn.Module, limit: int, device: torch.device | str) -> None:
        self.device, self.limit = torch.device(device), limit
        self.cuda = self.device.type == "cuda"
        blocks = list(model.layers)
        block_tensors = [_module_tensors(block) for block in blocks]
        in_blocks = {id(t) for tensors in block_tensors for _, _, t in tensors}
        rest = [(o, n, t) for o, n, t in _module_tensors(model) if id(t) not in in_blocks]
        self.fixed = _nbytes(rest)
        sizes = [_nbytes(tensors) for tensors in block_tensors]
        window = 2 * max(sizes)
        if limit < self.fixed + window:
            raise CpmliveError(f"memory limit {_gb(limit)} is smaller than the model's embeddings and norms "
                               f"({_gb(self.fixed)}) plus two of its largest blocks ({_gb(window)}): "
                               f"give at least {_gb(self.fixed + window)}")
        budget = limit - self.fixed - window
        resident = set()
        for i in spread_order(len(blocks)):
            if sizes[i] <= budget:
                resident.add(i)
                budget -= sizes[i]
        self.resident = sorted(resident)
        for owner, name, tensor in rest + [x for i in self.resident for x in block_tensors[i]]:
            _place(owner, name, tensor.to(self.device))
        self.streamed: dict[int, OffloadedBlock] = {}
        for i in range(len(blocks)):
            if i in resident:
                continue
            host = [(o, n, t.pin_memory() if self.cuda else t) for o, n, t in block_tensors[i]]
            for owner, name, tensor in host:
                _place(owner, name, tensor)
            self.streamed[i] = OffloadedBlock(i, host, sizes[i])
        self.order = sorted(self.streamed)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.device_bytes = self.fixed + sum(sizes[i] for i in self.resident)
        self.peak_bytes = self.device_bytes  # the most the stream's tensors ever held on the device

    # ---- copies ------------------------------------------------------------------------------

    def fetch(self, index: int) -> None:
        """Start copying streamed block ``index`` to the device (on the side stream)."""
        block = self.streamed.get(index)
        if block is None or block.device_copies is not None:
            return
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # its buffers are free to reuse
            with torch.cuda.stream(self.copy_stream):
                block.device_copies = [t.to(self.device, non_blocking=True) for _, _, t in block.host]
                block.ready = torch.cuda.Event()
                block.ready.record(self.copy_stream)
        else:
            block.device_copies = [t.to(self.device, copy=True) for _, _, t in block.host]
        self.device_bytes += block.nbytes
        self.peak_bytes = max(self.peak_bytes, self.device_bytes)

    def next_streamed(self, index: int) -> int | None:
        return next_after(self.order, index)

    def before(self, index: int) -> None:
        """Block ``index`` is about to run: its copy in place, the next streamed one in flight."""
        block = self.streamed.get(index)
        if block is not None:
            self.fetch(index)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(block.ready)
            for (owner, name, _), copy in zip(block.host, block.device_copies):
                _place(owner, name, copy)
            block.placed = True
        following = self.next_streamed(index)
        if following is not None and following != index:
            self.fetch(following)

    def after(self, index: int) -> None:
        """Block ``index`` ran: a streamed block's tensors go back to host memory, its copies freed."""
        block = self.streamed.get(index)
        if block is None or not block.placed:
            return
        for owner, name, tensor in block.host:
            _place(owner, name, tensor)
        if self.cuda:
            for copy in block.device_copies:
                copy.record_stream(torch.cuda.current_stream(self.device))
        block.device_copies, block.ready, block.placed = None, None, False
        self.device_bytes -= block.nbytes

    def describe(self) -> str:
        streamed = sum(b.nbytes for b in self.streamed.values())
        return (f"memory limit {_gb(self.limit)} on {self.device}: {len(self.resident)} of "
                f"{len(self.resident) + len(self.streamed)} blocks resident, {len(self.streamed)} ({_gb(streamed)}) "
                f"copied from {'pinned ' if self.cuda else ''}host memory one block ahead")


def _place(owner: nn.Module, name: str, tensor: Tensor) -> None:
    """Point ``owner.name`` at ``tensor`` (a parameter stays a parameter, without autograd history)."""
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def offload_to_device(model: nn.Module, limit: int, device: torch.device | str) -> DeviceWeightStream:
    """Run ``model`` (loaded on the CPU) on ``device`` within ``limit`` bytes of its memory: its
    blocks call the stream around their forward (inference only: the weights are read-only)."""
    stream = DeviceWeightStream(model, limit, device)
    for index, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda _m, _a, i=index: stream.before(i))
        block.register_forward_hook(lambda _m, _a, _o, i=index: stream.after(i))
    model.device_stream = stream
    return stream


__all__ = ["DeviceWeightStream", "offload_to_device"]
