"""CPM-Ant's two pretraining objectives and packing (spec section 4); the loss is in
:mod:`cpmlive.model.loss`.

A document becomes *records* (``make_record``/``chunk_document``): a small header, then
``<s> piece </s>``. A record becomes an *instance* (``make_instance``): the 32 prompt ids of its
objective, then the text, with a ``context`` flag per token. Both objectives hide tokens purely
through ``context`` (the model's attention mask); the hidden tokens stay in the input and the
model predicts each one from the position just before it:

* blank infilling (prompt task 1, segment 1, task 0 "mlm"): ``m ~ U{1, n-1}`` random tokens
  after ``<s>`` are hidden;
* text generation (prompt task 2, segment 2, task 1 "lm"): the last ``m ~ U{1, n-1}`` tokens
  are hidden.

Instances are packed first-fit into fixed-length rows (``BatchPacker``/``pack``); ``span`` keeps
packed instances from seeing each other.

Two ways to draw the random numbers:

* ``OriginalRng`` replays the original's calls (``random.randint`` then legacy
  ``numpy.random.choice``), so ``random.seed(s); np.random.seed(s)`` in the original and
  ``OriginalRng.seeded(s)`` here give the same masks bit for bit. ``OriginalRng()`` draws from
  the two global generators exactly as the original does.
* A ``numpy.random.Generator`` is the API for our own training: explicit state (no hidden
  globals that forked data-loader workers would duplicate) and numpy's modern algorithms. The
  distributions are the same; the masks for a given seed are not.

Quirk kept from the original: every packed instance starts with its own prompt ids, but the
model looks up only the first ``prompt_length`` columns of a row in the prompt table; the prompt
ids of later spans in a row are embedded with the vocabulary table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from cpmlive.data.layout import GENERATION, INFILLING

ANT_BOS_ID = 6
ANT_EOS_ID = 7
IGNORE_INDEX = -100
TASK_NAMES = {0: "mlm", 1: "lm"}

# prompt task -> (segment type, segment task), as the preprocessing writes them
_OBJECTIVES = {INFILLING: (1, 0), GENERATION: (2, 1)}


# ---- records ------------------------------------------------------------------------------------


def make_record(tokens: list[int], task: int, bos_id: int = ANT_BOS_ID, eos_id: int = ANT_EOS_ID) -> list[int]:
    """``[task, 1, n+2, seg_type, seg_task, <s>, *tokens, </s>]``: one segment, task 1 or 2."""
    if task not in _OBJECTIVES:
        raise ValueError(f"task must be {INFILLING} (infilling) or {GENERATION} (generation), got {task}")
    seg_type, seg_task = _OBJECTIVES[task]
    return [task, 1, len(tokens) + 2, seg_type, seg_task, bos_id, *tokens, eos_id]


def chunk_document(ids: list[int], rng: random.Random | ModuleType = random, max_length: int = 1024,
                   prompt_length: int = 32, min_tokens: int = 32, bos_id: int = ANT_BOS_ID,
                   eos_id: int = ANT_EOS_ID) -> list[list[int]]:
    """Records for one tokenized document, as ``preprocess_dataset.py`` writes them.

    Pieces hold at most ``max_length - prompt_length - 2`` tokens (room for the prompt, ``<s>``
    and ``</s>``); the first piece shorter than ``min_tokens`` ends the document. Each loop
    step draws ``rng.random()`` *before* slicing (the final, too-short piece draws too, as in
    the original): ``<= 0.5`` gives an infilling record, otherwise a generation record.
    """
    size = max_length - prompt_length - 2
    records, start = [], 0
    while start < len(ids):
        task = INFILLING if rng.random() <= 0.5 else GENERATION
        piece = list(ids[start:start + size])
        if len(piece) < min_tokens:
            break
        start += len(piece)
        records.append(make_record(piece, task, bos_id, eos_id))
    return records


# ---- instances ----------------------------------------------------------------------------------


@dataclass
class OriginalRng:
    """The two generators the original draws from: Python's ``random`` and numpy's legacy one.

    The defaults are the global generators themselves; ``seeded`` gives private copies that
    start where ``random.seed(s); np.random.seed(s)`` would.
    """

    py: random.Random | ModuleType = random
    legacy: np.random.RandomState | ModuleType = np.random

    @classmethod
    def seeded(cls, seed: int) -> OriginalRng:
        return cls(random.Random(seed), np.random.RandomState(seed))


Rng = np.random.Generator | OriginalRng


@dataclass
class Instance:
    """One record as model inputs: ``length`` positions, the prompt first (arrays are int64)."""

    input: np.ndarray
    target: np.ndarray
    context: np.ndarray
    position: np.ndarray
    segment: np.ndarray
    task: np.ndarray
    length: int


def _mask_count(n: int, rng: Rng) -> int:
    if isinstance(rng, OriginalRng):
        return rng.py.randint(1, n - 1)
    return int(rng.integers(1, n))


def _random_offsets(n: int, m: int, rng: Rng) -> np.ndarray:
    """``m`` distinct offsets in ``1..n-1``: any token but the segment's ``<s>``."""
    if isinstance(rng, OriginalRng):
        return rng.legacy.choice(n - 1, m, replace=False) + 1
    return rng.choice(n - 1, m, replace=False) + 1


