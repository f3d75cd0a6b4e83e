"""The fine-tuning recipe: a frozen base model plus a delta (LoRA, soft prompt or norm tuning),
trained on a JSONL task, validated every N steps, keeping the best adapter.

Run directory::

    RUN/config.yaml           the recipe as run
    RUN/metrics.jsonl         one line per step / evaluation
    RUN/checkpoints/step-N/   adapter/ + trainer.pt (optimizer, data position, RNG); ``latest``
    RUN/best/                 the best adapter so far (+ task.json, metrics.json)

``--resume auto`` continues from ``latest`` exactly: same order of examples, same RNG (from the
newest readable checkpoint when ``latest`` is unreadable). Ctrl-C (or SIGTERM) saves a
checkpoint at the end of the current step. A new run refuses a directory that holds one.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cpmlive.data.tasks import Example, check_labels, read_examples
from cpmlive.errors import CpmliveError
from cpmlive.config import StackConfig
from cpmlive.model.checkpoint import (CONFIG_NAME, new_build_directory, read_safetensors, replace_directory,
                                      save_checkpoint, save_safetensors)
from cpmlive.model.registry import Family, family_of
from cpmlive.model.stack import Transformer
from cpmlive.model.loss import masked_lm_loss, seq2seq_loss
from cpmlive.recipe import AT_LEAST_ONE, NON_NEGATIVE, Bound, LoopArgs
from cpmlive.resources import model_path
from cpmlive.train.checkpoints import (TRAINER_STATE, check_optimizer_fits, cleaned_up_on_failure,
                                       read_trainer_state, refuse_existing_run, resume_point, warn, write_checkpoint)
from cpmlive.train.core import (Schedule, adamw, autocast, learning_rate, memory_mb, progress_bar, restore_optimizer,
                                rng_state, run_steps, set_learning_rate, set_rng_state)
from cpmlive.train.distributed import Replicas
from cpmlive.train.metrics import MetricsLog, NullLog, finite_or_none
from cpmlive.tune import delta as deltas
from cpmlive.tune.metrics import accuracy, macro_f1
from cpmlive.tune.task import TaskSpec, classify_scores, encode_input, encode_target, example_batch, label_loss
from cpmlive.utils import atomic_write_text

BEST = "best"


@dataclass
class TuneArgs(LoopArgs):
    """The keys of a recipe that tunes a base model on JSONL examples (fine-tuning, alignment),
    beside the loop's."""

    model: str = "demo"
    data: str = ""
    eval: str = ""
    delta: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    max_input_tokens: int = 256
    max_output_tokens: int = 48
    epochs: float = 3.0  # when max_steps is 0

    RANGES: ClassVar[dict[str, Bound]] = {
        **LoopArgs.RANGES, "max_input_tokens": AT_LEAST_ONE, "max_output_tokens": AT_LEAST_ONE,
        "epochs": NON_NEGATIVE,
    }
    VERB: ClassVar[str] = "finetune"  # the verb whose help a refusal points to

    def check(self) -> None:
        if not self.data:
            raise CpmliveError(f"config: data is required (a JSONL file; see `cpmlive {self.VERB} --help`)")
        if self.max_steps < 1 and self.epochs <= 0:
            raise CpmliveError("config: max_steps or epochs must be > 0")
        deltas.DeltaConfig.from_dict(self.delta)


