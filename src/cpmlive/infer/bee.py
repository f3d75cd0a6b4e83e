"""Filling CPM-Bee's ``<ans>`` fields: beam search as the original ``CPMBeeBeamSearch`` (greedy is
one beam, as there), and sampling.

Every answer leaf is decoded in turn: decoding starts with ``<s>`` at position 0 in that leaf's
segment, and ``</s>`` moves to the next leaf. Each step the ``<unk>`` column is barred unless
the task itself holds an unknown piece, and so are the extra columns of other tasks in the
batch; a chosen extra column is fed back as its (base id, sub) pair. ``max_new_tokens`` counts
every decoding step of a task, the ``</s>`` between answers included; the last step's token is
kept whatever it is (the original's ``max_length=L`` is ``max_new_tokens=L + 2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError
from cpmlive.data.bee import (BARRED, Beam, Prompt, PromptBatch, advanced, answer_texts, barred_columns,
                              batch_prompts, filled, prompt_for)
from cpmlive.infer.generate import GenerationConfig, apply_repetition_penalty, sample, sampling_filter
from cpmlive.model.bee.decode import answer_step, read_prompts, step_hidden, task_segments
from cpmlive.model.bee.model import BeeCache, CpmBee
from cpmlive.model.cache import KVCache
from cpmlive.tokenizer.bee import BeeTokenizer



class Hypotheses:
    """The original's ``BeamHypotheses``: the ``size`` best finished hypotheses, scored by
    log-probability over length ** ``length_penalty``; done once no live one can beat the
    worst (its length test uses the step number, as the original does)."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, list[tuple[int, int]]]] = []
        self.worst = 1e9

    def add(self, tokens: list[tuple[int, int]], logprob: float) -> None:
        score = logprob / len(tokens) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_logprob: float, step: int) -> bool:
        if len(self.items) < self.size:
            return False
        return step > 0 and self.worst >= best_logprob / step ** self.length_penalty

    def best(self) -> list[tuple[int, int]]:
        return max(self.items, key=lambda item: item[0])[1]


@torch.inference_mode()
def beam_search(model: CpmBee, tokenizer: BeeTokenizer, prompts: list[Prompt], config: GenerationConfig,
                batch: PromptBatch) -> list[list[tuple[int, int]]]:
    """Each task's best hypothesis as ``(output column, answer number)`` pairs (``batch``: the
    prompts' :func:`~cpmlive.data.bee.batch_prompts` on the model's device)."""
    width, vocab = config.num_beams, tokenizer.vocab_size
    device = model.input_embedding.weight.device
    tasks, rows = len(prompts), len(prompts) * width
    cache = read_prompts(model, batch, rows, batch.inputs["input_ids"].size(1) + config.max_new_tokens)
    num_segments = task_segments(prompts, device).repeat_interleave(width, dim=0)
    states = [[Beam(0, [], tokenizer.bos_id, 0, p.answers[0][0], 0) for _ in range(width)] for p in prompts]
    scores = torch.full((tasks, width), -1e9, device=device)
    scores[:, 0] = 0
    scores = scores.view(-1)
    found = [Hypotheses(width, config.length_penalty) for _ in prompts]
    done = [False] * tasks
    fed: list[list[int]] = [[] for _ in range(rows)]
    barred = barred_columns(batch, width, tokenizer.unk_id, vocab)
    last = config.max_new_tokens - 1
    for step in range(config.max_new_tokens):
        beams = [beam for task in states for beam in task]
        for row, beam in enumerate(beams):
            fed[row].append(beam.feed)
        logits = answer_step(model, cache, batch, beams, num_segments).masked_fill_(barred, BARRED)
        if config.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor(fed, device=device), config.repetition_penalty)
        logprobs = logits.log_softmax(-1)
        columns = logprobs.size(-1)
        top_scores, top_index = (logprobs + scores[:, None]).view(tasks, -1).topk(2 * width, dim=1)
        order, new_scores = [], []
        for task, prompt in enumerate(prompts):
            done[task] = done[task] or found[task].is_done(float(top_scores[task].max()), step)
            if done[task]:
                order += [task * width] * width
                new_scores += [0.0] * width
                continue
            survivors: list[tuple[Beam, float, int]] = []
            for index, value in zip(top_index[task].tolist(), top_scores[task].tolist()):
                origin, column = divmod(index, columns)
                beam = states[task][origin]
                final = column == tokenizer.eos_id and beam.answer + 1 == len(prompt.answers)
                if final or step == last:
                    found[task].add(beam.tokens + [(column, prompt.answers[beam.answer][1])], value)
                else:
                    survivors.append((advanced(beam, column, prompt, batch, tokenizer.eos_id, tokenizer.bos_id,
                                                vocab), value, task * width + origin))
                if len(survivors) == width:
                    break
            if step < last:
                states[task] = [beam for beam, _, _ in survivors]
                order += [origin for _, _, origin in survivors]
                new_scores += [value for _, value, _ in survivors]
        if step == last or all(done):
            break
        cache.reorder(torch.tensor(order, device=device))
        fed = [list(fed[i]) for i in order]
        scores = torch.tensor(new_scores, device=device)
    return [hyps.best() if hyps.items else [] for hyps in found]


