"""CPM-Ant's input layout constants (spec sections 4 and 5.1), in one place for the objectives,
fine-tuning and decoding.

Every row starts with the ``prompt_length`` soft-prompt ids of its task: task 1 for blank
infilling, task 2 for generation (rows ``task * prompt_length ...`` of the prompt table). The
text after them carries the task's segment id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INFILLING, GENERATION = 1, 2
TEXT_SEGMENT = {INFILLING: 1, GENERATION: 2}


def prompt_ids(task: int, prompt_length: int) -> list[int]:
    """The task's rows of the prompt table, as the model's prompt ids."""
    return [task * prompt_length + j for j in range(prompt_length)]


@dataclass
class PromptBatch:
    """Left-padded rows ``[prompt | pads | tokens]`` and their mask inputs."""

    input_ids: Tensor
    segment: Tensor
    context: Tensor
    span: Tensor
    valid: Tensor
    position: Tensor | None = None

    def as_inputs(self) -> dict[str, Tensor]:
        inputs = {"input_ids": self.input_ids, "segment": self.segment, "context": self.context,
                  "span": self.span, "valid": self.valid}
        if self.position is not None:
            inputs["position"] = self.position
        return inputs


def build_batch(rows: list[list[int]], task: int, prompt_length: int, device: torch.device | str = "cpu",
                context_rows: list[list[bool]] | None = None, prompt_task: int | None = None) -> PromptBatch:
    """CPM-Live's generation layout. ``context_rows`` marks tokens that are not context
    (blanks to fill); by default every token is context. ``prompt_task`` picks other rows of
    the prompt table than ``task``'s (a soft prompt tuned for a new task)."""
    width = max(len(r) for r in rows)
    batch, total = len(rows), prompt_length + width
    input_ids = torch.zeros(batch, total, dtype=torch.long)
    segment = torch.zeros(batch, total, dtype=torch.int32)
    context = torch.zeros(batch, total, dtype=torch.bool)
    valid = torch.zeros(batch, total, dtype=torch.bool)
    input_ids[:, :prompt_length] = torch.tensor(prompt_ids(task if prompt_task is None else prompt_task, prompt_length))
    context[:, :prompt_length] = True
    valid[:, :prompt_length] = True
    for i, row in enumerate(rows):
        start = total - len(row)
        input_ids[i, start:] = torch.tensor(row)
        segment[i, start:] = TEXT_SEGMENT[task]
        context[i, start:] = torch.tensor(context_rows[i]) if context_rows else True
        valid[i, start:] = True
    span = torch.zeros(batch, total, dtype=torch.int32)
    return PromptBatch(input_ids.to(device), segment.to(device), context.to(device), span.to(device),
                       valid.to(device))


__all__ = ["GENERATION", "INFILLING", "PromptBatch", "TEXT_SEGMENT", "build_batch", "prompt_ids"]