@dataclass
class FinetuneConfig(TuneArgs):
    task: str = "generate"
    out: str = "runs/finetune"
    template: str = "{input}"
    best_metric: str = "auto"  # loss | accuracy | macro_f1 (auto: loss for generate, accuracy for classify)
    classify_loss: str = "labels"  # labels: cross-entropy over the labels' likelihoods; lm: the gold label's text

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **LoopArgs.CHOICES, "task": ("generate", "classify"), "best_metric": ("auto", "loss", "accuracy", "macro_f1"),
        "classify_loss": ("labels", "lm"),
    }

    def check(self) -> None:
        super().check()
        if self.task == "generate" and self.best_metric in ("accuracy", "macro_f1"):
            raise CpmliveError(f"config: best_metric {self.best_metric} needs task classify")

    def check_fits_model(self, model_config: StackConfig) -> None:
        """The longest example (``<s>`` + input, target + ``</s>``) must fit the model's text positions."""
        limit = model_config.max_length - model_config.prompt_length - 1
        if self.max_input_tokens + self.max_output_tokens > limit:
            raise CpmliveError(f"config: max_input_tokens + max_output_tokens is {self.max_input_tokens} + "
                               f"{self.max_output_tokens}; the model takes at most {limit} (max_length "
                               f"{model_config.max_length} - {model_config.prompt_length} prompt positions "
                               "- 1 for </s>)")

    @property
    def chosen_metric(self) -> str:
        if self.best_metric != "auto":
            return self.best_metric
        return "accuracy" if self.task == "classify" and self.eval else "loss"


def check_delta_method(kind: Family, delta: dict[str, Any]) -> None:
    """A soft prompt needs a family whose model has a prompt table (``prompt``); lora and norm deltas fit any."""
    if delta.get("method") == "prompt":
        kind.require("prompt")


def resolve_model_path(name: str) -> Path:
    path = model_path(name)
    if not (path / CONFIG_NAME).is_file():
        raise CpmliveError(f"{name}: not a checkpoint directory (no config.json)")
    return path


