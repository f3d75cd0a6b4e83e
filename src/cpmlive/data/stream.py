"""Packed pretraining batches from a token store, resumable from one small position.

Documents are cut into pieces that fit a row with their prompt; every epoch visits all pieces
in a seeded order. The instance for piece ``k`` of epoch ``e`` (objective and mask) comes from
a generator seeded by ``(seed, e, k)``, so a batch depends only on the position it starts from:
``(epoch, index)`` is the whole state a checkpoint needs to resume exactly.

A mixture weights the sources of the store: an epoch holds each piece of a source of weight
``w`` ``floor(w)`` times, plus a seeded share ``w - floor(w)`` of its pieces once more (a new
share every epoch), so 0.25 visits a quarter of a source per epoch and 3 visits it three times.
Sources the mixture does not name keep weight 1; weight 0 leaves a source out.

Two objectives, each family naming its own (``Family.pretrain_objective``): ``infill-generate``
(each piece infilled or generated, p = 0.5, behind its task's soft prompt: CPM-Ant's) and
``causal`` (GPT-style language modelling: a piece with the token before it, every next token a
target, the document's end token included: CPM-1's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cpmlive.data.layout import GENERATION, INFILLING
from cpmlive.data.objectives import Batch, Instance, make_instance, make_record, pack
from cpmlive.data.store import TokenStore
from cpmlive.errors import CpmliveError


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def document_pieces(store: TokenStore, piece_tokens: int, min_tokens: int) -> np.ndarray:
    """``[n, 4]`` rows of (document, start, length, source) over the text between ``<s>`` and ``</s>``."""
    rows = []
    offsets = np.asarray(store.offsets, dtype=np.int64)
    for doc in range(store.num_documents):
        text_length = int(offsets[doc + 1] - offsets[doc]) - 2
        source = int(store.document_sources[doc])
        for start in range(0, max(text_length, 0), piece_tokens):
            length = min(piece_tokens, text_length - start)
            if length >= min_tokens:
                rows.append((doc, start, length, source))
    if not rows:
        raise CpmliveError(f"{store.directory}: no document has {min_tokens}+ tokens in split {store.split!r}")
    return np.asarray(rows, dtype=np.int64)


def source_weights(store: TokenStore, mixture: Mapping[str, float] | None) -> np.ndarray:
    """Weight of each source of ``store`` (1 unless ``mixture`` names it); checks the names and values."""
    weights = np.ones(len(store.sources), dtype=np.float64)
    for name, weight in (mixture or {}).items():
        check_mixture_weight(name, weight)
        weights[store.source_index(name)] = float(weight)
    return weights


def check_mixture_weight(name: str, weight: object) -> None:
    """CpmliveError unless ``weight`` is a finite number >= 0."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise CpmliveError(f"mixture weight of {name} must be a finite number >= 0, got {weight!r}")


def mixture_shares(pieces: np.ndarray, weights: np.ndarray, sources: list[str]) -> dict[str, float]:
    """Share of the tokens of an epoch that comes from each source."""
    tokens = np.bincount(pieces[:, 3], weights=pieces[:, 2], minlength=len(sources)) * weights
    return {name: float(share) for name, share in zip(sources, tokens / tokens.sum())}


INFILL_GENERATE, CAUSAL = "infill-generate", "causal"
OBJECTIVES = (INFILL_GENERATE, CAUSAL)
OBJECTIVE_ALIASES = {"cpm-ant": INFILL_GENERATE}  # the name it had when CPM-Ant was the only family
CAUSAL_TASK = 1  # logged as the generation loss (``objectives.TASK_NAMES``)


def causal_instance(document: np.ndarray, start: int, length: int) -> Instance:
    """Piece ``start:start+length`` of a document's text as a left-to-right row: its inputs are
    the token before it (the document's start token for the first piece) and the piece, each
    predicting the next (the document's end token after the last piece)."""
    window = document[start:start + length + 2].astype(np.int64)
    inputs, targets = window[:-1], window[1:]
    count = len(inputs)
    return Instance(input=inputs, target=targets, context=np.zeros(count, dtype=bool),
                    position=np.arange(count, dtype=np.int64), segment=np.zeros(count, dtype=np.int64),
                    task=np.full(count, CAUSAL_TASK, dtype=np.int64), length=count)


