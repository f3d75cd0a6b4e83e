"""The pretraining loss: token-mean cross-entropy over the positions with a target
(``masked_lm_loss``), computed through the tied head ``LOSS_ROW_BUCKET`` rows at a time
(``LinearCrossEntropy``) so that no ``[B, L, vocab]`` tensor of logits is ever made."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.objectives import IGNORE_INDEX, TASK_NAMES, Batch
from cpmlive.utils import compute_dtype

LOSS_ROW_BUCKET = 256


class TiedHeadModel(Protocol):
    """A model of any family as the loss reads it: called with the packed rows' inputs, its
    output head tied to its input embedding."""

    input_embedding: torch.nn.Module

    def head_weight(self) -> Tensor: ...  # the tied output head's float weight

    def __call__(self, input_ids: Tensor, segment: Tensor, context: Tensor, span: Tensor,
                 valid: Tensor) -> Tensor: ...


def head_losses(hidden: Tensor, weight: Tensor, targets: Tensor,
                want_gradient: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-row cross-entropy of ``hidden @ weight.T`` (0 where the target is ignored), made
    ``LOSS_ROW_BUCKET`` rows at a time so that only one ``[block, vocab]`` float32 block of
    logits exists at once. With ``want_gradient``, also the loss's gradient with respect to the
    logits (softmax minus one-hot), in the products' dtype, ``[rows, vocab]``.

    The products run in the autocast dtype when autocast is on (as ``F.linear`` would); the
    softmax runs in float32.
    """
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        losses = torch.zeros(h.size(0), dtype=torch.float32, device=h.device)
        grad_logits = h.new_empty(h.size(0), w.size(0)) if want_gradient else None
        for start in range(0, h.size(0), LOSS_ROW_BUCKET):
            block = slice(start, start + LOSS_ROW_BUCKET)
            logits = (h[block] @ w.T).float()
            kept = targets[block] != IGNORE_INDEX
            index = targets[block].clamp(min=0)[:, None]
            normaliser = logits.logsumexp(dim=-1, keepdim=True)
            losses[block] = (normaliser - logits.gather(1, index))[:, 0] * kept
            if want_gradient:
                probs = logits.sub_(normaliser).exp_()
                probs.scatter_add_(1, index, torch.full_like(index, -1, dtype=probs.dtype))
                grad_logits[block] = probs.mul_(kept[:, None])
    return losses, grad_logits


class LinearCrossEntropy(torch.autograd.Function):
    """Summed :func:`head_losses` with autograd, without the logits kept for the backward pass.

    The standard path keeps the ``[rows, vocab]`` logits, their float32 copy and log-softmax,
    then makes a float32 gradient of the same size: tensors of over 100 MB per step at a 30k
    vocabulary, mapped and page-faulted afresh every step. This keeps only the gradient with
    respect to the logits, in the products' dtype, which is what the standard path's backward
    hands to the same two products. Returns the summed loss, and the per-row losses without
    gradient (for logging).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        losses, grad_logits = head_losses(hidden, weight, targets, want_gradient=True)
        ctx.save_for_backward(hidden, weight, grad_logits)
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total: Tensor, _unused: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        hidden, weight, grad_logits = ctx.saved_tensors
        grad_hidden = grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = ((grad_logits @ weight.to(grad_logits.dtype)).float() * grad_total).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = ((grad_logits.T @ hidden.to(grad_logits.dtype)).float() * grad_total).to(weight.dtype)
        return grad_hidden, grad_weight, None


def seq2seq_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, int]:
    """An encoder-decoder's teacher-forced loss: each row's encoder ids and target ids (ending with
    the token that ends an answer); the decoder reads its start token, then the targets but the
    last. The mean over target tokens, and their count."""
    device = model.input_embedding.weight.device
    width = max(len(e) for e, _ in rows)
    encoder = torch.tensor([e + [pad_id] * (width - len(e)) for e, _ in rows], device=device)
    encoder_valid = torch.tensor([[True] * len(e) + [False] * (width - len(e)) for e, _ in rows], device=device)
    longest = max(len(t) for _, t in rows)
    targets = torch.tensor([t + [-100] * (longest - len(t)) for _, t in rows], device=device)
    start = torch.full((len(rows), 1), model.config.decoder_start_id, device=device)
    decoder = torch.cat([start, targets[:, :-1]], 1)
    decoder_valid = torch.cat([torch.ones_like(start, dtype=torch.bool), targets[:, :-1] >= 0], 1)
    hidden = model.seq2seq(encoder, decoder.clamp(min=0), encoder_valid, decoder_valid)
    logits = model.logits(hidden)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss, int((targets >= 0).sum())


def masked_lm_loss(model: TiedHeadModel, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean cross-entropy over positions with a target, plus the same per task.

    Only the hidden states at target positions go through the vocabulary projection
    (:class:`LinearCrossEntropy`), so no ``[B, L, vocab]`` tensor is made. The per-task losses
    are detached (for logging) and NaN for a task with no targets in the batch.
    """
    hidden = model(batch.input_ids, batch.segment, batch.context, batch.span, batch.valid)
    selected = batch.target != IGNORE_INDEX
    count = int(selected.sum())
    # Pad the rows to a multiple of LOSS_ROW_BUCKET: oneDNN compiles and caches a kernel per
    # matmul shape, and a new target count every step would grow that cache without bound.
    padding = -count % LOSS_ROW_BUCKET
    rows = F.pad(hidden[selected], (0, 0, 0, padding))
    targets = F.pad(batch.target[selected], (0, padding), value=IGNORE_INDEX)
    weight = model.head_weight()
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        total, losses = LinearCrossEntropy.apply(rows, weight, targets)
    else:
        losses, _ = head_losses(rows, weight, targets)
        total = losses.sum()
    tasks = batch.task[selected]
    per_task = {name: losses[:count][tasks == task].mean() for task, name in TASK_NAMES.items()}
    return total / count, per_task


__all__ = ["TiedHeadModel", "LOSS_ROW_BUCKET", "LinearCrossEntropy", "head_losses", "masked_lm_loss"]