@dataclass
class Position:
    """Where the run is in its data: epoch and index into that epoch's shuffled order."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best: float | None = None
    best_step: int = 0


class Finetuner:
    def __init__(self, config: FinetuneConfig, resume: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.out)
        model_path = resolve_model_path(config.model)
        kind = family_of(model_path)
        config.check_fits_model(kind.config.load(model_path / CONFIG_NAME))
        check_delta_method(kind, config.delta)
        self.start_run(resume)
        self.vocab_path = model_path / kind.vocab_name
        self.tokenizer = kind.tokenizer.from_file(self.vocab_path)
        self.train_examples = read_examples(config.data, config.task)
        self.eval_examples = read_examples(config.eval, config.task) if config.eval else []
        self.model: Transformer = kind.load(model_path, dtype=torch.float32)[0].train()
        self.delta = deltas.DeltaConfig.from_dict(config.delta)
        deltas.attach(self.model, self.delta)
        self.spec = self._task_spec()
        if self.eval_examples and config.task == "classify":
            check_labels(self.eval_examples, self.spec.labels, config.eval)
        self.label_ids = [encode_target(self.tokenizer, self.spec, label) for label in self.spec.labels]
        self.train_pairs = [self.encode(e) for e in self.train_examples]
        self.eval_pairs = [self.encode(e) for e in self.eval_examples]
        self._prepare_run(resume)

    def start_run(self, resume: str | None) -> None:
        """The run directory, made (a directory holding another run is refused unless resuming),
        and the seeded generators."""
        self.parallel = Replicas.join()
        self.parallel.check_batch(self.config.batch_size)

        def claim() -> None:
            refuse_existing_run(self.run_dir, resume, markers=(BEST,))
            self.run_dir.mkdir(parents=True, exist_ok=True)

        self.parallel.on_main(claim)
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)

    def _prepare_run(self, resume: str | None) -> None:
        """Optimizer, schedule and data position for the attached delta and ``train_pairs``
        (restored from a checkpoint when resuming), the recipe as run, the metrics log."""
        config = self.config
        self.device = self.parallel.device_for(config.device)
        self.move_to_device()
        trainable = self.trainable_parameters()
        self.optimizer = adamw([{"params": trainable, "weight_decay": config.weight_decay}], config.lr,
                               (config.beta1, config.beta2))
        self.steps_per_epoch = max(1, math.ceil(len(self.train_pairs) / (config.batch_size * config.grad_accum)))
        self.total_steps = config.max_steps or max(1, round(config.epochs * self.steps_per_epoch))
        self.schedule = Schedule.of(config, max_steps=self.total_steps)
        self.position = Position()
        if resume:
            self._resume(resume)
        if self.parallel.is_main:
            atomic_write_text(self.run_dir / "config.yaml", config.to_yaml())
        self.log = MetricsLog(self.run_dir, self.position.step if resume else None) if self.parallel.is_main \
            else NullLog()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def move_to_device(self) -> None:
        """The models the recipe trains and reads, on its device (before the optimizer is made)."""
        self.model.to(self.device)

    def autocast(self) -> torch.autocast:
        return autocast(self.config.precision, self.device)

    def progress_label(self) -> str:
        return "finetune"

    def _task_spec(self) -> TaskSpec:
        config = self.config
        labels = sorted({e.target for e in self.train_examples}) if config.task == "classify" else []
        prompt_task = self.delta.task_id if self.delta.method == "prompt" else TaskSpec().prompt_task
        return TaskSpec(config.task, config.template, config.max_input_tokens, config.max_output_tokens,
                        labels, prompt_task)

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        return (encode_input(self.tokenizer, self.spec, example.input)[0],
                encode_target(self.tokenizer, self.spec, example.target))

    # ---- data order ------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_pairs)))
        random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_pairs(self) -> list[tuple[list[int], list[int]]]:
        """The next ``batch_size`` examples in the epoch's order; one process takes an epoch's last,
        shorter batch as it is, ranks fill it up from the next epoch's order (so that every rank
        has rows of every step to take part with)."""
        pos, size = self.position, self.config.batch_size
        chosen: list[int] = []
        while len(chosen) < size:
            order = self.epoch_order(pos.epoch)
            taken = order[pos.index:pos.index + size - len(chosen)]
            chosen += taken
            pos.index += len(taken)
            if pos.index >= len(order):
                pos.epoch, pos.index = pos.epoch + 1, 0
            if self.parallel.world == 1:
                break
        return [self.train_pairs[i] for i in chosen]

    # ---- steps -----------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step at the scheduled learning rate; its metrics.jsonl record."""
        step = self.position.step + 1
        lr = learning_rate(self.schedule, step)
        set_learning_rate(self.optimizer, lr)
        started = time.perf_counter()
        metrics, tokens = self.optimize()
        seconds = time.perf_counter() - started
        pos = self.position
        pos.step, pos.tokens, pos.elapsed = step, pos.tokens + tokens, pos.elapsed + seconds
        return self.step_record(step, lr, metrics, tokens, seconds)

    def optimize(self) -> tuple[dict[str, float], int]:
        """Gradient-accumulated batches, one optimizer step: the mean loss and the gradient norm,
        and the tokens read."""
        config = self.config
        total, tokens = 0.0, 0
        for _ in range(config.grad_accum):
            pairs = self.parallel.rows(self.next_pairs())
            with self.autocast():
                loss, weight = self.loss(pairs)
            factor, _ = self.parallel.share(weight)
            (loss * factor / config.grad_accum).backward()
            total += self.parallel.weighted_mean(loss.item(), weight) / config.grad_accum
            tokens += self.count_tokens(pairs)
        grad_norm = self.apply_gradients()
        return {"loss": total, "grad_norm": grad_norm}, self.parallel.total(tokens)

    def apply_gradients(self) -> float:
        """The gradients averaged over the ranks, clipped, applied; their norm."""
        params = self.trainable_parameters()
        self.parallel.average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step_record(self, step: int, lr: float, metrics: dict[str, float], tokens: int,
                    seconds: float) -> dict[str, Any]:
        """The metrics.jsonl record of a step :meth:`train_step` has just taken (its keys in this order)."""
        pos = self.position
        return {"type": "train", "step": step, "epoch": pos.epoch + pos.index / len(self.train_pairs),
                "loss": finite_or_none(metrics["loss"]), "lr": lr, "tokens": pos.tokens,
                "tokens_per_s": tokens / seconds, "grad_norm": finite_or_none(metrics["grad_norm"]),
                "memory_mb": round(memory_mb(), 1), "elapsed_s": round(pos.elapsed, 3), "time": time.time()}

    def count_tokens(self, pairs: list) -> int:
        return sum(len(i) + len(t) for i, t in pairs)

    def loss(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, float]:
        """The mean loss of ``pairs`` and what it is a mean over (rows, or target tokens)."""
        if self.config.task == "classify" and self.config.classify_loss == "labels":
            gold = [self.label_ids.index(target) for _, target in pairs]
            loss = label_loss(self.model, [row for row, _ in pairs], gold, self.label_ids, self.spec.prompt_task)
            return loss, len(pairs)
        batch = example_batch(pairs, self.spec.prompt_task, self.model.config)
        return masked_lm_loss(self.model, batch)[0], int((batch.target >= 0).sum())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev loss on the targets, and :meth:`dev_metrics`."""
        self.model.eval()
        try:
            total, count = 0.0, 0
            size = self.config.batch_size
            for start in range(0, len(self.eval_pairs), size):
                loss, n = self.dev_batch_loss(self.eval_pairs[start:start + size])
                total, count = total + loss.item() * n, count + n
            return {"loss": total / max(count, 1), **self.dev_metrics()}
        finally:
            self.model.train()

    def dev_batch_loss(self, pairs: list) -> tuple[torch.Tensor, int]:
        """The mean loss of a dev batch and the number of target tokens it is over."""
        batch = example_batch(pairs, self.spec.prompt_task, self.model.config)
        with self.autocast():
            loss, _ = masked_lm_loss(self.model, batch)
        return loss, int((batch.target >= 0).sum())

    def dev_metrics(self) -> dict[str, float]:
        """The metrics beside the dev loss: a classifier's accuracy and macro-F1."""
        return self.classification_metrics() if self.config.task == "classify" else {}

    def classification_metrics(self) -> dict[str, float]:
        texts = [e.input for e in self.eval_examples]
        scores = classify_scores(self.model, self.tokenizer, self.spec, texts, self.config.batch_size * 2)
        predicted = [self.spec.labels[i] for i in scores.argmax(-1).tolist()]
        gold = [e.target for e in self.eval_examples]
        return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}

    def is_better(self, metrics: dict[str, float]) -> bool:
        name = self.config.chosen_metric
        value, best = metrics[name], self.position.best
        if not math.isfinite(value):
            return False
        return best is None or (value < best if name == "loss" else value > best)

    # ---- saving ----------------------------------------------------------------------------

    def save_adapter(self, directory: Path, metrics: dict[str, Any] | None = None) -> None:
        deltas.save_adapter(self.model, directory)
        self.spec.save(directory)
        shutil.copyfile(self.vocab_path, directory / self.vocab_path.name)
        if metrics is not None:
            atomic_write_text(directory / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    def save_best(self, metrics: dict[str, float]) -> None:
        target = self.run_dir / BEST
        build = new_build_directory(target)
        self.save_adapter(build, {"step": self.position.step, **metrics})
        replace_directory(build, target)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes it (the ranks' trainable weights and optimizers are the same)."""
        return self.parallel.on_main(lambda: write_checkpoint(self.run_dir, self.position.step,
                                                              self.config.keep_checkpoints, self.write_checkpoint))

    def write_checkpoint(self, build: Path) -> None:
        """The adapter and the trainer state (optimizer, data position, RNG) into ``build``."""
        self.save_adapter(build / "adapter")
        torch.save({"optimizer": self.optimizer.state_dict(), "position": dataclasses.asdict(self.position),
                    "rng": rng_state(), "config": self.config.to_dict()}, build / TRAINER_STATE)

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint's trainer state, its adapter loaded into the model; CpmliveError if it
        is unreadable or not this run's (a later readable one then overwrites every adapter tensor)."""
        state = read_trainer_state(path, ("optimizer", "position", "rng"))
        check_optimizer_fits(self.optimizer, state["optimizer"], path)
        deltas.load_adapter_weights(self.model, path / "adapter")
        return state

    def _resume(self, resume: str) -> None:
        point = resume_point(self.run_dir, resume, self.read_checkpoint)
        if point is None:
            return
        _, state = point
        restore_optimizer(self.optimizer, state["optimizer"])
        self.position = Position(**state["position"])
        set_rng_state(state["rng"])

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> Position:
        config = self.config
        trainable, total = deltas.trainable_parameters(self.model)
        self.log.write({"type": "start", "step": self.position.step, "config": config.to_dict(),
                        "trainable": trainable, "parameters": total, "time": time.time()})
        bar = progress_bar(self.total_steps, self.position.step, self.progress_label(),
                           config.progress and self.parallel.is_main)
        try:
            with torch.device(self.device):  # the recipes' batches are made on it
                run_steps(self, self.position.step, self.total_steps, bar, self.parallel.stop_agreed)
        finally:
            self.log.close()
        return self.position

    def step_and_report(self, bar: Any, saved: int) -> int:
        """One step with its logging, validation and checkpoint; returns the last saved step."""
        config = self.config
        record = self.train_step()
        self.log.write(record)
        step = record["step"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}" if record["loss"] is not None else "nan")
        last = step == self.total_steps
        if step % config.eval_every == 0 or last:
            self.validate(step)
        if step % config.save_every == 0 or last:
            self.save_checkpoint()
            return step
        return saved

    def save_interrupted(self, saved: int) -> None:
        """The checkpoint of an interrupted run, unless its last step is saved already."""
        if self.position.step > saved:
            target = self.save_checkpoint()
            if self.parallel.is_main:
                warn(f"stopped at step {self.position.step}, saved as {target}; continue with --resume auto")

    # Whether every rank evaluates (a sharded frozen model needs all of them): else rank 0 alone.
    evaluate_everywhere: bool = False

    def validate(self, step: int) -> None:
        """Rank 0 evaluates, keeps the best adapter and logs; every rank takes the best it found."""
        everywhere = self.evaluate() if self.eval_pairs and self.evaluate_everywhere else None

        def here() -> tuple[float | None, int | None]:
            if not self.eval_pairs:  # without a dev set the latest adapter is the one kept
                self.save_best({"step": step})
                return self.position.best, self.position.best_step
            metrics = everywhere if everywhere is not None else self.evaluate()
            better = self.is_better(metrics)
            if better:
                self.position.best, self.position.best_step = metrics[self.config.chosen_metric], step
                self.save_best(metrics)
            self.log_eval(step, metrics, better)
            return self.position.best, self.position.best_step

        self.position.best, self.position.best_step = self.parallel.on_main(here)

    def log_eval(self, step: int, metrics: dict[str, float], best: bool) -> None:
        self.log.write({"type": "eval", "step": step, **{f"val_{k}": finite_or_none(v) for k, v in metrics.items()},
                        "best": best, "time": time.time()})


# CPM-Bee's fine-tuning script tunes LoRA on the attention's queries and values.
BEE_LORA_TARGETS = ["project_q", "project_v"]


class BeeFinetuner(Finetuner):
    """The same loop for a CPM-Bee model on JSONL of filled task objects (one per line, as
    ``cpmlive bee`` takes them with the answers given): the loss is on the ``<ans>`` leaves."""

    def __init__(self, config: FinetuneConfig, resume: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.out)
        path = resolve_model_path(config.model)
        kind = family_of(path)
        check_delta_method(kind, config.delta)
        self.start_run(resume)
        self.vocab_path = path / kind.vocab_name
        self.tokenizer = kind.tokenizer.from_file(self.vocab_path)
        self.model = kind.load(path, dtype=torch.float32)[0].train()
        delta = dict(config.delta)
        if delta.get("method", "lora") == "lora":
            delta.setdefault("target_modules", BEE_LORA_TARGETS)
        self.delta = deltas.DeltaConfig.from_dict(delta)
        deltas.attach(self.model, self.delta)
        self.train_pairs = self._examples(config.data)
        self.eval_pairs = self._examples(config.eval) if config.eval else []
        self._prepare_run(resume)

    def _examples(self, path: str) -> list:
        from cpmlive.data.bee import parse_task, training_example

        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise CpmliveError(f"{path}: no such file") from None
        except UnicodeDecodeError:
            raise CpmliveError(f"{path}: not UTF-8 text") from None
        rng = random.Random(self.config.seed)
        examples = [training_example(self.tokenizer, parse_task(line, f"{path} line {n}"), shuffle=rng)
                    for n, line in enumerate(lines, 1) if line.strip()]
        if not examples:
            raise CpmliveError(f"{path}: no tasks")
        longest = max(len(e) for e in examples)
        if longest > self.model.config.max_length:
            raise CpmliveError(f"{path}: a task is {longest} tokens long; the model takes at most "
                               f"{self.model.config.max_length}")
        return examples

    def count_tokens(self, pairs: list) -> int:
        return sum(len(example) for example in pairs)

    def loss(self, pairs: list) -> tuple[torch.Tensor, float]:
        from cpmlive.data.bee import pack
        from cpmlive.train.bee import batch_loss

        return batch_loss(self.model, pack(pairs, max(len(e) for e in pairs), self.tokenizer.vocab_size))

    def dev_batch_loss(self, pairs: list) -> tuple[torch.Tensor, int]:
        from cpmlive.data.bee import pack
        from cpmlive.train.bee import batch_loss

        return batch_loss(self.model, pack(pairs, max(len(e) for e in pairs), self.tokenizer.vocab_size))

    def dev_metrics(self) -> dict[str, float]:
        return {}

    def save_adapter(self, directory: Path, metrics: dict[str, Any] | None = None) -> None:
        deltas.save_adapter(self.model, directory)
        shutil.copyfile(self.vocab_path, directory / self.vocab_path.name)
        if metrics is not None:
            atomic_write_text(directory / "metrics.json", json.dumps(metrics, indent=2) + "\n")


class Seq2SeqFinetuner(Finetuner):
    """The same loop for an encoder-decoder: the encoder reads each input (as a prompt: T5's
    ``</s>``, CPM-2's ``<s_0>`` after it), the decoder writes its target and the end token, with
    teacher forcing (:func:`~cpmlive.model.loss.seq2seq_loss`). Generation tasks only: a
    classifier's label scores read a decoder's prompt."""

    def __init__(self, config: FinetuneConfig, resume: str | None = None) -> None:
        if config.task != "generate":
            raise CpmliveError("an encoder-decoder fine-tunes on generation tasks (input -> target text): "
                               "use task: generate")
        super().__init__(config, resume)

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """The encoder's row as the tuned model's prompts are read (the task's template), the target's
        ids and the end token."""
        target = self.tokenizer.encode(example.target)[:self.config.max_output_tokens]
        return encode_input(self.tokenizer, self.spec, example.input)[0], target + [self.tokenizer.eos_id]

    def loss(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, float]:
        return seq2seq_loss(self.model, pairs, self.tokenizer.pad_id)

    def dev_batch_loss(self, pairs: list) -> tuple[torch.Tensor, int]:
        with self.autocast():
            return seq2seq_loss(self.model, pairs, self.tokenizer.pad_id)


class EncoderClassifierFinetuner(Finetuner):
    """Sequence classification for an encoder (BERT's): a classification head on the encoder's
    states (a new one where the checkpoint has none, for the data's labels), trained in full with
    a delta (LoRA by default) on the encoder; cross-entropy over the labels. The best model is
    written as a checkpoint with its delta merged and its head (``cpmlive.load(RUN/best)``
    classifies, ``/v1/classify`` serves it); the run's checkpoints keep the delta and the head
    apart, so a run resumes exactly."""

    HEAD = "head.safetensors"

    def __init__(self, config: FinetuneConfig, resume: str | None = None) -> None:
        if config.task != "classify":
            raise CpmliveError("an encoder fine-tunes to classify (task: classify); it does not generate")
        super().__init__(config, resume)

    def _prepare_run(self, resume: str | None) -> None:
        self.model.add_classifier(self.spec.labels)
        super()._prepare_run(resume)

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        ids = self.tokenizer.encode_for_model(example.input)[:self.config.max_input_tokens]
        return ids, [self.spec.labels.index(example.target)] if example.target in self.spec.labels else [-1]

    def _logits(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.input_embedding.weight.device
        width, pad = max(len(ids) for ids, _ in pairs), self.tokenizer.pad_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in pairs], device=device)
        valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row, _ in pairs], device=device)
        gold = torch.tensor([label[0] for _, label in pairs], device=device)
        return self.model.classify(self.model.encoder_states(ids, valid)).float(), gold

    def count_tokens(self, pairs: list) -> int:
        return sum(len(ids) for ids, _ in pairs)

    def loss(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, float]:
        logits, gold = self._logits(pairs)
        return F.cross_entropy(logits, gold), len(pairs)

    def dev_batch_loss(self, pairs: list) -> tuple[torch.Tensor, int]:
        with self.autocast():
            logits, gold = self._logits(pairs)
        return F.cross_entropy(logits, gold), len(pairs)

    def dev_metrics(self) -> dict[str, float]:
        predicted, gold = [], []
        for start in range(0, len(self.eval_pairs), self.config.batch_size):
            logits, labels = self._logits(self.eval_pairs[start:start + self.config.batch_size])
            predicted += [self.spec.labels[i] for i in logits.argmax(-1).tolist()]
            gold += [self.spec.labels[i] for i in labels.tolist()]
        return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}

    def _head(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()
                if name.startswith(("pooler.", "classifier"))}

    def write_checkpoint(self, build: Path) -> None:
        super().write_checkpoint(build)
        save_safetensors({name: tensor.contiguous() for name, tensor in self._head().items()}, build / self.HEAD)

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        state = super().read_checkpoint(path)
        head = read_safetensors(path / self.HEAD)
        with torch.no_grad():
            for name, tensor in self._head().items():
                tensor.copy_(head[name])
        return state

    def save_best(self, metrics: dict[str, float]) -> None:
        """The best model as a checkpoint: the delta merged into a copy, the head beside it."""
        target = self.run_dir / BEST
        build = new_build_directory(target)
        merged = deltas.merge(copy.deepcopy(self.model).cpu())
        save_checkpoint(merged.state_dict(), merged.config, build, vocab=self.vocab_path)
        atomic_write_text(build / "metrics.json", json.dumps({"step": self.position.step, **metrics}, indent=2) + "\n")
        replace_directory(build, target)