@torch.inference_mode()
def sample_answers(model: CpmBee, tokenizer: BeeTokenizer, prompts: list[Prompt], config: GenerationConfig,
                   batch: PromptBatch) -> list[list[tuple[int, int]]]:
    """Sampled (``do_sample``) decoding: one hypothesis per task, drawn token by token."""
    vocab = tokenizer.vocab_size
    device = model.input_embedding.weight.device
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    cache = read_prompts(model, batch, len(prompts), batch.inputs["input_ids"].size(1) + config.max_new_tokens)
    num_segments = task_segments(prompts, device)
    beams = [Beam(0, [], tokenizer.bos_id, 0, p.answers[0][0], 0) for p in prompts]
    results: list[list[tuple[int, int]] | None] = [None] * len(prompts)
    fed: list[list[int]] = [[] for _ in prompts]
    barred = barred_columns(batch, 1, tokenizer.unk_id, vocab)
    for step in range(config.max_new_tokens):
        for row, beam in enumerate(beams):
            fed[row].append(beam.feed)
        logits = answer_step(model, cache, batch, beams, num_segments).masked_fill_(barred, BARRED)
        if config.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor(fed, device=device), config.repetition_penalty)
        if step < config.min_new_tokens:
            logits[:, tokenizer.eos_id] = float("-inf")
        chosen = sample(sampling_filter(logits, config).softmax(-1), generator).tolist()
        for row, (beam, column) in enumerate(zip(beams, chosen)):
            if results[row] is not None:
                continue
            prompt = prompts[row]
            final = column == tokenizer.eos_id and beam.answer + 1 == len(prompt.answers)
            if final or step == config.max_new_tokens - 1:
                results[row] = beam.tokens + [(column, prompt.answers[beam.answer][1])]
            else:
                beams[row] = advanced(beam, column, prompt, batch, tokenizer.eos_id, tokenizer.bos_id, vocab)
        if all(result is not None for result in results):
            break
    return [result or [] for result in results]


@dataclass
class Task:
    """A task prepared for the engine's continuous batch: its prompt, the batch of it alone (so
    its extra columns are its own, numbered after the vocabulary whatever else runs) and the
    columns it may never choose (``[vocab + its extras]``)."""

    prompt: Prompt
    batch: PromptBatch
    barred: Tensor
    plain: bool = False  # its answer is text for people (``<`` not escaped): a completion or a chat reply

    @property
    def table(self) -> dict[int, str]:
        return self.batch.row_tables[0]

    def text_of(self, tokenizer: BeeTokenizer, column: int) -> str:
        """The text one chosen column adds to its answer."""
        decode = tokenizer.text_of if self.plain else tokenizer.decode
        return decode([column], self.table)

    def first_beam(self, bos_id: int) -> Beam:
        return Beam(0, [], bos_id, 0, self.prompt.answers[0][0], 0)


def prepare_task(tokenizer: BeeTokenizer, task: dict, device: torch.device | str = "cpu", plain: bool = False,
                 examples: Sequence[dict] = ()) -> Task:
    prompt = prompt_for(tokenizer, task, examples)
    batch = batch_prompts([prompt], tokenizer.vocab_size, device)
    return Task(prompt, batch, barred_columns(batch, 1, tokenizer.unk_id, tokenizer.vocab_size)[0], plain)


