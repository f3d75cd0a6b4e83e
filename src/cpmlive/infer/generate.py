"""Decoding for CPM-Ant: greedy, sampling, beam search and blank infilling, all KV-cached.

Prompts are laid out as CPM-Live's generator does (spec section 5.1):
``[32 prompt ids of the task | left padding | <s> text]``; the prefill is bidirectional
(every prompt token is context) and each new token attends to the cache and itself.
Keyword names and processing order follow HF ``generate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Collection, Iterator

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from cpmlive.data.layout import GENERATION, INFILLING, TEXT_SEGMENT, PromptBatch, build_batch
from cpmlive.errors import CpmliveError
from cpmlive.infer.packing import packing_for
from cpmlive.model.stack import Transformer
from cpmlive.model.cache import KVCache, mask_inputs, token_positions
from cpmlive.utils import check_field_types

MAX_BEAMS = 64
MAX_DRAFT_TOKENS = 32  # drafted tokens one speculative step verifies (infer.speculative)
MAX_NGRAM = 16
SCHEDULES = ("heuristic", "constant")
# The ids that end a generation: one (a CPM model's end of text) or several (an HF model's
# generation_config lists each id that ends a turn, as Qwen's <|im_end|> and <|endoftext|>).
StopIds = int | Collection[int]


def stop_set(stop_ids: StopIds) -> frozenset[int]:
    """``stop_ids`` as a set (one id, or a collection of them)."""
    return frozenset((stop_ids,)) if isinstance(stop_ids, int) else frozenset(stop_ids)


def stop_ids_of(tokenizer: Any) -> frozenset[int]:
    """The ids that end a generation with ``tokenizer``: its ``stop_ids`` where it has them (an HF
    directory's tokenizer: the EOS and generation_config's ``eos_token_id`` list), else its EOS."""
    return frozenset(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    sequence_bias: dict[tuple[int, ...], float] | None = None
    logits_processor: Callable[[Tensor, list[list[int]]], Tensor] | None = None
    seed: int | None = None
    # Speculative decoding (infer.speculative), HF's names: an assistant model's drafts, or the prompt's.
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str = "heuristic"
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "generation")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (1 <= self.num_beams <= MAX_BEAMS, f"num_beams must be in [1, {MAX_BEAMS}]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (not (self.do_sample and self.num_beams > 1), "beam sampling is not supported: use do_sample or num_beams"),
            (all(isinstance(k, tuple) and k and all(isinstance(t, int) for t in k)
                 for k in (self.sequence_bias or {})), "sequence_bias keys must be non-empty tuples of token ids"),
            *_draft_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise CpmliveError(message)

    @property
    def speculates(self) -> bool:
        """Whether these options draft from the prompt (an assistant model is the caller's to give)."""
        return self.prompt_lookup_num_tokens is not None

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise CpmliveError(f"unknown generation option {unknown[0]!r}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def _draft_checks(config: GenerationConfig) -> list[tuple[bool, str]]:
    counts = {"num_assistant_tokens": config.num_assistant_tokens,
              "prompt_lookup_num_tokens": config.prompt_lookup_num_tokens}
    checks = [(value is None or 1 <= value <= MAX_DRAFT_TOKENS, f"{name} must be in [1, {MAX_DRAFT_TOKENS}]")
              for name, value in counts.items()]
    return checks + [
        (config.max_matching_ngram_size is None or 1 <= config.max_matching_ngram_size <= MAX_NGRAM,
         f"max_matching_ngram_size must be in [1, {MAX_NGRAM}]"),
        (config.num_assistant_tokens_schedule in SCHEDULES,
         f"num_assistant_tokens_schedule must be one of {', '.join(SCHEDULES)}"),
        (not (config.prompt_lookup_num_tokens and config.num_beams > 1),
         "speculative decoding works with greedy or sampled decoding, not beam search"),
    ]


# ---- a model directory's generation_config.json ------------------------------------------------------

GENERATION_CONFIG_FILE = "generation_config.json"
# Its fields that are decoding options of ours (HF's names are ours); the rest (eos_token_id, read by
# the tokenizer, max_length, ...) are not options here.
HF_GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                        "num_beams", "length_penalty", "repetition_penalty", "no_repeat_ngram_size")
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
HF_TOP_K = 50  # HF's top_k where a sampling generation config gives none


def hf_generation_defaults(directory: str | os.PathLike) -> dict[str, object]:
    """The decoding options ``directory``'s ``generation_config.json`` sets (none without one), as
    HF's ``generate`` takes them when its caller gives none: a config that samples without a
    ``top_k`` samples from the 50 likeliest tokens, as HF's does. Sampling fields of a config that
    does not sample are dropped where they are out of range (HF ignores them too); any other bad
    value is refused in one line naming the file."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid JSON generation config ({exc})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: a generation config must be a JSON object")
    floats = {f.name for f in fields(GenerationConfig) if f.type in ("float", float)}
    found = {key: float(data[key]) if key in floats and type(data[key]) is int else data[key]
             for key in HF_GENERATION_FIELDS if data.get(key) is not None}
    if found.get("do_sample") is True:
        found.setdefault("top_k", HF_TOP_K)
    for key in SAMPLING_FIELDS if found.get("do_sample") is not True else ():
        if key in found and _refusal({key: found[key]}) is not None:
            del found[key]
    reason = _refusal(found)
    if reason is not None:
        raise CpmliveError(f"{path}: {reason}")
    return found


def _refusal(options: dict[str, object]) -> str | None:
    try:
        GenerationConfig(**{"max_new_tokens": max(1, int(options.get("min_new_tokens") or 0)), **options})
    except (CpmliveError, TypeError, ValueError) as exc:
        return str(exc)
    return None


def with_defaults(given: dict[str, object], defaults: dict[str, object]) -> dict[str, object]:
    """The caller's options over a model's ``defaults``, less the defaults they contradict: beams
    asked for drop a sampling default, sampling asked for drops a beam default."""
    kept = dict(defaults)
    if (given.get("num_beams") or 1) > 1:
        kept.pop("do_sample", None)
    if given.get("do_sample"):
        kept.pop("num_beams", None)
    return {**kept, **given}


def step_inputs(tokens: Tensor, segment: int, context: bool = True, valid: Tensor | None = None,
                position: Tensor | None = None) -> dict[str, Tensor]:
    """The model inputs of one decoding step: one token a row, in ``segment`` (``context`` or not,
    rows where ``valid`` is false masked out, at ``position`` when given)."""
    batch = tokens.size(0)
    ones = torch.ones(batch, 1, dtype=torch.int32, device=tokens.device)
    inputs = {"input_ids": tokens.view(batch, 1), "segment": ones * segment,
              "context": ones.bool() if context else ~ones.bool(), "span": ones * 0,
              "valid": ones.bool() if valid is None else valid.view(batch, 1)}
    if position is not None:
        inputs["position"] = position.view(batch, 1).to(torch.int32)
    return inputs


# ---- prefill ------------------------------------------------------------------------------------

# What one more forward pass costs, in prompt positions: its products have fewer rows, and it
# copies its keys and values into the batch's cache.
GROUP_OVERHEAD_POSITIONS = 64


def prefill_groups(lengths: list[int], prompt_length: int, overhead: int) -> list[list[int]]:
    """Rows (indices into ``lengths``) cut into groups that are prefilled one after another.

    A left-padded batch computes ``rows x (prompt + longest row)`` positions. Sorted by length,
    the rows are cut where the padding saved outweighs ``overhead`` per extra pass (an exact
    dynamic programme over the cut points; one group when the lengths are close).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(sizes)
    cut = [0] * (len(sizes) + 1)
    for end in range(1, len(sizes) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * (prompt_length + sizes[end - 1]) + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(sizes)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def prefill(model: Transformer, batch: PromptBatch, cache: KVCache, lengths: list[int]) -> Tensor:
    """Run left-padded prompts into ``cache``; return each row's last hidden state ``[B, d]``.

    Rows of very different lengths are prefilled in groups (:func:`prefill_groups`), each
    unpadded down to its own longest row, at the positions the padded layout gives them; their
    keys and values are copied into ``cache``. A pad column is never visible, so the outcome is
    the padded forward's, without computing the pads.
    """
    prompt = model.config.prompt_length
    groups = prefill_groups(lengths, prompt, GROUP_OVERHEAD_POSITIONS)
    if len(groups) == 1:
        return model(**batch.as_inputs(), cache=cache, last=1)[:, -1]
    total = batch.input_ids.size(1)
    position = token_positions(batch.input_ids)
    cache.append_inputs(mask_inputs(batch.context, batch.span, batch.segment, batch.valid, position))
    outputs = []
    for group in groups:
        width = max(lengths[i] for i in group)
        columns = torch.cat([torch.arange(prompt), torch.arange(total - width, total)]).to(position.device)
        rows = torch.tensor(group, device=position.device)
        inputs = {name: value[rows][:, columns] for name, value in batch.as_inputs().items()}
        part = model.new_cache(len(group), columns.numel())
        outputs.append(model(**inputs, position=position[rows][:, columns], cache=part, last=1)[:, -1])
        cache.adopt(rows, columns, part)
    cache.length = total
    grouped = torch.cat(outputs)
    hidden = torch.empty_like(grouped)
    hidden[torch.tensor([row for group in groups for row in group], device=grouped.device)] = grouped
    return hidden


# ---- logits processing (HF order) --------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def apply_sequence_bias(logits: Tensor, histories: list[list[int]],
                        bias: dict[tuple[int, ...], float]) -> Tensor:
    """HF's ``sequence_bias``: add ``bias[seq]`` to the logit of ``seq[-1]`` wherever the
    tokens so far end with ``seq[:-1]`` (always, for a one-token sequence)."""
    singles = {seq[0]: value for seq, value in bias.items() if len(seq) == 1}
    if singles:
        ids = torch.tensor(list(singles), device=logits.device)
        logits[:, ids] += torch.tensor(list(singles.values()), device=logits.device, dtype=logits.dtype)
    for seq, value in bias.items():
        if len(seq) > 1:
            for row, history in enumerate(histories):
                if tuple(history[len(history) - len(seq) + 1:]) == seq[:-1]:
                    logits[row, seq[-1]] += value
    return logits


def banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    if n <= 0 or len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:])
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


