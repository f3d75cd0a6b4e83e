"""Where a training run starts: in this process, or as one rank of a ``torchrun`` job.

The entry sits above both trainers so that neither imports the other back: the sharded
trainer of :mod:`cpmlive.train.distributed` extends the single-process one of
:mod:`cpmlive.train.pretrain`, and only this module knows about the two.
"""

from __future__ import annotations

from cpmlive.errors import CpmliveError
from cpmlive.train.distributed import is_distributed_launch, run_distributed
from cpmlive.train.pretrain import PretrainConfig, RunState, Trainer


def pretrain(config: PretrainConfig, resume: str | None = None) -> RunState:
    """Train in this process, or as one rank of a torchrun job (``WORLD_SIZE`` > 1)."""
    if is_distributed_launch():
        return run_distributed(config, resume)
    if config.tp_size > 1:
        raise CpmliveError(f"tp_size {config.tp_size} needs a torchrun job whose process count is a multiple of it "
                           f"(torchrun --nproc-per-node {config.tp_size} -m cpmlive pretrain ...)")
    return Trainer(config, resume).run()


__all__ = ["pretrain"]