def prefill_tasks(model: CpmBee, tasks: list[Task]) -> BeeCache:
    """The prompts of ``tasks`` read into one cache (left-padded to the longest), none decoded."""
    batch = batch_prompts([task.prompt for task in tasks], model.config.vocab_size,
                          model.input_embedding.weight.device)
    return read_prompts(model, batch, len(tasks), batch.inputs["input_ids"].size(1))


def batch_logits(model: CpmBee, tasks: list[Task], beams: list[Beam], cache: KVCache) -> Tensor:
    """One decoding step of rows that each decode their own task (``beams``: what each feeds):
    ``[rows, vocab + most extras]``, each row's extra columns its own, the rest barred. The rows'
    segment relation tables differ in size; a row only indexes its own part of the padded table."""
    device = cache.device
    relations = [task.prompt.segment_rel for task in tasks]
    width = max(len(r) for r in relations)
    segment_rel = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in relations]).to(device)
    hidden = step_hidden(model, beams, segment_rel, task_segments([t.prompt for t in tasks], device), cache)
    logits = model.logits(hidden)
    extras = max(task.batch.ext_ids.numel() for task in tasks)
    barred = torch.ones(len(tasks), logits.size(1) + extras, dtype=torch.bool, device=device)
    for row, task in enumerate(tasks):
        barred[row, :task.barred.numel()] = task.barred
    if extras:
        ids = torch.zeros(len(tasks), extras, dtype=torch.int32, device=device)
        subs = torch.zeros_like(ids)
        for row, task in enumerate(tasks):
            count = task.batch.ext_ids.numel()
            ids[row, :count], subs[row, :count] = task.batch.ext_ids, task.batch.ext_subs
        ext = model.embed(ids.long(), subs).to(logits.dtype)  # as CpmBee.logits computes them
        logits = torch.cat([logits, torch.einsum("bd,bed->be", hidden.to(ext.dtype), ext)], dim=-1)
    return logits.float().masked_fill_(barred, BARRED)


@torch.inference_mode()
def text_loss(model: CpmBee, tokenizer: BeeTokenizer, texts: list[str], batch_rows: int = 8) -> dict:
    """Bits per character and perplexity of each text as the answer of ``{"<ans>": text}``
    (what the bilingual demo pretrains on), every answer token and its ``</s>`` scored."""
    from cpmlive.data.bee import pack, training_example
    from cpmlive.tokenizer.bee import escape
    from cpmlive.train.bee import batch_loss

    examples = [training_example(tokenizer, {"<ans>": escape(text)}) for text in texts]
    length = max(len(e) for e in examples)
    if length > model.config.max_length:
        raise CpmliveError(f"a line is {length} positions long; the model takes at most {model.config.max_length}")
    nats = tokens = 0.0
    for start in range(0, len(examples), batch_rows):
        chunk = examples[start:start + batch_rows]
        loss, count = batch_loss(model, pack(chunk, length, tokenizer.vocab_size, model.input_embedding.weight.device))
        nats += float(loss) * count
        tokens += count
    chars = sum(len(text) + 1 for text in texts)  # the </s> stands for the end of each line
    return {"bits_per_char": nats / chars / math.log(2), "perplexity": math.exp(nats / tokens),
            "chars": chars, "tokens": int(tokens), "documents": len(texts)}


def fill_tasks(model: CpmBee, tokenizer: BeeTokenizer, tasks: list[dict], config: GenerationConfig,
               examples: Sequence[dict] = ()) -> tuple[list[dict], list[list[tuple[int, int]]]]:
    """Every task with its ``<ans>`` leaves filled (a leaf decoding never reached is null), and
    the raw ``(output column, answer number)`` pairs of each; ``examples``: filled tasks every
    task reads in context (``data.bee.prompt_for``)."""
    prompts = [prompt_for(tokenizer, task, examples) for task in tasks]
    batch = batch_prompts(prompts, tokenizer.vocab_size, model.input_embedding.weight.device)
    decode = sample_answers if config.do_sample else beam_search
    results = decode(model, tokenizer, prompts, config, batch)
    out = [filled(prompt, answer_texts(result, table, tokenizer))
           for prompt, result, table in zip(prompts, results, batch.row_tables)]
    return out, results


__all__ = ["Hypotheses", "Task", "batch_logits", "beam_search", "fill_tasks", "prefill_tasks", "prepare_task",
           "sample_answers"]
