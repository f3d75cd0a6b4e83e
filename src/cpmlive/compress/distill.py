"""Knowledge distillation: a student learns a teacher's output distribution (and optionally its
final hidden states) on the pretraining objectives' batches.

``loss = (1 - alpha) * LM + alpha * T² * KL(teacher_T || student_T) + beta * hidden_MSE``

* the KL is over the target positions only, both distributions softened by temperature ``T``
  (Hinton et al.; ``T²`` keeps its gradient's scale independent of ``T``), computed
  ``DISTILL_ROWS`` rows at a time so that no ``[positions, vocab]`` block larger than that exists;
* the hidden-state term is the mean squared difference of the final hidden states at the text
  positions, normalised by the teacher's mean square (so it is scale-free, as in TinyBERT /
  MiniLM practice) — the student and teacher widths must match for it;
* the LM term is the objectives' own cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.objectives import IGNORE_INDEX, Batch
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Transformer
from cpmlive.model.loss import LinearCrossEntropy, head_losses

DISTILL_ROWS = 512


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weights the LM loss
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise CpmliveError(f"distill: temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise CpmliveError(f"distill: alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.hidden_weight, (int, float)) or self.hidden_weight < 0:
            raise CpmliveError(f"distill: hidden_weight must be >= 0, got {self.hidden_weight!r}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Summed ``T² KL(softmax(teacher / T) || softmax(student / T))`` over rows."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    if student_hidden.shape != teacher_hidden.shape:
        raise CpmliveError(f"distill: hidden states of the student {list(student_hidden.shape)} and the teacher "
                           f"{list(teacher_hidden.shape)} differ; set hidden_weight to 0")
    teacher = teacher_hidden.float()
    return (student_hidden.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)


def lm_loss(model: Transformer, rows: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of the target rows through the tied head (the pretraining loss)."""
    if torch.is_grad_enabled():
        return LinearCrossEntropy.apply(rows, model.head_weight(), targets)[0]
    return head_losses(rows, model.head_weight(), targets)[0].sum()


def distillation_loss(student: Transformer, teacher: Transformer, batch: Batch,
                      config: DistillConfig) -> tuple[Tensor, dict]:
    """The combined loss of one batch and its parts (detached, for logging)."""
    inputs = (batch.input_ids, batch.segment, batch.context, batch.span, batch.valid)
    hidden = student(*inputs)
    with torch.no_grad():
        teacher_hidden = teacher(*inputs)
    selected = batch.target != IGNORE_INDEX
    rows, teacher_rows = hidden[selected], teacher_hidden[selected]
    count = max(int(selected.sum()), 1)
    kl = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.size(0), DISTILL_ROWS):
        piece = slice(start, start + DISTILL_ROWS)
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher_rows[piece])
        kl = kl + soft_kl(student.logits(rows[piece]), teacher_logits, config.temperature)
    kl = kl / count
    lm = lm_loss(student, rows, batch.target[selected]) / count if config.alpha < 1 else kl.new_zeros(())
    loss = (1 - config.alpha) * lm + config.alpha * kl
    parts = {"lm": lm.detach(), "kl": kl.detach()}
    if config.hidden_weight > 0:
        mse = hidden_mse(hidden[batch.valid], teacher_hidden[batch.valid])
        loss = loss + config.hidden_weight * mse
        parts["hidden_mse"] = mse.detach()
    return loss, parts


__all__ = ["DistillConfig", "distillation_loss", "hidden_mse", "soft_kl"]
