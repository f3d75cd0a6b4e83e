"""Packed pretraining batches from a token store, resumable from one small position.

Documents are cut into pieces that fit a row with their prompt; every epoch visits all pieces
in a seeded order. The instance for piece ``k`` of epoch ``e`` (objective and mask) comes from
a generator seeded by ``(seed, e, k)``, so a batch depends only on the position it starts from:
``(epoch, index)`` is the whole state a checkpoint needs to resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpmlive.data.layout import GENERATION, INFILLING
from cpmlive.data.objectives import Batch, make_instance, make_record, pack
from cpmlive.data.store import TokenStore
from cpmlive.errors import CpmliveError


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def document_pieces(store: TokenStore, piece_tokens: int, min_tokens: int) -> np.ndarray:
    """``[n, 3]`` rows of (document, start, length) over the text between ``<s>`` and ``</s>``."""
    rows = []
    offsets = np.asarray(store.offsets, dtype=np.int64)
    for doc in range(store.num_documents):
        text_length = int(offsets[doc + 1] - offsets[doc]) - 2
        for start in range(0, max(text_length, 0), piece_tokens):
            length = min(piece_tokens, text_length - start)
            if length >= min_tokens:
                rows.append((doc, start, length))
    if not rows:
        raise CpmliveError(f"{store.directory}: no document has {min_tokens}+ tokens in split {store.split!r}")
    return np.asarray(rows, dtype=np.int64)


class PretrainStream:
    """Batches of ``batch_size`` rows of ``seq_length`` with both objectives, p = 0.5 each."""

    def __init__(self, store: TokenStore, seq_length: int, batch_size: int, seed: int = 0,
                 prompt_length: int = 32, min_tokens: int = 8, vocab_size: int | None = None) -> None:
        self.store, self.seq_length, self.batch_size = store, seq_length, batch_size
        self.seed, self.prompt_length = seed, prompt_length
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = int(store.meta["bos_id"]), int(store.meta["eos_id"])
        # A row holds one piece at most: prompt, <s>, piece, </s> and the packer's strict "<".
        self.pieces = document_pieces(store, seq_length - prompt_length - 3, min_tokens)
        self.position = StreamPosition()
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
            self._order_epoch = epoch
        return self._order

    def _instance(self, epoch: int, index: int):
        doc, start, length = self.pieces[self._epoch_order(epoch)[index]]
        tokens = self.store.document(int(doc))[1 + start:1 + start + length].astype(np.int64).tolist()
        rng = np.random.default_rng([self.seed, epoch, index])
        task = INFILLING if rng.random() < 0.5 else GENERATION
        record = make_record(tokens, task, self.bos_id, self.eos_id)
        return make_instance(record, rng, self.prompt_length, max_text_length=self.seq_length)

    def next_batch(self) -> Batch:
        """Fill ``batch_size`` rows first-fit; the piece that would open one more row waits."""
        used: list[int] = []
        instances = []
        epoch, index = self.position.epoch, self.position.index
        while True:
            if index >= len(self.pieces):
                epoch, index = epoch + 1, 0
            instance = self._instance(epoch, index)
            row = next((r for r, n in enumerate(used) if n + instance.length < self.seq_length), None)
            if row is None and len(used) == self.batch_size:
                break
            if row is None:
                used.append(instance.length)
            else:
                used[row] += instance.length
            instances.append(instance)
            index += 1
        self.position = StreamPosition(epoch, index)
        return self._mark_prompts(pack(instances, self.seq_length, self.batch_size, all_rows=True))

    def _mark_prompts(self, batch: Batch) -> Batch:
        """Give every span's prompt ids the ``vocab_size + id`` form so each one is looked up in
        the prompt table (the original looked up only the first span's; see objectives.py)."""
        if self.vocab_size is not None:
            prompt = (batch.segment == 0) & batch.valid
            batch.input_ids = torch.where(prompt, batch.input_ids + self.vocab_size, batch.input_ids)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.position.to_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(int(state["epoch"]), int(state["index"]))


def fixed_batches(store: TokenStore, seq_length: int, batch_size: int, count: int, seed: int = 1234,
                  vocab_size: int | None = None) -> list[Batch]:
    """The same ``count`` batches every time (validation)."""
    stream = PretrainStream(store, seq_length, batch_size, seed=seed, vocab_size=vocab_size)
    total_pieces = len(stream.pieces)
    batches = []
    for _ in range(count):
        batches.append(stream.next_batch())
        if stream.position.epoch > 0 or stream.position.index >= total_pieces:
            break
    return batches


__all__ = ["PretrainStream", "StreamPosition", "document_pieces", "fixed_batches"]