class PretrainStream:
    """Batches of ``batch_size`` rows of ``seq_length`` under one of :data:`OBJECTIVES`."""

    def __init__(self, store: TokenStore, seq_length: int, batch_size: int, seed: int = 0,
                 prompt_length: int = 32, min_tokens: int = 8, vocab_size: int | None = None,
                 mixture: Mapping[str, float] | None = None, objective: str = INFILL_GENERATE) -> None:
        objective = OBJECTIVE_ALIASES.get(objective, objective)
        if objective not in OBJECTIVES:
            raise CpmliveError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        self.store, self.seq_length, self.batch_size = store, seq_length, batch_size
        self.seed, self.prompt_length = seed, prompt_length
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = int(store.meta["bos_id"]), int(store.meta["eos_id"])
        # A row holds one piece at most: prompt, <s>, piece, </s> and the packer's strict "<".
        self.pieces = document_pieces(store, seq_length - prompt_length - 3, min_tokens)
        self.weights = source_weights(store, mixture)
        present = np.bincount(self.pieces[:, 3], minlength=len(store.sources)) > 0
        if not (self.weights[present] > 0).any():
            raise CpmliveError("the mixture gives every source of the data weight 0")
        self.shares = mixture_shares(self.pieces, self.weights, store.sources)
        self.position = StreamPosition()
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_pieces(self, rng: np.random.Generator) -> np.ndarray:
        """Piece indices of one epoch before shuffling, each source repeated by its weight."""
        if (self.weights == 1).all():
            return np.arange(len(self.pieces))
        chosen = []
        for source, weight in enumerate(self.weights):
            members = np.flatnonzero(self.pieces[:, 3] == source)
            whole, part = int(weight), weight - int(weight)
            chosen.extend([members] * whole)
            extra = round(part * len(members))
            if extra:
                chosen.append(np.sort(rng.choice(members, size=extra, replace=False)))
        return np.concatenate(chosen)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            pieces = self._epoch_pieces(rng)
            self._order = pieces[rng.permutation(len(pieces))]
            self._order_epoch = epoch
        return self._order

    def _instance(self, epoch: int, index: int):
        doc, start, length, _ = self.pieces[self._epoch_order(epoch)[index]]
        if self.objective == CAUSAL:
            return causal_instance(self.store.document(int(doc)), int(start), int(length))
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
            if index >= len(self._epoch_order(epoch)):
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
        if self.vocab_size is not None and self.objective == INFILL_GENERATE:
            prompt = (batch.segment == 0) & batch.valid
            batch.input_ids = torch.where(prompt, batch.input_ids + self.vocab_size, batch.input_ids)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.position.to_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(int(state["epoch"]), int(state["index"]))


def fixed_batches(store: TokenStore, seq_length: int, batch_size: int, count: int, seed: int = 1234,
                  vocab_size: int | None = None, prompt_length: int = 32,
                  objective: str = INFILL_GENERATE) -> list[Batch]:
    """The same ``count`` batches every time (validation)."""
    stream = PretrainStream(store, seq_length, batch_size, seed=seed, vocab_size=vocab_size,
                            prompt_length=prompt_length, objective=objective)
    total_pieces = len(stream.pieces)
    batches = []
    for _ in range(count):
        batches.append(stream.next_batch())
        if stream.position.epoch > 0 or stream.position.index >= total_pieces:
            break
    return batches


__all__ = ["CAUSAL", "INFILL_GENERATE", "OBJECTIVES", "OBJECTIVE_ALIASES", "PretrainStream", "causal_instance",
           "StreamPosition", "document_pieces", "fixed_batches", "mixture_shares", "source_weights"]
