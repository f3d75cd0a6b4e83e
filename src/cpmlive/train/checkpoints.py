"""The run directory's checkpoints, shared by every training recipe (pretrain, finetune, ...).

* **layout**: ``RUN/checkpoints/step-NNNNNNN/`` (each holds ``trainer.pt``) and ``latest``, a
  one-line pointer to the newest; :func:`publish` moves the pointer and rotates old ones out.
* **writing**: :func:`write_checkpoint` builds a checkpoint in a temporary directory, swaps it in
  whole and then publishes it, so a failure (disk full) leaves the previous one and ``latest`` intact.
* **resume**: :func:`resume_point` reads the checkpoint a run continues from. ``auto`` takes the
  one ``latest`` names and, when it is unreadable (torn by a crash, a full disk, a bad copy),
  falls back to the newest readable older one, saying so in one warning line.
* **fresh runs** never write into a directory that holds another run (:func:`refuse_existing_run`):
  its metrics would be appended to, its ``latest`` moved and its checkpoints rotated out.
* **interrupts**: :class:`StopRequest` turns SIGINT / SIGTERM into a request the training loop
  answers at the end of the current step, with a checkpoint there, so nothing half-updated (a
  step's optimizer update, its data position, its RNG draws) is ever saved.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import new_build_directory, replace_directory
from cpmlive.train.metrics import METRICS_FILE
from cpmlive.utils import atomic_write_text

TRAINER_STATE = "trainer.pt"
LATEST = "latest"
STEP_NAME = re.compile(r"step-(\d+)")

T = TypeVar("T")


def warn(message: str) -> None:
    """One ``cpmlive: warning:`` line on stderr."""
    print(f"cpmlive: warning: {message}", file=sys.stderr, flush=True)


# ---- layout -------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def step_of(path: Path) -> int | None:
    match = STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first (build directories excluded)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def _pointer(run_dir: Path) -> Path | None:
    """The directory ``latest`` names, whether or not it exists; None without a pointer."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    return run_dir / "checkpoints" / (name if STEP_NAME.fullmatch(name) else f"{LATEST} -> {name!r}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it holds a trainer state."""
    target = _pointer(run_dir)
    return target if target is not None and (target / TRAINER_STATE).is_file() else None


def publish(run_dir: Path, target: Path, keep: int) -> None:
    """Point ``latest`` at a fully written checkpoint, then delete all but the ``keep`` newest
    up to it (a newer one, left by a run resumed from further back, is not counted)."""
    atomic_write_text(run_dir / "checkpoints" / LATEST, target.name + "\n")
    saved = step_of(target) or 0
    older = [p for p in step_dirs(run_dir) if (step_of(p) or 0) < saved]
    for old in older[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(run_dir: Path, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """The checkpoint of ``step``: ``write`` fills a build directory, which is renamed into place
    and published (``keep`` kept). A failure leaves the previous checkpoint and ``latest`` untouched."""
    target = checkpoint_dir(run_dir, step)
    build = new_build_directory(target)
    write_into(build, target, write)
    publish(run_dir, target, keep)
    return target


def write_into(build: Path, target: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills ``build`` (made by :func:`new_build_directory`, possibly already holding
    what other ranks wrote), which then replaces ``target`` whole; on failure ``build`` is removed."""
    try:
        write(build)
        replace_directory(build, target)
    except OSError as exc:
        shutil.rmtree(build, ignore_errors=True)
        raise CpmliveError(f"could not write checkpoint {target} ({exc.strerror or exc}); "
                           "the previous checkpoint is intact") from None


# ---- reading ------------------------------------------------------------------------------------