def _mask_segment(context: np.ndarray, begin: int, n: int, seg_task: int, rng: Rng) -> None:
    m = _mask_count(n, rng)
    if seg_task == 0:
        context[begin + _random_offsets(n, m, rng)] = False
    elif seg_task == 1:
        context[begin + n - m:begin + n] = False
    else:
        raise ValueError(f"segment task {seg_task} is not a CPM-Ant pretraining objective (0 or 1)")


def make_instance(record: Iterable[int], rng: Rng, prompt_length: int = 32,
                  max_text_length: int = 992) -> Instance | None:
    """``CPMAntPretrainDataset.__get_item_data``: one record -> instance arrays.

    Returns ``None`` (the original's skip) when the text is longer than ``max_text_length``.
    Per segment of ``n`` tokens: draw ``m``, hide tokens, then ``target[t] = input[t+1]`` where
    ``t+1`` is hidden and ``-100`` elsewhere (the segment's last position included).
    """
    record = np.asarray(record, dtype=np.int64)
    global_task, n_segments = int(record[0]), int(record[1])
    header = record[2:2 + 3 * n_segments].reshape(n_segments, 3)
    text = record[2 + 3 * n_segments:]
    if len(text) > max_text_length:
        return None
    context = np.ones(len(text), dtype=bool)
    segment = np.zeros(len(text), dtype=np.int64)
    task = np.zeros(len(text), dtype=np.int64)
    target = np.full(len(text), IGNORE_INDEX, dtype=np.int64)
    begin = 0
    for n, seg_type, seg_task in header.tolist():
        end = begin + n
        _mask_segment(context, begin, n, seg_task, rng)
        segment[begin:end], task[begin:end] = seg_type, seg_task
        target[begin:end - 1] = np.where(context[begin + 1:end], IGNORE_INDEX, text[begin + 1:end])
        begin = end
    prompt = np.arange(prompt_length, dtype=np.int64)
    return Instance(
        input=np.concatenate([prompt + global_task * prompt_length, text]),
        target=np.concatenate([np.full(prompt_length, IGNORE_INDEX, dtype=np.int64), target]),
        context=np.concatenate([np.ones(prompt_length, dtype=bool), context]),
        position=np.concatenate([prompt, np.arange(len(text), dtype=np.int64) + prompt_length]),
        segment=np.concatenate([np.zeros(prompt_length, dtype=np.int64), segment]),
        task=np.concatenate([np.zeros(prompt_length, dtype=np.int64), task]),
        length=prompt_length + len(text),
    )


