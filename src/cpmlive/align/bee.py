"""What the alignment recipes ask of a CPM-Bee model: its answers' per-token log-probabilities
as its training scores them (every answer token and ``</s>``), and sampled fillings of tasks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.bee import (BARRED, IGNORE, MODEL_INPUTS, Beam, Example, advanced, answer_texts, barred_columns,
                              batch_prompts, filled, pack, prompt_for)
from cpmlive.model.bee.decode import answer_step, read_prompts, task_segments
from cpmlive.model.stack import Transformer


def answer_tokens(model: Transformer, examples: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Of each filled CPM-Bee task, every answer token and ``</s>`` in order (as training scores
    them): ``log π(token)`` ``[B, T]`` (0 off the mask), the mask, and the hidden states
    ``[B, T, d]`` that predict them."""
    device = model.input_embedding.weight.device
    batch = pack(list(examples), max(map(len, examples)), model.config.vocab_size, device, in_order=True)
    hidden = model(**{name: batch[name] for name in MODEL_INPUTS})
    targets = batch["target"].long()
    chosen = targets != IGNORE
    counts = chosen.sum(1)
    width = targets.size(1)
    order = torch.arange(width, device=device).expand_as(targets).masked_fill(~chosen, width).sort(1).values
    index = order[:, :int(counts.max())].clamp(max=width - 1)
    mask = (torch.arange(index.size(1), device=device)[None, :] < counts[:, None]).float()
    gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))
    logits = model.logits(gathered, batch["ext_ids"], batch["ext_subs"]).float()
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets.gather(1, index).clamp(min=0)[..., None])[..., 0]
    return logprobs * mask, mask, gathered


def answer_scores(model: Transformer, examples: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Of each filled CPM-Bee task: its answers' summed log-probability, their token count, and
    the hidden state at the last of them (it reads the task and every answer token)."""
    logprobs, mask, hidden = answer_tokens(model, examples)
    counts = mask.sum(1)
    last = hidden[torch.arange(len(examples), device=hidden.device), counts.long() - 1]
    return logprobs.sum(1), counts, last


@torch.no_grad()
def sample_task_answers(model: Transformer, tokenizer: Any, tasks: Sequence[dict], max_new_tokens: int,
                        temperature: float = 1.0, generator: torch.Generator | None = None
                        ) -> list[tuple[dict, bool]]:
    """One sampled filling of each CPM-Bee task (pure sampling at ``temperature``, the policy's
    own distribution, as :func:`sample_completions` samples CPM-Ant's): the filled task (a leaf
    never reached is empty), and whether decoding reached the last answer's ``</s>`` within
    ``max_new_tokens`` steps."""
    device = model.input_embedding.weight.device
    prompts = [prompt_for(tokenizer, task) for task in tasks]
    batch = batch_prompts(prompts, tokenizer.vocab_size, device)
    cache = read_prompts(model, batch, len(prompts), batch.inputs["input_ids"].size(1) + max_new_tokens)
    barred = barred_columns(batch, 1, tokenizer.unk_id, tokenizer.vocab_size)
    beams = [Beam(0, [], tokenizer.bos_id, 0, p.answers[0][0], 0) for p in prompts]
    results: list[tuple[list, bool] | None] = [None] * len(prompts)
    segments = task_segments(prompts, device)
    for step in range(max_new_tokens):
        logits = answer_step(model, cache, batch, beams, segments).masked_fill_(barred, BARRED)
        chosen = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0].tolist()
        for row, (beam, column) in enumerate(zip(beams, chosen)):
            prompt = prompts[row]
            if results[row] is not None:
                continue
            final = column == tokenizer.eos_id and beam.answer + 1 == len(prompt.answers)
            if final or step == max_new_tokens - 1:
                results[row] = beam.tokens + [(column, prompt.answers[beam.answer][1])], final
            else:
                beams[row] = advanced(beam, column, prompt, batch, tokenizer.eos_id, tokenizer.bos_id,
                                      tokenizer.vocab_size)
        if all(result is not None for result in results):
            break
    out = []
    for prompt, (tokens, finished), table in zip(prompts, results, batch.row_tables):
        answers = answer_texts(tokens, table, tokenizer)
        out.append((filled(prompt, {number: answers.get(number, "") for number in range(1, len(prompt.paths) + 1)}),
                    finished))
    return out


__all__ = ["answer_scores", "answer_tokens", "sample_task_answers"]
