"""``log P(continuation | context)`` under any family that writes text, differentiable (prompt
tuning trains through it; ``infer.score`` reads it without gradients).

A context is read as the family reads a prompt: CPM-Ant's both ways, a left-to-right family's
left to right, an encoder-decoder's by its encoder; the continuation is predicted token by token
after it, as ``generate`` writes it. A pair may also carry text that follows the continuation
(``after``): CPM-Ant reads it as context on the far side of a blank the continuation fills (its
infilling objective: each blank token sees the context on both sides and the blank's earlier
tokens); the other families write it after the continuation, so it counts in the score.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from cpmlive.data.layout import GENERATION, INFILLING, build_batch
from cpmlive.model.stack import Transformer

Pair = tuple[list[int], list[int]] | tuple[list[int], list[int], list[int]]


def _split(pair: Pair) -> tuple[list[int], list[int], list[int]]:
    context, continuation, *rest = pair
    return list(context), list(continuation), list(rest[0]) if rest else []


def continuation_scores(model: Transformer, pairs: Sequence[Pair], eos_id: int | None = None) -> tuple[Tensor, Tensor]:
    """``[N]`` summed log-probabilities of each pair's continuation and ``[N]`` whether each of its
    tokens is the most likely one (lm-eval's ``is_greedy``). ``eos_id``: what closes an infilled
    row (CPM-Ant's text ends with it), needed only for pairs with text after the continuation."""
    rows = [_split(pair) for pair in pairs]
    if any(not context or not continuation for context, continuation, _ in rows):
        raise ValueError("every pair needs a context and a continuation")
    if hasattr(model, "seq2seq"):
        return _seq2seq_scores(model, [(c, w + a) for c, w, a in rows])
    if not getattr(model, "causal_prompt", False) and any(after for _, _, after in rows):
        return _infill_scores(model, rows, eos_id)
    return _left_to_right_scores(model, [(c, w + a) for c, w, a in rows])


def _gather(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logprobs = logits.float().log_softmax(-1)
    return logprobs.gather(1, targets[:, None]).sum(), (logprobs.argmax(-1) == targets).all()


def _stack(scores: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.stack([s for s, _ in scores]), torch.stack([g for _, g in scores])


def _left_to_right_scores(model: Transformer, rows: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
    device = model.input_embedding.weight.device
    flags = [[True] * len(context) + [False] * len(continuation) for context, continuation in rows]
    batch = build_batch([c + w for c, w in rows], GENERATION, model.config.prompt_length, device, flags)
    hidden = model(**batch.as_inputs())
    total = batch.input_ids.size(1)
    return _stack([_gather(model.logits(hidden[i, total - len(w) - 1:total - 1]), batch.input_ids[i, total - len(w):])
                   for i, (_, w) in enumerate(rows)])


def _infill_scores(model: Transformer, rows: list[tuple[list[int], list[int], list[int]]],
                   eos_id: int | None) -> tuple[Tensor, Tensor]:
    """CPM-Ant: the continuation as a blank's non-context tokens between its context and the
    text after it (then ``eos_id``), read in one pass (a context token never sees a blank's, so
    each blank token's state is the one decoding it would have)."""
    if eos_id is None:
        raise ValueError("infilling needs the end-of-text id")
    device = model.input_embedding.weight.device
    tokens = [c + w + a + [eos_id] for c, w, a in rows]
    flags = [[True] * len(c) + [False] * len(w) + [True] * (len(a) + 1) for c, w, a in rows]
    batch = build_batch(tokens, INFILLING, model.config.prompt_length, device, flags)
    hidden = model(**batch.as_inputs())
    total = batch.input_ids.size(1)
    scores = []
    for i, (c, w, _) in enumerate(rows):
        first = total - len(tokens[i]) + len(c)
        scores.append(_gather(model.logits(hidden[i, first - 1:first + len(w) - 1]),
                              batch.input_ids[i, first:first + len(w)]))
    return _stack(scores)


def _seq2seq_scores(model: Transformer, rows: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
    device = model.input_embedding.weight.device
    encoder_width = max(len(c) for c, _ in rows)
    decoder_width = max(len(w) for _, w in rows)
    start = model.prompt_tail()
    encoder = torch.tensor([c + [0] * (encoder_width - len(c)) for c, _ in rows], device=device)
    encoder_valid = torch.tensor([[True] * len(c) + [False] * (encoder_width - len(c)) for c, _ in rows],
                                 device=device)
    decoder = torch.tensor([start + w + [0] * (decoder_width - len(w)) for _, w in rows], device=device)
    decoder_valid = torch.tensor([[True] * (len(start) + len(w)) + [False] * (decoder_width - len(w))
                                  for _, w in rows], device=device)
    hidden = model.seq2seq(encoder, decoder[:, :-1], encoder_valid, decoder_valid[:, :-1])
    first = len(start) - 1
    return _stack([_gather(model.logits(hidden[i, first:first + len(w)]), decoder[i, first + 1:first + 1 + len(w)])
                   for i, (_, w) in enumerate(rows)])


__all__ = ["Pair", "continuation_scores"]