def process_logits(logits: Tensor, histories: list[list[int]], step: int, config: GenerationConfig,
                   stop_ids: StopIds) -> Tensor:
    """The logits after HF's processors, in HF's order; below ``min_new_tokens`` no stop id can be chosen."""
    logits = logits.float()
    if config.repetition_penalty != 1.0:
        width = max(len(h) for h in histories)
        history = torch.tensor([h + h[:1] * (width - len(h)) for h in histories], device=logits.device)
        logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
    if config.sequence_bias:
        logits = apply_sequence_bias(logits, histories, config.sequence_bias)
    if config.no_repeat_ngram_size:
        for row, history in enumerate(histories):
            banned = banned_ngram_tokens(history, config.no_repeat_ngram_size)
            if banned:
                logits[row, list(banned)] = float("-inf")
    if step < config.min_new_tokens:
        logits[:, sorted(stop_set(stop_ids))] = float("-inf")
    if config.logits_processor is not None:  # a caller's own rule, last (as HF's logits_processor)
        logits = config.logits_processor(logits, histories)
    return logits


def sampling_filter(logits: Tensor, config: GenerationConfig) -> Tensor:
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - config.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def choose_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    if not config.do_sample:
        return logits.argmax(-1)
    return sample(sampling_filter(logits, config).softmax(-1), generator)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row drawn from ``probs`` by inverting its cumulative sum at a uniform draw:
    an exact categorical sample, ~15x faster than ``torch.multinomial`` over a 30k vocabulary
    (which draws an exponential per token). A token of probability 0 is never chosen: its
    cumulative value equals its predecessor's, and the search takes the first one above the draw."""
    cumulative = probs.float().cumsum(-1)
    draw = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draw, right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


