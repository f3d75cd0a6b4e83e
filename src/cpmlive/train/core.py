"""The training machinery every recipe shares (pretrain, finetune, align, and compress's steps):
the learning-rate schedule of the loop's keys (:class:`cpmlive.recipe.LoopArgs`), the optimizer
and its restore, the RNG state a checkpoint holds, autocast, memory, the step loop that stops
cleanly on Ctrl-C, and the progress bar. The run directory's checkpoints (layout, atomic
write with rotation, resume) are in :mod:`cpmlive.train.checkpoints`.

A recipe imports this library, never another recipe.
"""

from __future__ import annotations

import math
import random
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from cpmlive.errors import CpmliveError

from cpmlive.recipe import LoopArgs
from cpmlive.train.checkpoints import StopRequest

# ---- schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """``name`` is cosine, noam or constant (``cpmlive.recipe.SCHEDULES``)."""

    name: str
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1

    @classmethod
    def of(cls, config: LoopArgs, max_steps: int | None = None) -> Schedule:
        """A recipe's schedule; ``max_steps`` when the run's length is not the config's own."""
        steps = config.max_steps if max_steps is None else max_steps
        return cls(config.schedule, config.lr, config.min_lr, config.warmup_steps, steps)


def learning_rate(schedule: Schedule, step: int) -> float:
    """``step`` counts from 1. Noam is OpenBMB's: lr*n/w^1.5 in warmup, lr/sqrt(n) after."""
    warmup = max(schedule.warmup_steps, 1)
    if schedule.name == "noam":
        return schedule.lr * min(step / warmup**1.5, 1 / math.sqrt(step))
    if step <= warmup:
        return schedule.lr * step / warmup
    if schedule.name == "constant":
        return schedule.lr
    progress = min((step - warmup) / max(schedule.max_steps - warmup, 1), 1.0)
    return schedule.min_lr + 0.5 * (schedule.lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---- optimizer --------------------------------------------------------------------------------


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Fused AdamW (one kernel over all tensors, no temporaries)
    takes plain tensors; FSDP2's sharded DTensor parameters keep the default implementation."""
    from torch.distributed.tensor import DTensor

    return bool(params) and not any(isinstance(p, DTensor) for p in params)


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over parameter groups that each name their ``weight_decay``, fused when it can be."""
    params = [param for group in groups for param in group["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=can_fuse(params))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: weight decay on the 2-D weights (projections and
    the embedding tables), none on the norms and the position bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() == 2 and "norm" not in name and "position_bias" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextmanager
def keeping_fused_choice(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading an optimizer state inside keeps this optimizer's own implementation choice: a
    checkpoint written by the sharded (unfused) trainer resumes fused in one process, and the reverse."""
    fused = [group.get("fused") for group in optimizer.param_groups]
    yield
    for group, flag in zip(optimizer.param_groups, fused):
        group["fused"] = flag


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved state (checked to fit with ``check_optimizer_fits`` when it was read)."""
    with keeping_fused_choice(optimizer):
        optimizer.load_state_dict(state)


# ---- run state --------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The host generators a checkpoint holds, so a resumed run draws what it would have drawn."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def memory_mb() -> float:
    """Peak resident memory of this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- compute and reporting ----------------------------------------------------------------------


def native_bf16(device_type: str) -> bool:
    """Whether bf16 products run in hardware: a CUDA device that supports them, or a CPU with
    AVX512-BF16 or AMX. Elsewhere PyTorch emulates bf16 on the CPU, hundreds of times slower."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_device(name: str) -> torch.device:
    """A recipe's ``device``: ``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CpmliveError(f"config: device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise CpmliveError(f"config: device {name!r}, but this machine has {count} CUDA devices")
    elif device.type != "cpu":
        raise CpmliveError(f"config: device {name!r}: training runs on cpu or cuda")
    return device


def autocast(precision: str, device: str | torch.device = "cpu") -> torch.autocast:
    """bf16 autocast for ``precision: bf16`` (and ``auto`` where :func:`native_bf16`), plain
    float32 otherwise (``cpmlive.recipe.PRECISIONS``)."""
    device_type = device.type if isinstance(device, torch.device) else device
    enabled = precision == "bf16" or (precision == "auto" and native_bf16(device_type))
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


class SteppedRun(Protocol):
    """A recipe's run as :func:`run_steps` drives it."""

    def step_and_report(self, bar: Any, saved: int) -> int:
        """One step with its logging, validation and checkpoint; returns the last saved step."""

    def save_interrupted(self, saved: int) -> None:
        """The checkpoint of an interrupted run, unless its last step is saved already."""


def run_steps(run: SteppedRun, start: int, total: int, bar: Any,
              stop_agreed: Callable[[bool], bool] = bool) -> None:
    """Steps ``start + 1`` to ``total``. Ctrl-C or SIGTERM (:class:`StopRequest`) stops the run
    after the current step, when ``stop_agreed`` (every rank of a distributed run) says so: its
    checkpoint is saved and KeyboardInterrupt raised. The progress bar is closed on the way out."""
    saved = start
    try:
        with StopRequest() as stop:
            for _ in range(start, total):
                saved = run.step_and_report(bar, saved)
                if stop_agreed(stop.requested):
                    run.save_interrupted(saved)
                    raise KeyboardInterrupt
    finally:
        if bar is not None:
            bar.close()


def progress_bar(total: int, start: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar of training steps, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)


__all__ = [
    "Schedule", "adamw", "autocast", "can_fuse", "decay_groups", "keeping_fused_choice", "learning_rate",
    "memory_mb", "progress_bar", "resolve_device", "restore_optimizer", "rng_state", "run_steps", "set_learning_rate",
    "set_rng_state",
]
