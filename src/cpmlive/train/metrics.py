"""The live record of a run: append-only JSON lines, flushed per line.

A crash can leave a torn last line; readers skip any line that does not parse, so the file
never blocks a resume or a dashboard. A resumed run first drops the records of the steps after
its checkpoint (they are run again), so the file holds one record of each kind per step, as an
uninterrupted run's does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``RUN_DIR/metrics.jsonl``; ``resumed_step``: the step of the checkpoint
    the run continues from (records of later steps are dropped first)."""

    def __init__(self, run_dir: str | os.PathLike, resumed_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and self.path.is_file():
            self._drop_after(resumed_step)
        self._repair_torn_tail()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _drop_after(self, step: int) -> None:
        """Rewrite the file (atomically) without the records of steps after ``step`` and torn lines."""
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def _repair_torn_tail(self) -> None:
        """A line cut by a crash would glue onto the next record: end it first."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False, default=_plain) + "\n")
            self._handle.flush()
        except OSError as exc:  # a full disk or a vanished mount: the error alone would not say where
            raise CpmliveError(f"{self.path}: cannot write the run's metrics ({exc.strerror or exc})") from None

    def close(self) -> None:
        self._handle.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_records(run_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def latest_by_step(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One record per step of a kind: the last one written (a resumed run rewrites steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("type") == kind and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


@torch.no_grad()
def parameter_stats(model: torch.nn.Module) -> dict[str, list[float]]:
    """mean / std / max-abs of every named parameter (the CPM-Live "inspect" view)."""
    stats = {}
    for name, param in model.named_parameters():
        data = param.detach().float()
        std = data.std().item() if data.numel() > 1 else 0.0
        stats[name] = [round(data.mean().item(), 6), round(std, 6), round(data.abs().max().item(), 6)]
    return stats


class NullLog:
    """The metrics log of a rank other than 0: records are dropped."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["METRICS_FILE", "MetricsLog", "NullLog", "finite_or_none", "latest_by_step", "parameter_stats",
           "read_records"]
