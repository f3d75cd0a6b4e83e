"""Speculative decoding: tokens drafted cheaply, verified by the model in one forward.

Decoding one token at batch 1 reads every weight once; the same read can score several tokens.
A step feeds a row's pending token and ``k`` drafted ones (columns ``L .. L + k`` of its KV row),
and keeps the longest run of drafts the model agrees with, plus the model's own next token. Two
drafters, with HF's option names:

- **prompt lookup** (``prompt_lookup_num_tokens``): the tokens that followed the latest earlier
  occurrence of the last ``max_matching_ngram_size`` (down to 1) tokens of the text so far, prompt
  included: a title quoting its article, an answer copying a passage;
- **an assistant model** (``assistant_model``): a smaller model with the same vocabulary (a
  pruned, distilled or quantized twin) decodes ``num_assistant_tokens`` ahead; with the
  ``heuristic`` schedule (HF's) ``k`` grows by 2 after a step that took every draft and shrinks by 1
  after one that did not.

Greedy rows keep a draft while it is the model's argmax, so their output is plain decoding's,
token for token. Sampled rows keep the target distribution exactly by rejection sampling
(Leviathan et al. 2023, Chen et al. 2023): draft ``d`` drawn from ``q`` is kept with probability
``min(1, p(d) / q(d))``; the first rejected one is replaced by a draw from ``max(p - q, 0)``
normalised; when every draft is kept one more token is drawn from ``p``. A prompt-lookup draft is
a point mass (``q(d) = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor

from cpmlive.data.layout import GENERATION, TEXT_SEGMENT, build_batch
from cpmlive.errors import CpmliveError
from cpmlive.infer.generate import MAX_DRAFT_TOKENS, GenerationConfig, process_logits, sample, sampling_filter
from cpmlive.model.cache import KVCache

DEFAULT_ASSISTANT_TOKENS = 4  # where an assistant's k starts when the request names none
DEFAULT_NGRAM = 2  # HF's max_matching_ngram_size default
LOOKUP_WINDOW = 4096  # prompt lookup searches the last this many tokens (a step's cost stays bounded)


# ---- prompt lookup --------------------------------------------------------------------------------


def lookup_draft(history: list[int], count: int, max_ngram: int = DEFAULT_NGRAM) -> list[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the last ``n``
    tokens of ``history``, for ``n`` from ``max_ngram`` down to 1 (none: no match)."""
    lowest = max(0, len(history) - LOOKUP_WINDOW)
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, lowest - 1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + count]
    return []


# ---- an assistant model ---------------------------------------------------------------------------


def check_same_vocabulary(target: Any, draft: Any, target_model: Any, draft_model: Any) -> None:
    """Refuse a draft whose tokens are not the target's, id for id, in one line."""
    if draft.vocab_size != target.vocab_size or draft_model.config.vocab_size < target.vocab_size:
        raise CpmliveError(f"the assistant model's vocabulary has {draft.vocab_size} tokens, the model's "
                           f"{target.vocab_size}: a draft must share the model's vocabulary")
    for index in range(target.vocab_size):
        if draft.id_to_token(index) != target.id_to_token(index):
            raise CpmliveError(f"the assistant model's token {index} is {draft.id_to_token(index)!r}, the model's "
                               f"{target.id_to_token(index)!r}: a draft must share the model's vocabulary")


@dataclass
class DraftState:
    """One sequence's state in the assistant: its KV cache and the tokens it holds."""

    cache: KVCache
    offset: int  # cache positions before the text (CPM-Ant's prompt ids)
    prompt: list[int]  # the request's prompt: context (CPM-Ant reads it both ways), the rest is generated
    tokens: list[int] = field(default_factory=list)  # the text whose keys and values the cache holds


