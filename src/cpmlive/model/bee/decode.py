"""Decoding CPM-Bee's answers, the model's side: the prompts read into a cache, and one step of
rows that each feed their answer's next token (a :class:`~cpmlive.data.bee.Beam`: the token, its
sub id, its answer's segment and position). ``infer.bee`` (beam search, sampling, the engine's
batch) and ``align.policy`` (rollouts) decode with these."""

from __future__ import annotations

import torch
from torch import Tensor

from cpmlive.data.bee import Beam, Prompt, PromptBatch
from cpmlive.model.bee.model import BeeCache, CpmBee
from cpmlive.model.cache import KVCache


def read_prompts(model: CpmBee, batch: PromptBatch, rows: int, capacity: int) -> BeeCache:
    """A cache of ``capacity`` positions holding the batch's prompts, each repeated over
    ``rows // tasks`` rows (beams), none decoded yet."""
    repeat = rows // len(batch.row_tables)
    inputs = {name: tensor.repeat_interleave(repeat, dim=0) for name, tensor in batch.inputs.items()}
    cache = model.new_cache(rows, capacity)
    model(**inputs, cache=cache, last=1)
    return cache


def task_segments(prompts: list[Prompt], device: torch.device) -> Tensor:
    """``[tasks, 1]``: each task's own segment count, which its answers' relations index by (the
    row's last token may be an in-context example's)."""
    return torch.tensor([[prompt.num_segments] for prompt in prompts], dtype=torch.int32, device=device)


def step_hidden(model: CpmBee, beams: list[Beam], segment_rel: Tensor, num_segments: Tensor,
                cache: KVCache) -> Tensor:
    """``[rows, d]``: the final hidden state of each row's fed token."""
    device = num_segments.device

    def column(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)[:, None]

    ones = torch.ones(len(beams), 1, dtype=torch.bool, device=device)
    return model(column([b.feed for b in beams]), column([b.feed_sub for b in beams]), ones,
                 column([b.segment for b in beams]), segment_rel, num_segments, ones,
                 position=column([b.position for b in beams]), cache=cache)[:, -1]


def answer_step(model: CpmBee, cache: BeeCache, batch: PromptBatch, beams: list[Beam], num_segments: Tensor) -> Tensor:
    """One step's logits ``[rows, vocab + the batch's extras]`` (float32)."""
    hidden = step_hidden(model, beams, cache.segment_rel, num_segments, cache)
    return model.logits(hidden, batch.ext_ids, batch.ext_subs).float()


__all__ = ["answer_step", "read_prompts", "step_hidden", "task_segments"]
