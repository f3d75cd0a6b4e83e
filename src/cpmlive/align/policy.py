"""What the alignment recipes ask of a model: per-token log-probabilities of a completion given
its prompt, the hidden state a scalar head reads, and sampled rollouts.

A (prompt, completion) pair is laid out as fine-tuning lays it out (``tune.task``): the prompt
is bidirectional context and the completion is predicted left to right, so log-probabilities
here are exactly what ``generate`` samples from after prefilling the same prompt. A CPM-Bee pair
is a filled task (a :class:`~cpmlive.data.bee.Example`, its answers the completion), scored as
its training reads it (:mod:`cpmlive.align.bee`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.align.bee import answer_scores, answer_tokens
from cpmlive.data.bee import Example
from cpmlive.data.layout import GENERATION, TEXT_SEGMENT, build_batch
from cpmlive.model.stack import Transformer
from cpmlive.tune import delta as deltas
from cpmlive.tune.task import example_batch

Pair = tuple[list[int], list[int]]  # (<s> + prompt ids, completion ids + </s>)


@contextlib.contextmanager
def reference_of(model: nn.Module, adapter: str | None = None) -> Iterator[None]:
    """Run the frozen reference inside the block, under no_grad: the same weights with the
    trained adapter switched off (the base, or the frozen ``adapter`` a run started from), so
    no second copy of the model exists."""
    with torch.no_grad(), deltas.active_adapter(model, adapter):
        yield


def completion_hidden(model: Transformer, pairs: Sequence[Pair],
                      prompt_task: int = GENERATION) -> tuple[Tensor, Tensor]:
    """Hidden states ``[B, T, d]`` at the positions that predict each completion token (the
    first one reads the prompt's last token), and the mask ``[B, T]`` of real ones."""
    batch = example_batch(pairs, prompt_task, model.config)
    hidden = model(batch.input_ids, batch.segment, batch.context, batch.span, batch.valid)
    width = max(len(t) for _, t in pairs)
    index = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros(len(pairs), width)
    for row, (inputs, targets) in enumerate(pairs):
        first = model.config.prompt_length + len(inputs) - 1
        index[row, :len(targets)] = torch.arange(first, first + len(targets))
        mask[row, :len(targets)] = 1
    gathered = hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.size(-1)))
    return gathered, mask.to(hidden.device)


def target_ids(pairs: Sequence[Pair], device: torch.device | str = "cpu") -> Tensor:
    width = max(len(t) for _, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (_, targets) in enumerate(pairs):
        ids[row, :len(targets)] = torch.tensor(targets)
    return ids.to(device)


def token_logprobs(model: Transformer, hidden: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """``log π(token)`` at every position ``[B, T]`` (0 off the mask), in float32."""
    logprobs = F.log_softmax(model.logits(hidden).float(), dim=-1)
    return logprobs.gather(-1, ids[..., None])[..., 0] * mask


def completion_logprobs(model: Transformer, pairs: Sequence[Pair],
                        prompt_task: int = GENERATION) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities ``[B, T]`` of each completion and their mask."""
    if is_task_pair(pairs):
        logprobs, mask, _ = answer_tokens(model, [example for _, example in pairs])
        return logprobs, mask
    hidden, mask = completion_hidden(model, pairs, prompt_task)
    return token_logprobs(model, hidden, target_ids(pairs, hidden.device), mask), mask


def last_hidden(hidden: Tensor, mask: Tensor) -> Tensor:
    """Each row's hidden state at its last completion position: the one that reads the whole
    completion up to ``</s>``'s input (a reward model scores the answer there)."""
    last = mask.sum(1).long() - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class ScalarHead(nn.Module):
    """A linear map from the hidden state to one number (a reward, or a value)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        nn.init.normal_(self.score.weight, std=1 / (dim + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.score(hidden.float())[..., 0]


def is_task_pair(pairs: Sequence) -> bool:
    """Whether ``pairs`` are CPM-Bee's ``(key, filled task)`` pairs rather than token ids."""
    return bool(pairs) and isinstance(pairs[0][1], Example)


def sequence_scores(model: Transformer, head: ScalarHead, pairs: Sequence[Pair],
                    prompt_task: int = GENERATION) -> Tensor:
    """A reward model's score of each (prompt, completion): the head on the hidden state at the
    completion's last token (``</s>``), which sees the prompt and the whole answer."""
    if is_task_pair(pairs):
        return head(answer_scores(model, [example for _, example in pairs])[2])
    pairs = [(inputs, targets + [targets[-1]]) for inputs, targets in pairs]  # a position after </s>
    hidden, mask = completion_hidden(model, pairs, prompt_task)
    return head(last_hidden(hidden, mask))


@torch.no_grad()
def sample_completions(model: Transformer, prompts: Sequence[list[int]], max_new_tokens: int, eos_id: int,
                       temperature: float = 1.0, generator: torch.Generator | None = None,
                       prompt_task: int = GENERATION) -> list[list[int]]:
    """One sampled completion per prompt (pure sampling at ``temperature``, as the policy's
    distribution is what PPO needs), each ending with ``</s>`` unless it ran out of tokens."""
    device = model.input_embedding.weight.device
    batch = build_batch(list(prompts), GENERATION, model.config.prompt_length, device, prompt_task=prompt_task)
    cache = model.new_cache(len(prompts), batch.input_ids.size(1) + max_new_tokens)
    hidden = model(**batch.as_inputs(), cache=cache, last=1)[:, -1]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    ones = torch.ones(len(prompts), 1, dtype=torch.int32, device=device)
    for _ in range(max_new_tokens):
        probs = F.softmax(model.logits(hidden).float() / temperature, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator)
        for row, token in enumerate(tokens[:, 0].tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token == eos_id
        if all(done):
            break
        hidden = model(tokens, ones * TEXT_SEGMENT[GENERATION], ~ones.bool(), ones * 0, ones.bool(), cache=cache)[:, -1]
    return outputs


__all__ = ["Pair", "ScalarHead", "completion_hidden", "completion_logprobs", "is_task_pair", "last_hidden",
           "reference_of", "sample_completions", "sequence_scores", "target_ids", "token_logprobs"]