def read_trainer_state(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint, with ``keys`` present, or a CpmliveError saying why not."""
    file = path / TRAINER_STATE
    if not path.is_dir():
        raise CpmliveError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise CpmliveError(f"{path}: not a training checkpoint (no {TRAINER_STATE})")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as exc:  # noqa: BLE001  (torn zip, bad pickle, ...: torch raises many types)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CpmliveError(f"{file}: unreadable ({detail})") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CpmliveError(f"{file}: incomplete trainer state (no {missing[0]!r})")
    return state


def check_optimizer_fits(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """The saved optimizer state has this optimizer's parameter groups, so loading it cannot fail."""
    try:
        saved = [len(group["params"]) for group in state["param_groups"]]
    except (KeyError, TypeError):
        raise CpmliveError(f"{path / TRAINER_STATE}: corrupt optimizer state") from None
    wanted = [len(group["params"]) for group in optimizer.param_groups]
    if saved != wanted:
        raise CpmliveError(f"{path}: its optimizer holds parameter groups of {saved} tensors, "
                           f"this run's {wanted} (a different model or delta)")


def _reason(error: CpmliveError, path: Path) -> str:
    """The error without the checkpoint's own path, which the caller's message names."""
    text = str(error)
    for prefix in (f"{path}/", f"{path}: "):
        text = text.replace(prefix, "")
    return text


def resume_candidates(run_dir: Path) -> list[Path]:
    """Where ``--resume auto`` looks, in order: what ``latest`` names, then every older
    checkpoint, newest first. Empty when the run has no checkpoint at all."""
    named = _pointer(run_dir)
    steps = step_dirs(run_dir)
    if named is None:
        return steps
    limit = step_of(named)
    return [named] + [p for p in steps if p != named and (limit is None or (step_of(p) or 0) < limit)]


def resume_point(run_dir: Path, resume: str, read: Callable[[Path], T]) -> tuple[Path, T] | None:
    """The checkpoint to resume from and what ``read`` made of it; None to start fresh.

    ``read`` loads a checkpoint or raises CpmliveError. An explicit directory must be readable.
    ``auto`` falls back past unreadable checkpoints to the newest readable one, with one warning
    line; with none readable it is an error, and only a run without any checkpoint starts fresh."""
    if resume != "auto":
        path = Path(resume)
        return path, read(path)
    failures = []
    for path in resume_candidates(run_dir):
        try:
            loaded = read(path)
        except CpmliveError as exc:
            failures.append(f"{path} is unreadable ({_reason(exc, path)})")
            continue
        if failures:
            warn(f"{'; '.join(failures)}; resuming from {path.name}")
        return path, loaded
    if failures:
        raise CpmliveError(f"no readable checkpoint to resume from: {'; '.join(failures)}")
    return None


# ---- fresh runs -------------------------------------------------------------------------------


def existing_run(run_dir: Path, markers: tuple[str, ...] = ()) -> str | None:
    """What shows ``run_dir`` holds a run ("checkpoints up to step 300"), or None."""
    steps = step_dirs(run_dir)
    if steps:
        return f"checkpoints up to step {step_of(steps[0])}"
    if (run_dir / "checkpoints" / LATEST).exists():
        return f"checkpoints/{LATEST}"
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        return f"{METRICS_FILE}, no checkpoint yet"
    present = [name for name in markers if (run_dir / name).exists()]
    return ", ".join(present) or None


def refuse_existing_run(run_dir: Path, resume: str | None, markers: tuple[str, ...] = ()) -> None:
    """A run that does not continue ``run_dir``'s own checkpoints must not write into it.

    ``resume="auto"`` and a checkpoint of ``run_dir`` itself continue that run; anything else
    (no resume, or a checkpoint from elsewhere) is a new run. ``markers`` are the recipe's own
    outputs that also show a run is there (fine-tuning's ``best``)."""
    if resume == "auto":
        return
    if resume is not None and Path(resume).resolve().parent == (run_dir / "checkpoints").resolve():
        return
    held = existing_run(run_dir, markers)
    if held is not None:
        raise CpmliveError(f"{run_dir} already holds a run ({held}); resume it with --resume auto "
                           "or choose another out")


@contextmanager
def cleaned_up_on_failure(run_dir: Path, keep: Sequence[str] = ()) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves ``run_dir`` as it found it: made
    new, it is removed; empty, it is emptied again. One with a checkpoint is kept (to resume),
    and so is one holding any of ``keep`` (a best adapter validation wrote before a checkpoint)."""
    run_dir = Path(run_dir)
    existed = run_dir.is_dir()
    fresh = not run_dir.exists() or (existed and not any(run_dir.iterdir()))
    try:
        yield
    except BaseException:
        kept = any((run_dir / name).exists() for name in keep)
        if fresh and run_dir.is_dir() and not kept and not step_dirs(run_dir) \
                and not (run_dir / "checkpoints" / LATEST).exists():
            for entry in [run_dir] if not existed else list(run_dir.iterdir()):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


# ---- interrupts -------------------------------------------------------------------------------


class StopRequest:
    """While entered (in the main thread), SIGINT and SIGTERM only set :attr:`signal`; the
    training loop checks :attr:`requested` after each step, saves there and raises
    KeyboardInterrupt. A second signal raises KeyboardInterrupt at once, without a checkpoint
    (for a step that takes too long to wait for). Elsewhere than the main thread, signals keep
    their handlers and nothing is deferred."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = [
    "LATEST", "StopRequest", "TRAINER_STATE", "check_optimizer_fits", "checkpoint_dir", "cleaned_up_on_failure",
    "existing_run", "write_into",
    "latest_checkpoint", "publish", "read_trainer_state", "refuse_existing_run", "resume_candidates",
    "resume_point", "step_dirs", "step_of", "warn", "write_checkpoint",
]
