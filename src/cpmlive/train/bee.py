"""Training CPM-Bee on JSON task objects: the loss of a packed batch, and a resumable loop that
packs objects into rows, steps AdamW on a schedule and checkpoints atomically.

The demo recipe (``train.bee_demo``) and ``cpmlive finetune`` on a CPM-Bee model both use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.data.bee import IGNORE, MODEL_INPUTS, Example, pack, training_example
from cpmlive.model.bee.model import CpmBee
from cpmlive.tokenizer.bee import BeeTokenizer
from cpmlive.train.checkpoints import TRAINER_STATE, read_trainer_state, resume_point, write_checkpoint
from cpmlive.train.core import (Schedule, adamw, decay_groups, learning_rate, progress_bar, restore_optimizer,
                                rng_state, set_learning_rate, set_rng_state)



def batch_loss(model: CpmBee, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Mean cross-entropy over the answer tokens of a packed batch (``data.bee.pack``), and
    their count. Logits are computed at those positions only."""
    hidden = model(**{name: batch[name] for name in MODEL_INPUTS})
    targets = batch["target"].long()
    chosen = targets != IGNORE
    logits = model.logits(hidden[chosen], batch["ext_ids"], batch["ext_subs"]).float()
    return F.cross_entropy(logits, targets[chosen]), int(chosen.sum())


def examples_of(tokenizer: BeeTokenizer, objects: Sequence[dict], max_length: int, seed: int = 0) -> list[Example]:
    """Training examples of the objects that fit ``max_length`` (answers of dict ``<ans>``
    fields shuffled, as the original's training does)."""
    rng = random.Random(seed)
    out = []
    for obj in objects:
        example = training_example(tokenizer, obj, shuffle=rng)
        if len(example) <= max_length:
            out.append(example)
    return out


@dataclass
class LoopConfig:
    steps: int
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    row_length: int = 256
    rows: int = 8
    save_every: int = 200
    keep: int = 2
    seed: int = 0


def _batches(examples: list[Example], config: LoopConfig, step: int, vocab_size: int) -> dict[str, Tensor]:
    """The batch of ``step``: a fixed function of the seed and the step, so a resumed run sees
    the same batches as an uninterrupted one."""
    rng = random.Random(config.seed * 1_000_003 + step)
    budget = config.rows * config.row_length
    chosen, used = [], 0
    while used < budget * 0.9:
        example = examples[rng.randrange(len(examples))]
        chosen.append(example)
        used += len(example)
    return pack(chosen, config.row_length, vocab_size)


def train(model: CpmBee, tokenizer: BeeTokenizer, examples_for_step: Callable[[int], list[Example]],
          config: LoopConfig, run_dir: Path, resume: str | None, save: Callable[[CpmBee, Path], None],
          parameters: list[torch.nn.Parameter] | None = None, desc: str = "train") -> list[dict]:
    """Train for ``config.steps`` steps; ``examples_for_step(step)`` is the pool a step draws
    from (a recipe switches pools between phases). Returns the per-step records."""
    params = parameters if parameters is not None else list(model.parameters())
    groups = (decay_groups(model, config.weight_decay) if parameters is None
              else [{"params": params, "weight_decay": 0.0}])
    optimizer = adamw(groups, config.lr, (0.9, 0.95))
    schedule = Schedule("cosine", config.lr, config.min_lr, config.warmup_steps, config.steps)
    start, records = 0, []
    found = resume_point(run_dir, resume, lambda path: read_trainer_state(path, ("step", "optimizer", "model")))\
        if resume else None
    if found is not None:
        _, state = found
        model.load_state_dict(state["model"], strict=False)
        restore_optimizer(optimizer, state["optimizer"])
        set_rng_state(state["rng"])
        start, records = state["step"], state.get("records", [])
    model.train()
    bar = progress_bar(config.steps, start, desc)
    for step in range(start + 1, config.steps + 1):
        set_learning_rate(optimizer, learning_rate(schedule, step))
        batch = _batches(examples_for_step(step), config, step, tokenizer.vocab_size)
        loss, tokens = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        records.append({"step": step, "loss": value, "tokens": tokens})
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if step % config.save_every == 0 or step == config.steps:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            snapshot = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "records": records,
                        "model": {k: v for k, v in model.state_dict().items() if k in trainable}}

            def write(build: Path) -> None:
                torch.save(snapshot, build / TRAINER_STATE)
                save(model, build)
            write_checkpoint(run_dir, step, config.keep, write)
    bar.close()
    model.eval()
    return records


__all__ = ["LoopConfig", "batch_loss", "examples_of", "train"]