# ---- packing ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Packed rows, ready for ``model(input_ids, segment, context, span, valid)``.

    ``position`` is what the original packer emits (per-instance 0, 1, ...). The model can
    ignore it: within a span it differs from the row index by a constant, and spans never
    attend to each other.
    """

    input_ids: Tensor
    segment: Tensor
    context: Tensor
    span: Tensor
    valid: Tensor
    target: Tensor
    task: Tensor
    position: Tensor
    length: Tensor

    def to(self, device: str | torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# padding value and dtype of every per-position field of a row
_ROW_FIELDS = {
    "input_ids": ("input", 0, torch.long),
    "target": ("target", IGNORE_INDEX, torch.long),
    "context": ("context", False, torch.bool),
    "position": ("position", 0, torch.long),
    "segment": ("segment", 0, torch.int32),
    "task": ("task", -1, torch.long),
}


class _Row:
    def __init__(self) -> None:
        self.instances: list[Instance] = []
        self.used = 0

    def add(self, instance: Instance) -> None:
        self.instances.append(instance)
        self.used += instance.length

    def fill(self, batch: dict[str, Tensor], r: int) -> None:
        start = 0
        for index, instance in enumerate(self.instances):
            end = start + instance.length
            for name, (attr, _, _) in _ROW_FIELDS.items():
                batch[name][r, start:end] = torch.from_numpy(np.asarray(getattr(instance, attr)))
            batch["span"][r, start:end] = index
            start = end
        batch["span"][r, start:] = len(self.instances)
        batch["length"][r] = start


def _rows_to_batch(rows: list[_Row], max_length: int) -> Batch:
    shape = (len(rows), max_length)
    batch = {name: torch.full(shape, pad, dtype=dtype) for name, (_, pad, dtype) in _ROW_FIELDS.items()}
    batch["span"] = torch.zeros(shape, dtype=torch.int32)
    batch["length"] = torch.zeros(len(rows), dtype=torch.int32)
    for r, row in enumerate(rows):
        row.fill(batch, r)
    batch["valid"] = torch.arange(max_length)[None, :] < batch["length"][:, None]
    return Batch(**batch)


class BatchPacker:
    """The original ``BatchPacker``, fed one instance at a time.

    An instance goes into the first open row with ``used + length < max_length`` (strict, so a
    row never ends exactly full unless one instance fills it), else opens a new row. As soon
    as more than ``batch_size`` rows are open, the first ``batch_size`` are emitted (partly
    filled rows included). ``flush`` emits whatever is left, which the original never does.
    Padding: id 0, target -100, context False, segment 0, position 0, task -1, span = the
    number of instances in the row.
    """

    def __init__(self, max_length: int, batch_size: int) -> None:
        self.max_length, self.batch_size = max_length, batch_size
        self.rows: list[_Row] = []

    def add(self, instance: Instance | None) -> Batch | None:
        if instance is None:
            return None
        if instance.length > self.max_length:
            raise ValueError(f"instance of length {instance.length} exceeds max_length {self.max_length}")
        row = next((r for r in self.rows if r.used + instance.length < self.max_length), None)
        if row is None:
            row = _Row()
            self.rows.append(row)
        row.add(instance)
        if len(self.rows) > self.batch_size:
            return self._emit(self.batch_size)
        return None

    def flush(self) -> Batch | None:
        return self._emit(len(self.rows)) if self.rows else None

    def _emit(self, count: int) -> Batch:
        emitted, self.rows = self.rows[:count], self.rows[count:]
        return _rows_to_batch(emitted, self.max_length)


def concat_batches(batches: list[Batch]) -> Batch:
    return Batch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)})


def pack(instances: Iterable[Instance | None], max_length: int, batch_size: int,
         all_rows: bool = False) -> Batch:
    """Pack a finite list the way the original packer would.

    Returns the first batch the original emits, or, if the instances run out first, the rows
    still open (at most ``batch_size``; the original would wait for more data). With
    ``all_rows`` every row is returned: all emitted batches, then the open rows.
    """
    packer = BatchPacker(max_length, batch_size)
    batches = [b for b in map(packer.add, instances) if b is not None]
    rest = packer.flush()
    if rest is not None:
        batches.append(rest)
    if not batches:
        raise ValueError("pack() needs at least one instance")
    return concat_batches(batches) if all_rows else batches[0]


__all__ = [
    "ANT_BOS_ID", "ANT_EOS_ID", "Batch", "BatchPacker", "IGNORE_INDEX",
    "Instance", "OriginalRng", "TASK_NAMES", "chunk_document", "concat_batches", "make_instance", "make_record",
    "pack",
]