def _generator(config: GenerationConfig) -> torch.Generator | None:
    return torch.Generator().manual_seed(config.seed) if config.seed is not None else None


# ---- greedy / sampling --------------------------------------------------------------------------

def decode_steps(model: Transformer, rows: list[list[int]], config: GenerationConfig,
                 stop_ids: StopIds, prompt_task: int | None = None) -> Iterator[list[int | None]]:
    """Greedy or sampled decoding, one yield per step: the new token of each row, or
    ``None`` for rows already finished (a row finishes at any of ``stop_ids``). ``rows``
    already start with ``<s>`` (where the model's tokenizer has one)."""
    with packing_for(model, len(rows), config.max_new_tokens):
        yield from _decode_steps(model, rows, config, stop_set(stop_ids), prompt_task)


@torch.inference_mode()
def _decode_steps(model: Transformer, rows: list[list[int]], config: GenerationConfig,
                  stop_ids: frozenset[int], prompt_task: int | None) -> Iterator[list[int | None]]:
    batch = build_batch(rows, GENERATION, model.config.prompt_length, model.input_embedding.weight.device,
                        prompt_task=prompt_task)
    cache = model.new_cache(len(rows), batch.input_ids.size(1) + config.max_new_tokens)
    hidden = prefill(model, batch, cache, [len(r) for r in rows])
    generator = _generator(config)
    histories = [list(r) for r in rows]
    finished = [False] * len(rows)
    for step in range(config.max_new_tokens):
        logits = process_logits(model.logits(hidden), histories, step, config, stop_ids)
        tokens = choose_tokens(logits, config, generator)
        emitted: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            finished[row] = finished[row] or token in stop_ids
            emitted.append(None if finished[row] else token)
            if not finished[row]:
                histories[row].append(token)
        yield emitted
        if all(finished) or step == config.max_new_tokens - 1:
            return
        hidden = model(**step_inputs(tokens[:, None], TEXT_SEGMENT[GENERATION]), cache=cache)[:, -1]


