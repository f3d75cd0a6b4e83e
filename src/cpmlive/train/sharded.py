"""Sharded training checkpoints: torch.distributed.checkpoint (DCP), every rank its own shards.

A run of several processes writes ``RUN/checkpoints/step-N/`` as

* ``sharded/``: DCP's directory (``.metadata`` and one ``__R_0.distcp`` per rank) holding the
  model's and the optimizer's sharded state dicts under ``model`` and ``optimizer``, beside
  the model's ``config.json`` and vocabulary (what :func:`consolidate` needs);
* ``trainer.pt``: the rest of the trainer state (data stream, step, RNG, recipe), from rank 0.

Nothing is gathered: a rank holds its shards and DCP's write buffers only. DCP records every
tensor's global shape, so a checkpoint loads into any layout: another number of ranks, a
different tensor-parallel split, or one process with plain tensors (DCP then runs without a
process group). The directory is built under a temporary name and renamed into place by rank 0
after every rank has written (``train.checkpoints``), so a torn save leaves the previous
checkpoint as ``latest``. DCP assumes the run directory is one shared filesystem for all ranks
(as for any multi-node checkpoint).
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import CONFIG_NAME, checkpoint_vocab, write_vocab
from cpmlive.train.core import keeping_fused_choice

SHARDED = "sharded"
METADATA = ".metadata"


def sharded_dir(checkpoint: Path) -> Path:
    return Path(checkpoint) / SHARDED


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint directory (``step-N``, or its ``sharded/``) is a DCP checkpoint."""
    checkpoint = Path(checkpoint)
    return (sharded_dir(checkpoint) / METADATA).is_file() or (checkpoint / METADATA).is_file()


def _dcp_root(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint if (checkpoint / METADATA).is_file() else sharded_dir(checkpoint)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The model's (and optimizer's) state dicts as this process holds them: DTensor shards
    under FSDP2 / tensor parallelism, plain tensors in one process. The optimizer's is keyed
    by parameter name, so it does not depend on the order parameters were registered in."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        with keeping_fused_choice(optimizer):
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 group: Any = None) -> Future | None:
    """Every rank writes its shards of the model and optimizer into ``directory`` (a collective).
    Given a process ``group``, the save is asynchronous: the state is staged in host memory (a
    copy of the rank's share) and written by a background thread communicating over ``group``
    (a group of its own, so it never interleaves with training's collectives); the returned
    future completes when every shard is written."""
    import torch.distributed.checkpoint as dcp

    state = training_state(model, optimizer)
    if group is not None:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
    dcp.save(state, checkpoint_id=str(directory), no_dist=_no_dist())
    return None


def write_sharded_config(directory: Path, config: Any, vocab: Path | None) -> None:
    """The model's ``config.json`` (and vocabulary) beside the DCP files."""
    config.save(directory / CONFIG_NAME)
    if vocab is not None:
        write_vocab(vocab, directory / Path(vocab).name)


def sharded_config_path(checkpoint: Path) -> Path:
    return _dcp_root(checkpoint) / CONFIG_NAME


def check_readable(checkpoint: Path) -> None:
    """The DCP metadata reads and every shard file it names is there: a checkpoint that will
    load (a torn copy is refused here, so ``--resume auto`` can fall back past it)."""
    from torch.distributed.checkpoint import FileSystemReader

    root = _dcp_root(checkpoint)
    try:
        metadata = FileSystemReader(str(root)).read_metadata()
    except Exception as exc:  # noqa: BLE001  (a torn pickle raises many types)
        raise CpmliveError(f"{root}: unreadable sharded checkpoint ({type(exc).__name__})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in ends if not (root / name).is_file())
    if missing:
        raise CpmliveError(f"{root}: shard {missing[0]} is missing ({len(missing)} of {len(ends)} files)")
    short = sorted(name for name, end in ends.items() if (root / name).stat().st_size < end)
    if short:
        raise CpmliveError(f"{root}: shard {short[0]} is cut short (a torn copy)")
    if not (root / CONFIG_NAME).is_file():
        raise CpmliveError(f"{root}: no {CONFIG_NAME}")


def saved_tensors(checkpoint: Path, prefix: str = "model.") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The global shape and dtype of every saved tensor whose key starts with ``prefix`` (removed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(_dcp_root(checkpoint))).read_metadata()
    return {key[len(prefix):]: (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def check_shapes(checkpoint: Path, wanted: dict[str, tuple[int, ...]]) -> None:
    """Every tensor a model needs (name -> global shape) is in the checkpoint with that shape
    (DCP itself would fail deep inside a collective)."""
    saved = saved_tensors(checkpoint)
    for name, shape in wanted.items():
        if name not in saved:
            raise CpmliveError(f"{checkpoint}: has no tensor {name!r} (a checkpoint of another model)")
        if saved[name][0] != tuple(shape):
            raise CpmliveError(f"{checkpoint}: {name} is {list(saved[name][0])} there, {list(shape)} in this run "
                               "(a recipe that changed a shape cannot resume it)")


def load_sharded(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into ``model`` and ``optimizer`` as they are laid out now (any
    number of ranks, or one process); a collective when a process group is up."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = training_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(_dcp_root(checkpoint)), no_dist=_no_dist())
    except Exception as exc:  # noqa: BLE001  (DCP raises CheckpointException on every rank)
        detail = str(exc).strip().splitlines()
        raise CpmliveError(f"{checkpoint}: could not load its shards ({detail[0] if detail else type(exc).__name__}); "
                           "an optimizer of another layout or a damaged shard") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        with keeping_fused_choice(optimizer):
            set_optimizer_state_dict(model, optimizer, state["optimizer"])


def consolidate(checkpoint: Path, out: Path, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """A sharded training checkpoint as one model directory (``cpmlive convert RUN/step-N OUT``):
    the model's tensors only, read by one process (the optimizer state is left on disk)."""
    import torch.distributed.checkpoint as dcp

    from cpmlive.model.checkpoint import expected_shapes, save_checkpoint
    from cpmlive.model.registry import family_of

    checkpoint = Path(checkpoint)
    check_readable(checkpoint)
    root = _dcp_root(checkpoint)
    if Path(out).exists() and any(Path(out).iterdir()) and not force:
        raise CpmliveError(f"{out} exists and is not empty (--force to write into it)")
    config = family_of(root).config.load(root / CONFIG_NAME)
    wanted = expected_shapes(config)
    check_shapes(checkpoint, wanted)
    saved = saved_tensors(checkpoint)
    state = {"model": {name: torch.empty(shape, dtype=saved[name][1]) for name, shape in wanted.items()}}
    dcp.load(state, checkpoint_id=str(root), no_dist=True)
    return save_checkpoint(state["model"], config, out, vocab=checkpoint_vocab(root), dtype=dtype)


__all__ = [
    "SHARDED", "check_readable", "check_shapes", "consolidate", "is_sharded", "load_sharded",
    "save_sharded", "saved_tensors", "sharded_config_path", "sharded_dir", "training_state",
    "write_sharded_config",
]