class Assistant:
    """A draft model (any causal family) with the target's vocabulary (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "") -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.device = model.input_embedding.weight.device

    def check(self, tokenizer: Any, model: Any) -> None:
        check_same_vocabulary(tokenizer, self.tokenizer, model, self.model)

    def start(self, ids: list[int], limit: int) -> DraftState:
        """A state for a sequence whose text will be at most ``limit`` tokens long."""
        prompt = self.model.config.prompt_length
        capacity = min(prompt + limit, self.model.config.max_length)
        return DraftState(self.model.new_cache(1, capacity), prompt, list(ids))

    @torch.inference_mode()
    def draft(self, state: DraftState, history: list[int], count: int, options: GenerationConfig,
              generator: torch.Generator | None, stop_ids: frozenset[int],
              rows: int) -> tuple[list[int], Tensor | None]:
        """Up to ``count`` tokens after ``history`` (greedy, or sampled with ``options``), and for
        sampled rows each draft's distribution ``[count, rows]`` (``None`` when greedy): ``rows``
        is the target's vocabulary rows, which a draft's logits are cut or padded to (Qwen's sizes
        pad their embeddings differently over one tokenizer)."""
        count = min(count, state.cache.capacity - state.offset - len(history))
        if count < 1:
            return [], None
        kept = min(_common_prefix(state.tokens, history), len(history) - 1)  # the last token is fed again
        if kept < len(state.prompt):
            hidden = self._prefill(state)
            kept = len(state.prompt)
        if kept < len(history):
            state.cache.length = state.offset + kept
            del state.tokens[kept:]
            hidden = self._feed(state, history[kept:])
        drafts, probs = [], []
        text = list(history)
        for step in range(count):
            logits = process_logits(_fitted(self.model.logits(hidden), rows)[None], [text], 0, _drafting(options),
                                    stop_ids)
            if options.do_sample:
                distribution = sampling_filter(logits, options).softmax(-1)
                token = int(sample(distribution, generator))
                probs.append(distribution[0])
            else:
                token = int(logits.argmax(-1))
            drafts.append(token)
            text.append(token)
            if token in stop_ids or step == count - 1:
                break
            hidden = self._feed(state, [token])
        return drafts, torch.stack(probs) if probs else None

    def _prefill(self, state: DraftState) -> Tensor:
        state.cache.length = 0
        batch = build_batch([state.prompt], GENERATION, self.model.config.prompt_length, self.device)
        hidden = self.model(**batch.as_inputs(), cache=state.cache, last=1)[0, -1]
        state.tokens = list(state.prompt)
        return hidden

    def _feed(self, state: DraftState, tokens: list[int]) -> Tensor:
        ids = torch.tensor([tokens], device=self.device)
        hidden = self.model(**text_inputs(ids), cache=state.cache)[0, -1]
        state.tokens += tokens
        return hidden


def _fitted(logits: Tensor, rows: int) -> Tensor:
    """``logits`` over exactly ``rows`` columns: cut, or padded with -inf (never drafted)."""
    if logits.size(-1) >= rows:
        return logits[..., :rows]
    pad = logits.new_full((*logits.shape[:-1], rows - logits.size(-1)), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def _drafting(options: GenerationConfig) -> GenerationConfig:
    """The options a draft is chosen under: the request's, less ``min_new_tokens`` (the step
    index it counts from is the target's; a draft of a stop token is simply not kept)."""
    return options if options.min_new_tokens == 0 else replace(options, min_new_tokens=0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def text_inputs(ids: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Model inputs for new generated tokens ``[B, n]`` after a cache: non-context, so that each
    sees the prompt and the tokens up to itself (CPM-Ant's generated span is causal; the
    left-to-right families ignore ``context``)."""
    ones = torch.ones_like(ids, dtype=torch.int32)
    return {"input_ids": ids, "segment": ones * TEXT_SEGMENT[GENERATION], "context": ~ones.bool(),
            "span": ones * 0, "valid": ones.bool() if valid is None else valid}


# ---- verification ----------------------------------------------------------------------------------


Processed = Callable[[int], Tensor]  # position j -> the model's processed logits there ``[1, vocab]``


def verify_greedy(processed: Processed, drafts: list[int]) -> list[int]:
    """The kept drafts and the model's next token: drafts are kept while each is the argmax."""
    kept: list[int] = []
    for position in range(len(drafts) + 1):
        token = int(processed(position).argmax(-1))
        kept.append(token)
        if position == len(drafts) or token != drafts[position]:
            break
    return kept


def verify_sampled(probabilities: Callable[[int], Tensor], drafts: list[int], draft_probs: Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """The kept drafts and one more token, by rejection sampling (see the module docstring):
    ``probabilities(j)`` is the target's distribution ``[vocab]`` at position ``j``;
    ``draft_probs[j]`` the draft's (``None``: every draft a point mass)."""
    kept: list[int] = []
    for position, token in enumerate(drafts):
        target = probabilities(position)
        proposal = float(draft_probs[position, token]) if draft_probs is not None else 1.0
        draw = float(torch.rand(1, generator=generator))
        if proposal > 0 and draw * proposal < float(target[token]):
            kept.append(token)
            continue
        if draft_probs is not None:
            residual = (target - draft_probs[position]).clamp_(min=0)
        else:
            residual = target.clone()
            residual[token] = 0
        if float(residual.sum()) <= 0:  # p == q up to rounding: p itself
            residual = target
        kept.append(int(sample(residual[None], generator)))
        return kept
    kept.append(int(sample(probabilities(len(drafts))[None], generator)))
    return kept


def next_count(count: int, drafted: int, kept: int, schedule: str) -> int:
    """The assistant's next ``k`` (HF's heuristic schedule: +2 after every draft was kept, else -1)."""
    if schedule != "heuristic" or drafted == 0:
        return count
    return min(count + 2, MAX_DRAFT_TOKENS) if kept == drafted else max(1, count - 1)


__all__ = ["Assistant", "DEFAULT_ASSISTANT_TOKENS", "DEFAULT_NGRAM", "DraftState", "MAX_DRAFT_TOKENS",
           "check_same_vocabulary", "lookup_draft", "next_count", "text_inputs", "verify_greedy", "verify_sampled"]