def generate_ids(model: Transformer, rows: list[list[int]], config: GenerationConfig, stop_ids: StopIds,
                 prompt_task: int | None = None) -> list[list[int]]:
    """New token ids per row (the stop id that ended a row not included)."""
    if config.num_beams > 1:
        with packing_for(model, config.num_beams, config.max_new_tokens):  # packed once for all the rows
            return [beam_search(model, row, config, stop_ids, prompt_task)[0][1] for row in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    for emitted in decode_steps(model, rows, config, stop_ids, prompt_task):
        for row, token in enumerate(emitted):
            if token is not None:
                outputs[row].append(token)
    return outputs


# ---- beam search --------------------------------------------------------------------------------


class Hypotheses:
    """The ``num_beams`` best finished hypotheses of one prompt."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def score(self, logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** self.length_penalty

    def add(self, tokens: list[int], logprob: float, stopped: bool = False) -> None:
        """Keep ``tokens`` if among the best; one ``stopped`` by a stop id (which ``tokens`` leave
        out) counts that token in its length, as HF's beam search does."""
        self.items.append((self.score(logprob, len(tokens) + stopped), tokens))
        self.items.sort(key=lambda item: item[0], reverse=True)
        del self.items[self.num_beams:]

    def is_done(self, best_live_logprob: float, length: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        return self.items[-1][0] >= self.score(best_live_logprob, length)



def beam_search(model: Transformer, row: list[int], config: GenerationConfig, stop_ids: StopIds,
                prompt_task: int | None = None) -> list[tuple[float, list[int]]]:
    """The ``num_beams`` finished hypotheses, best first, as (length-penalised score, ids); a
    hypothesis finishes at any of ``stop_ids``."""
    with packing_for(model, config.num_beams, config.max_new_tokens):
        return _beam_search(model, row, config, stop_set(stop_ids), prompt_task)


@torch.inference_mode()
def _beam_search(model: Transformer, row: list[int], config: GenerationConfig, stop_ids: frozenset[int],
                 prompt_task: int | None) -> list[tuple[float, list[int]]]:
    beams = config.num_beams
    batch = build_batch([row], GENERATION, model.config.prompt_length, model.input_embedding.weight.device,
                        prompt_task=prompt_task)
    cache = model.new_cache(1, batch.input_ids.size(1) + config.max_new_tokens)
    hidden = model(**batch.as_inputs(), cache=cache, last=1)[:, -1]
    cache.reorder(torch.zeros(beams, dtype=torch.long, device=hidden.device))
    hidden = hidden.expand(beams, -1)
    scores = torch.full((beams,), -1e9, device=hidden.device)
    scores[0] = 0.0
    sequences: list[list[int]] = [[] for _ in range(beams)]
    hypotheses = Hypotheses(beams, config.length_penalty)
    for step in range(config.max_new_tokens):
        histories = [row + seq for seq in sequences]
        logprobs = process_logits(model.logits(hidden), histories, step, config, stop_ids).log_softmax(-1)
        candidates = (logprobs + scores[:, None]).view(-1)
        top_scores, top_index = candidates.topk(2 * beams)
        vocab = logprobs.size(-1)
        chosen: list[tuple[float, int, int]] = []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            origin, token = divmod(index, vocab)
            if token in stop_ids:
                if rank < beams:
                    hypotheses.add(sequences[origin], score, stopped=True)
                continue
            chosen.append((score, token, origin))
            if len(chosen) == beams:
                break
        if hypotheses.is_done(chosen[0][0], step + 1) or step == config.max_new_tokens - 1:
            for score, token, origin in chosen:
                hypotheses.add(sequences[origin] + [token], score)
            break
        origins = torch.tensor([c[2] for c in chosen], device=hidden.device)
        tokens = torch.tensor([c[1] for c in chosen], device=hidden.device)
        scores = torch.tensor([c[0] for c in chosen], device=hidden.device)
        sequences = [sequences[c[2]] + [c[1]] for c in chosen]
        cache.reorder(origins)
        hidden = model(**step_inputs(tokens[:, None], TEXT_SEGMENT[GENERATION]), cache=cache)[:, -1]
    return hypotheses.items


# ---- blank infilling -------------------------------------------------------------------------------


@dataclass
class FillLayout:
    """One candidate: the text with every blank given ``blank_length`` non-context slots."""

    tokens: list[int]
    context: list[bool]
    slots: list[int]


def fill_layout(pieces: list[list[int]], blank_length: int, bos_id: int, eos_id: int) -> FillLayout:
    """``pieces`` are the token ids between blanks: ``len(pieces) == blanks + 1``."""
    tokens, context, slots = [bos_id], [True], []
    for i, piece in enumerate(pieces):
        tokens += piece
        context += [True] * len(piece)
        if i < len(pieces) - 1:
            slots += range(len(tokens), len(tokens) + blank_length)
            tokens += [0] * blank_length
            context += [False] * blank_length
    tokens.append(eos_id)
    context.append(True)
    return FillLayout(tokens, context, slots)


@torch.inference_mode()
def fill_blanks(model: Transformer, pieces: list[list[int]], blank_lengths: list[int], config: GenerationConfig,
                bos_id: int, eos_id: int) -> list[tuple[list[list[int]], float]]:
    """Fill every blank, once per candidate length; returns per candidate the fills and the
    mean log-likelihood of the completed text under the generation objective (for ranking).

    As in pretraining (spec section 4.2), blanks are non-context tokens decoded left to right:
    each sees all the context on both sides and the blank tokens before it. The context is
    prefilled once; blank tokens are then fed with their own positions.
    """
    layouts = [fill_layout(pieces, n, bos_id, eos_id) for n in blank_lengths]
    prompt = model.config.prompt_length
    device = model.input_embedding.weight.device
    batch = build_batch([lay.tokens for lay in layouts], INFILLING, prompt, device,
                        [lay.context for lay in layouts])
    total = batch.input_ids.size(1)
    offsets = [total - len(lay.tokens) for lay in layouts]
    # Blanks are invisible to the context, so the prefill is the context alone.
    batch.valid &= batch.context
    longest = max(len(lay.slots) for lay in layouts)
    cache = model.new_cache(len(layouts), total + longest)
    prefill = model(**batch.as_inputs(), cache=cache)
    generator = _generator(config)
    fills: list[list[int]] = [[] for _ in layouts]
    previous_hidden = None
    for step in range(longest):
        hidden = []
        for row, lay in enumerate(layouts):
            if step >= len(lay.slots):
                hidden.append(prefill[row, -1])
                continue
            slot = lay.slots[step]
            follows_previous = step > 0 and lay.slots[step - 1] == slot - 1
            hidden.append(previous_hidden[row] if follows_previous else prefill[row, offsets[row] + slot - 1])
        histories = [lay.tokens[:1] + fill for lay, fill in zip(layouts, fills)]
        logits = process_logits(model.logits(torch.stack(hidden)), histories, step, config, eos_id)
        logits[:, eos_id] = float("-inf")
        tokens = choose_tokens(logits, config, generator)
        active = torch.tensor([step < len(lay.slots) for lay in layouts], device=device)
        positions = torch.tensor([prompt + offsets[r] + (lay.slots[step] if step < len(lay.slots) else 0)
                                  for r, lay in enumerate(layouts)], device=device)
        for row, token in enumerate(tokens.tolist()):
            if step < len(layouts[row].slots):
                fills[row].append(token)
        inputs = step_inputs(tokens[:, None], TEXT_SEGMENT[INFILLING], context=False, valid=active,
                             position=positions)
        previous_hidden = model(**inputs, cache=cache)[:, -1]
    results = []
    for row, lay in enumerate(layouts):
        per_blank = len(lay.slots) // max(len(pieces) - 1, 1)
        blanks = [fills[row][i * per_blank:(i + 1) * per_blank] for i in range(len(pieces) - 1)]
        results.append(blanks)
    scores = completion_scores(model, pieces, results, bos_id, eos_id)
    return list(zip(results, scores))


@torch.inference_mode()
def completion_scores(model: Transformer, pieces: list[list[int]], fills: list[list[list[int]]], bos_id: int,
                      eos_id: int) -> list[float]:
    """Mean per-token log-likelihood of each completed text, read left to right."""
    rows = []
    for blanks in fills:
        tokens = [bos_id]
        for i, piece in enumerate(pieces):
            tokens += piece + (blanks[i] if i < len(blanks) else [])
        rows.append(tokens + [eos_id])
    lengths = [len(r) for r in rows]
    prompt = model.config.prompt_length
    context_rows = [[True] + [False] * (n - 1) for n in lengths]
    batch = build_batch(rows, GENERATION, prompt, model.input_embedding.weight.device, context_rows)
    logprobs = model.logits(model(**batch.as_inputs())).float().log_softmax(-1)
    total = batch.input_ids.size(1)
    scores = []
    for row, n in enumerate(lengths):
        start = total - n
        targets = batch.input_ids[row, start + 1:]
        picked = logprobs[row, start:total - 1].gather(1, targets[:, None])
        scores.append(picked.mean().item())
    return scores


__all__ = [
    "GenerationConfig", "PromptBatch", "GENERATION", "INFILLING", "KVCache", "beam_search", "build_batch",
    "decode_steps", "fill_blanks", "generate_ids", "prefill", "prefill_groups", "process_logits", "sampling_filter",
    "hf_generation_defaults", "step_inputs", "stop_ids_of", "stop_set", "with_defaults",
]
