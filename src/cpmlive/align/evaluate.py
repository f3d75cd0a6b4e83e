"""Pair accuracy: how often a model prefers the chosen answer of a preference pair.

A language model prefers the answer with the larger total log-probability given the prompt;
a reward model (an adapter directory with ``reward_head.safetensors``) the one it scores
higher. The margin is the difference (log-probability in nats, or score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cpmlive.align.policy import Pair, ScalarHead, completion_logprobs, sequence_scores
from cpmlive.align.recipes import REWARD_HEAD, load_head
from cpmlive.data.align import preference_pairs, prompt_ids, text_ids
from cpmlive.data.chat import ChatTemplate
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Transformer


def reward_head_of(adapter: str | Path | None, model: Transformer) -> ScalarHead | None:
    """The reward head saved with ``adapter``, or None for a plain (policy) adapter."""
    if adapter is None or not (Path(adapter) / REWARD_HEAD).is_file():
        return None
    head = ScalarHead(model.config.dim_model)
    load_head(head, Path(adapter) / REWARD_HEAD)
    return head


def encode_pairs(tokenizer: Any, model: Transformer, path: str,
                 template: ChatTemplate) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids; a pair that does not fit the model is refused, naming its line."""
    limit = model.config.max_length - model.config.prompt_length - 1
    out = []
    for pair in preference_pairs(path, template):
        prompt = prompt_ids(tokenizer, pair.prompt)
        answers = [text_ids(tokenizer, text) + [tokenizer.eos_id]
                   for text in (pair.chosen, pair.rejected)]
        longest = len(prompt) + max(map(len, answers)) + 1
        if longest > limit:
            raise CpmliveError(f"{pair.where}: the prompt and its longer answer are {longest} tokens; "
                               f"the model takes {limit}")
        out.append((prompt, *answers))
    return out


@torch.no_grad()
def pair_metrics(model: Transformer, tokenizer: Any, path: str, template: ChatTemplate | None = None,
                 reward_head: ScalarHead | None = None, batch_size: int = 8) -> dict[str, float | int]:
    """``{"pair_accuracy", "mean_margin", "pairs"}`` over the pairs of a preference JSONL file."""
    items = encode_pairs(tokenizer, model, path, template or ChatTemplate())
    was_training = model.training
    model.eval()
    margins: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            rows: list[Pair] = [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk]
            if reward_head is not None:
                scores = sequence_scores(model, reward_head, rows)
            else:
                scores = completion_logprobs(model, rows)[0].sum(1)
            chosen, rejected = scores.chunk(2)
            margins += (chosen - rejected).tolist()
    finally:
        model.train(was_training)
    return {"pair_accuracy": sum(m > 0 for m in margins) / len(margins), "mean_margin": sum(margins) / len(margins),
            "pairs": len(margins)}


__all__ = ["encode_pairs", "pair_metrics", "reward_head_of"]