def finetune(config: FinetuneConfig, resume: str | None = None) -> Path:
    """Train; returns the best adapter's directory."""
    path = resolve_model_path(config.model)
    kind = family_of(path)
    if kind.can("bee"):  # a family that answers JSON tasks tunes on them
        recipe = BeeFinetuner
    elif hasattr(kind.model, "seq2seq"):  # an encoder-decoder tunes its decoder's answer to its encoder's input
        recipe = Seq2SeqFinetuner
    elif hasattr(kind.model, "add_classifier"):  # an encoder tunes a classification head
        recipe = EncoderClassifierFinetuner
    else:
        recipe = Finetuner
    with cleaned_up_on_failure(Path(config.out), keep=(BEST,)):
        run_recipe(recipe, config, resume)
    return Path(config.out) / BEST


def run_recipe(kind: type[Finetuner], config: Any, resume: str | None) -> None:
    """Build and run a recipe; under torchrun, leave the process group afterwards."""
    trainer, finished = None, False
    try:
        trainer = kind(config, resume)
        trainer.run()
        finished = True
    finally:
        # freed before the process group goes, as run_distributed does (a gloo group torn down
        # with live users can abort the process at exit)
        parallel = getattr(trainer, "parallel", None)
        del trainer
        gc.collect()
        if parallel is not None:
            parallel.close(finished)


__all__ = ["BeeFinetuner", "FinetuneConfig", "Finetuner", "finetune", "run_recipe"]
