"""CPM-Ant's input layout constants (spec sections 4 and 5.1), in one place for the objectives,
fine-tuning and decoding.

Every row starts with the ``prompt_length`` soft-prompt ids of its task: task 1 for blank
infilling, task 2 for generation (rows ``task * prompt_length ...`` of the prompt table). The
text after them carries the task's segment id.
"""

from __future__ import annotations

INFILLING, GENERATION = 1, 2
TEXT_SEGMENT = {INFILLING: 1, GENERATION: 2}


def prompt_ids(task: int, prompt_length: int) -> list[int]:
    """The task's rows of the prompt table, as the model's prompt ids."""
    return [task * prompt_length + j for j in range(prompt_length)]


__all__ = ["GENERATION", "INFILLING", "TEXT_SEGMENT", "prompt_ids"]
