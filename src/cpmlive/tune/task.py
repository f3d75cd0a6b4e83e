"""How a fine-tuning example becomes a plain-text model's input, shared by training, evaluation and use.

An example is laid out like CPM-Live's generation prompt (spec section 5.1)::

    [32 prompt ids of the task | <s> input (context) | target + </s> (not context)]

The input is bidirectional context; the target is predicted left to right from it, exactly
as ``generate`` decodes after a prefill of the same input. Classification scores each label
as the target and picks the most likely one.

A ``TaskSpec`` is saved as ``task.json`` beside every adapter, so whoever uses the adapter
formats and truncates its input exactly as training did.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.layout import GENERATION, TEXT_SEGMENT
from cpmlive.data.objectives import IGNORE_INDEX, Batch
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Transformer
from cpmlive.tokenizer import TextTokenizer
from cpmlive.utils import atomic_write_text

TASK_FILE = "task.json"
TASKS = ("generate", "classify")


class TaskTokenizer(TextTokenizer, Protocol):
    """A plain-text family's tokenizer, as a task encodes with it."""

    def encode_for_model(self, text: str) -> list[int]: ...


@dataclass
class TaskSpec:
    task: str = "generate"
    template: str = "{input}"
    max_input_tokens: int = 256
    max_output_tokens: int = 48
    labels: list[str] = field(default_factory=list)
    prompt_task: int = GENERATION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CpmliveError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if "{input}" not in self.template:
            raise CpmliveError("template must contain {input}")
        if self.max_input_tokens < 2 or self.max_output_tokens < 1:
            raise CpmliveError("max_input_tokens must be >= 2 and max_output_tokens >= 1")

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(Path(directory) / TASK_FILE, json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TaskSpec":
        path = Path(directory) / TASK_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CpmliveError(f"{directory}: no {TASK_FILE} (not a cpmlive task adapter)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CpmliveError(f"{path}: not valid JSON ({exc})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def encode_input(tokenizer: TaskTokenizer, spec: TaskSpec, text: str) -> tuple[list[int], bool]:
    """``<s>`` + the templated input, cut to ``max_input_tokens``; also whether it was cut."""
    ids = tokenizer.encode_for_model(spec.template.format(input=text))
    if ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids[:spec.max_input_tokens], len(ids) > spec.max_input_tokens


def encode_target(tokenizer: TaskTokenizer, spec: TaskSpec, text: str) -> list[int]:
    ids = [i for i in tokenizer.encode_for_model(text) if i != tokenizer.bos_id]
    return ids[:spec.max_output_tokens] + [tokenizer.eos_id]


def example_batch(pairs: Sequence[tuple[list[int], list[int]]], prompt_task: int, config: Any) -> Batch:
    """Right-padded rows ``[prompt | input | target]`` with a loss on every target token."""
    prompt = config.prompt_length
    width = prompt + max(len(i) + len(t) for i, t in pairs)
    batch = len(pairs)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    target = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    segment = torch.zeros(batch, width, dtype=torch.int32)
    context = torch.zeros(batch, width, dtype=torch.bool)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    lengths = []
    for row, (inputs, targets) in enumerate(pairs):
        tokens = inputs + targets
        end = prompt + len(tokens)
        input_ids[row, :prompt] = config.vocab_size + prompt_task * prompt + torch.arange(prompt)
        input_ids[row, prompt:end] = torch.tensor(tokens)
        segment[row, prompt:end] = TEXT_SEGMENT[GENERATION]
        context[row, :prompt + len(inputs)] = True
        valid[row, :end] = True
        # the hidden state at position p predicts the token at p + 1
        first = prompt + len(inputs) - 1
        target[row, first:end - 1] = torch.tensor(targets)
        lengths.append(end)
    position = torch.arange(width).expand(batch, width).clone()
    task = torch.where(target != IGNORE_INDEX, 1, -1)
    return Batch(input_ids, segment, context, torch.zeros_like(segment), valid, target, task, position,
                 torch.tensor(lengths))


def sequence_logprobs(model: Transformer, batch: Batch) -> Tensor:
    """Summed log-probability of each row's target tokens (differentiable)."""
    hidden = model(batch.input_ids, batch.segment, batch.context, batch.span, batch.valid)
    selected = batch.target != IGNORE_INDEX
    logprobs = F.log_softmax(model.logits(hidden[selected]).float(), dim=-1)
    picked = logprobs.gather(1, batch.target[selected][:, None])[:, 0]
    rows = selected.nonzero()[:, 0]
    return torch.zeros(batch.target.size(0), device=picked.device).index_add(0, rows, picked)


@torch.no_grad()
def target_logprobs(model: Transformer, batch: Batch) -> Tensor:
    """Summed log-probability of each row's target tokens."""
    return sequence_logprobs(model, batch)


def label_loss(model: Transformer, inputs: Sequence[list[int]], gold: Sequence[int],
               label_ids: Sequence[list[int]], prompt_task: int) -> Tensor:
    """Cross-entropy over the labels' sequence log-likelihoods (PET-style): the model is
    trained on the very decision ``classify_scores`` makes, not on the label text alone."""
    pairs = [(row, ids) for row in inputs for ids in label_ids]
    scores = sequence_logprobs(model, example_batch(pairs, prompt_task, model.config)).view(len(inputs), -1)
    return F.cross_entropy(scores, torch.tensor(list(gold), device=scores.device))


def classify_scores(model: Transformer, tokenizer: TaskTokenizer, spec: TaskSpec, texts: Sequence[str],
                    batch_size: int = 16) -> Tensor:
    """``[len(texts), len(labels)]`` log-likelihood of each label given each text."""
    if not spec.labels:
        raise CpmliveError("this task has no labels")
    label_ids = [encode_target(tokenizer, spec, label) for label in spec.labels]
    inputs = [encode_input(tokenizer, spec, text)[0] for text in texts]  # once per text, not once per label
    pairs = [(ids, label) for ids in inputs for label in label_ids]
    scores = []
    per_batch = max(1, batch_size // len(label_ids)) * len(label_ids)
    for start in range(0, len(pairs), per_batch):
        scores.append(target_logprobs(model, example_batch(pairs[start:start + per_batch], spec.prompt_task,
                                                           model.config)))
    return torch.cat(scores).view(len(texts), len(label_ids))


__all__ = ["TASK_FILE", "TaskSpec", "TaskTokenizer", "classify_scores", "encode_input", "encode_target",
           "example_batch", "label_loss", "sequence_logprobs", "target_logprobs"]
