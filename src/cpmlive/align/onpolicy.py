"""On-policy preference pairs: the real answer (chosen) against the model's own sample for the
same prompt (rejected), as ``cpmlive data preferences --model M`` writes them.

Unlike the ground-truth pairs (``data.instructions``), the rejected side is what this model
actually says, so DPO on them pushes down its own typical errors. A sample equal to the real
answer is dropped; one that is different but also right still becomes a rejected answer, which
is the limit of this kind of pair.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from cpmlive.align.policy import sample_completions
from cpmlive.data.align import prompt_ids
from cpmlive.data.chat import ChatTemplate
from cpmlive.data.instructions import Item
from cpmlive.model.stack import Transformer


def on_policy_pairs(model: Transformer, tokenizer: Any, items: Sequence[Item], template: ChatTemplate | None = None,
                    max_new_tokens: int = 48, temperature: float = 1.0, batch_size: int = 16,
                    seed: int = 0, max_input_tokens: int = 160) -> Iterator[dict[str, str]]:
    """One pair per item whose sample differs from its answer, in the items' order."""
    template = template or ChatTemplate()
    torch.manual_seed(seed)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows, kept = [], []
        for item in chunk:
            text = template.render([{"role": "user", "content": item.prompt}])
            ids = prompt_ids(tokenizer, text)
            if len(ids) <= max_input_tokens:  # a longer prompt would lose the assistant's opening
                rows.append(ids)
                kept.append(item)
        if not rows:
            continue
        chunk = kept
        samples = sample_completions(model, rows, max_new_tokens, tokenizer.eos_id, temperature)
        for item, sample in zip(chunk, samples):
            text = tokenizer.decode([i for i in sample if i != tokenizer.eos_id]).strip()
            if text and text != item.answer.strip():
                yield {"prompt": item.prompt, "chosen": item.answer, "rejected": text, "task": item.task,
                       "kind": "on_policy"}


__all__ = ["on_policy_pairs"]
