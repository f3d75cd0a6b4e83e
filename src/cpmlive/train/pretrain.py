"""The pretraining recipe: setup -> train -> save, every knob in ``PretrainConfig``.

Each step logs loss (total, infilling, generation), lr, tokens, throughput, grad norm,
memory, time, cost and CO2e to ``metrics.jsonl``; checkpoints hold the model, optimizer,
schedule, data position and RNG, and are swapped in atomically, so ``--resume auto``
continues a killed run exactly where its last checkpoint left it (or, when that one is
unreadable, the newest readable one before it). Ctrl-C (or SIGTERM) saves a checkpoint at the
end of the current step before the run stops. A new run refuses a directory that holds one.

This module is the single-process recipe over the library in :mod:`cpmlive.train.core`;
:mod:`cpmlive.train.distributed` shards the same steps and checkpoints over the ranks of a
``torchrun`` job, and :func:`cpmlive.train.launch.pretrain` is the entry that picks one of the two.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from cpmlive.config import StackConfig
from cpmlive.model.registry import families, family, family_of, preset
from cpmlive.data.objectives import Batch
from cpmlive.data.store import TokenStore
from cpmlive.data.stream import PretrainStream, check_mixture_weight, fixed_batches, source_weights
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Transformer
from cpmlive.model.checkpoint import (CONFIG_NAME, VOCAB_NAME, checkpoint_vocab, expected_shapes, model_class,
                                      save_checkpoint)
from cpmlive.model.loss import masked_lm_loss
from cpmlive.recipe import AT_LEAST_ONE, NON_NEGATIVE, Bound, LoopArgs
from cpmlive.tokenizer import text_tokenizer
from cpmlive.train.checkpoints import (TRAINER_STATE, check_optimizer_fits, read_trainer_state,
                                       refuse_existing_run, resume_point, warn, write_checkpoint)
from cpmlive.train.core import (Schedule, adamw, autocast, decay_groups, learning_rate, memory_mb, progress_bar,
                                resolve_device, restore_optimizer, rng_state, run_steps, set_learning_rate,
                                set_rng_state)
from cpmlive.train.metrics import MetricsLog, NullLog, finite_or_none, parameter_stats
from cpmlive.train.sharded import check_readable, check_shapes, is_sharded, load_sharded, sharded_config_path
from cpmlive.utils import atomic_write_text


@dataclass
class PretrainConfig(LoopArgs):
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    # weight per source of the data (1 when not named): how many times an epoch visits it
    mixture: dict[str, float] = field(default_factory=dict)
    out: str = "runs/pretrain"
    seq_length: int = 512
    # the loop's keys (LoopArgs) whose default differs here
    max_steps: int = 1000
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta2: float = 0.95
    eval_every: int = 100
    save_every: int = 100
    activation_checkpointing: bool = False
    eval_batches: int = 8
    inspect_every: int = 50
    price_per_device_hour: float = 0.0
    device_watts: float = 150.0
    grid_kg_co2_per_kwh: float = 0.58
    tensorboard: bool = False
    # several processes (torchrun): FSDP2 options, ignored by a single process
    fsdp_cpu_offload: bool = False
    fsdp_mixed_precision: bool = False
    async_checkpoint: bool = False  # shards written by a background thread while training goes on
    tp_size: int = 1  # tensor-parallel ranks per data-parallel group (torchrun: WORLD_SIZE = dp x tp)

    RANGES: ClassVar[dict[str, Bound]] = {
        **LoopArgs.RANGES, "seq_length": Bound(64, low_open=True), "max_steps": AT_LEAST_ONE,
        "eval_batches": AT_LEAST_ONE, "inspect_every": AT_LEAST_ONE, "tp_size": AT_LEAST_ONE,
        "price_per_device_hour": NON_NEGATIVE,
        "device_watts": NON_NEGATIVE, "grid_kg_co2_per_kwh": NON_NEGATIVE,
    }

    def check(self) -> None:
        if not self.data:
            raise CpmliveError("config: data is required (a directory made by `cpmlive data prepare`)")
        for name, weight in self.mixture.items():
            try:
                check_mixture_weight(name, weight)
            except CpmliveError as exc:
                raise CpmliveError(f"config: {exc}") from None


def make_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`~cpmlive.train.core.decay_groups`, fused when it can be."""
    return adamw(decay_groups(model, config.weight_decay), config.lr, (config.beta1, config.beta2))


# ---- run state ----------------------------------------------------------------------------------


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0

    def cost(self, config: PretrainConfig, devices: int) -> tuple[float, float]:
        hours = self.elapsed / 3600 * devices
        return hours * config.price_per_device_hour, hours * config.device_watts / 1000 * config.grid_kg_co2_per_kwh


def save_training_checkpoint(run_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                             stream: PretrainStream, state: RunState, config: PretrainConfig,
                             vocab_path: Path, model_state: dict[str, torch.Tensor] | None = None,
                             optimizer_state: dict[str, Any] | None = None) -> Path:
    """Model directory + trainer state, written to a temp dir and renamed; then ``latest``.

    ``model_state``/``optimizer_state``, when given, are written instead of the model's and
    the optimizer's own (the distributed trainer passes the full states gathered from its
    shards). A failure (disk full) leaves the previous checkpoint and ``latest`` untouched."""

    def write(build: Path) -> None:
        save_checkpoint(model if model_state is None else model_state, model.config, build / "model",
                        vocab=vocab_path)
        saved_optimizer = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": saved_optimizer, **trainer_header(stream, state, config)}, build / TRAINER_STATE)

    return write_checkpoint(run_dir, state.step, config.keep_checkpoints, write)


def trainer_header(stream: PretrainStream, state: RunState, config: PretrainConfig) -> dict[str, Any]:
    """What a checkpoint holds besides the weights and the optimizer: the data position, the
    run's counters, the RNG and the recipe."""
    return {"stream": stream.state_dict(), "state": dataclasses.asdict(state), "rng": rng_state(),
            "config": config.to_dict()}


# ---- the recipe -----------------------------------------------------------------------------------


def new_model_config(config: PretrainConfig) -> StackConfig:
    """The architecture a recipe trains from scratch: its preset with ``model_overrides``."""
    base = preset(config.model)
    return type(base).from_dict({**base.to_dict(), "half": False, **config.model_overrides})


def run_model_config(config: PretrainConfig) -> StackConfig:
    """The architecture the run will train: the checkpoint directory's, else the preset's."""
    source = Path(config.model)
    return family_of(source).config.load(source / CONFIG_NAME) if source.is_dir() else new_model_config(config)


def objective_of(model_config: StackConfig) -> str:
    """The objective the model's family pretrains with (``Family.pretrain_objective``: CPM-Ant's
    infilling and generation, CPM-1's left-to-right language modelling); a family without one is refused."""
    kind = family(model_config.model_type)
    if kind.pretrain_objective is None:
        able = " or ".join(entry.name for entry in families().values() if entry.pretrain_objective)
        raise CpmliveError(f"config: {kind.name} models are not pretrained by this recipe (it pretrains {able})")
    return kind.pretrain_objective


def check_fits_model(config: PretrainConfig, model_config: StackConfig) -> None:
    """A row (``prompt_length`` prompt positions, then text) must fit the model's positions."""
    if config.seq_length > model_config.max_length:
        text = model_config.max_length - model_config.prompt_length
        raise CpmliveError(f"config: seq_length {config.seq_length} is beyond the model's {model_config.max_length} "
                           f"positions ({model_config.prompt_length} prompt + {text} text; max_length of "
                           f"{config.model}); use seq_length <= {model_config.max_length}")


def check_same_architecture(saved: StackConfig, ours: StackConfig, path: Path) -> None:
    saved_shapes, our_shapes = expected_shapes(saved), expected_shapes(ours)
    for name in sorted(set(saved_shapes) | set(our_shapes)):
        if saved_shapes.get(name) != our_shapes.get(name):
            raise CpmliveError(f"{path}: its model is not this run's (weight {name!r}: "
                               f"{list(saved_shapes.get(name, []))} vs {list(our_shapes.get(name, []))})")


def build_or_load_model(config: PretrainConfig) -> Transformer:
    source = Path(config.model)
    if source.is_dir():
        model, _ = family_of(source).load(source, dtype=torch.float32)
        return model.train()
    model_config = new_model_config(config)
    model = model_class(model_config)(model_config)
    model.init_weights(config.seed)
    return model.train()


def vocab_for(config: PretrainConfig) -> Path:
    for directory in (Path(config.model), Path(config.data)):
        path = checkpoint_vocab(directory) if directory.is_dir() else None
        if path is not None:
            return path
    raise CpmliveError(f"no {VOCAB_NAME} in {config.data} (write the vocabulary used by `data prepare` there)")


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: list[Batch], precision: str,
                  device: torch.device = torch.device("cpu")) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(precision, device):
            loss, _ = masked_lm_loss(model, batch)
        n = int((batch.target != -100).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    """One process; :class:`cpmlive.train.distributed.DistributedTrainer` overrides the hooks
    (``prepare_model``, ``forward_backward``, ``clip_gradients``, ``evaluate``,
    ``parameter_stats``, ``save``, ``_resume``) to run the same steps sharded over ranks."""

    rank = 0
    world_size = 1
    is_main = True
    device = torch.device("cpu")

    def __init__(self, config: PretrainConfig, resume: str | None = None) -> None:
        self.config = config
        self.device = self.training_device()
        self.run_dir = Path(config.out)
        model_config = run_model_config(config)
        self.objective = objective_of(model_config)
        check_fits_model(config, model_config)
        train_store = TokenStore(config.data, "train")
        source_weights(train_store, config.mixture)
        self.on_main(lambda: refuse_existing_run(self.run_dir, resume))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.vocab_path = vocab_for(config)
        tokenizer = text_tokenizer(self.vocab_path)
        train_store.check_vocab(tokenizer)
        self.model = build_or_load_model(config)
        if self.model.config.vocab_size != tokenizer.vocab_size:
            raise CpmliveError(f"vocab/model mismatch: the vocabulary has {tokenizer.vocab_size} tokens, "
                               f"the model {self.model.config.vocab_size}")
        self.model.gradient_checkpointing = config.activation_checkpointing
        self.model = self.prepare_model(self.model)
        vocab_size = self.model.config.vocab_size
        self.stream = PretrainStream(train_store, config.seq_length, config.batch_size, seed=config.seed,
                                     prompt_length=self.model.config.prompt_length, vocab_size=vocab_size,
                                     mixture=config.mixture, objective=self.objective)
        self.val_batches = fixed_batches(TokenStore(config.data, "val"), config.seq_length, config.batch_size,
                                         config.eval_batches, vocab_size=vocab_size,
                                         prompt_length=self.model.config.prompt_length,
                                         objective=self.objective)
        self.optimizer = make_optimizer(self.model, config)
        self.state = RunState()
        if resume:
            self._resume(resume)
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", config.to_yaml())
        resumed = self.state.step if resume else None
        self.log: MetricsLog | NullLog = MetricsLog(self.run_dir, resumed) if self.is_main else NullLog()
        self.tensorboard = tensorboard_writer(self.run_dir) if config.tensorboard and self.is_main else None

    def training_device(self) -> torch.device:
        """The recipe's device (the distributed trainer: its rank's)."""
        return resolve_device(self.config.device)

    def prepare_model(self, model: Transformer) -> Transformer:
        """The model as it trains, on the recipe's device (the distributed trainer shards it here)."""
        return model.to(self.device)

    def on_main(self, check: Callable[[], None]) -> None:
        """Run a check of the run directory (the distributed trainer: on rank 0, for every rank)."""
        check()

    def stop_agreed(self, requested: bool) -> bool:
        """Whether to stop after this step (the distributed trainer: if any rank was signalled)."""
        return requested

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """A checkpoint's weights and trainer state, checked to fit this run; CpmliveError if not.
        A sharded checkpoint's weights are not read here (None): every rank loads its own
        shards afterwards (:func:`cpmlive.train.sharded.load_sharded`)."""
        if is_sharded(path):
            trainer = read_trainer_state(path, ("stream", "state", "rng"))
            check_readable(path)
            config_path = sharded_config_path(path)
            check_same_architecture(family_of(config_path.parent).config.load(config_path), self.model.config, path)
            check_shapes(path, {name: tuple(t.shape) for name, t in self.model.state_dict().items()})
            return None, trainer
        trainer = read_trainer_state(path, ("optimizer", "stream", "state", "rng"))
        check_optimizer_fits(self.optimizer, trainer["optimizer"], path)
        loaded, _ = family_of(path / "model").load(path / "model", dtype=torch.float32)
        check_same_architecture(loaded.config, self.model.config, path)
        return loaded.state_dict(), trainer

    def _resume(self, resume: str) -> None:
        point = resume_point(self.run_dir, resume, self.read_checkpoint)
        if point is None:
            return
        path, (model_state, trainer) = point
        if model_state is None:
            load_sharded(path, self.model, self.optimizer)
        else:
            self.model.load_state_dict(model_state)
            restore_optimizer(self.optimizer, trainer["optimizer"])
        self.stream.load_state_dict(trainer["stream"])
        self.state = RunState(**trainer["state"])
        set_rng_state(trainer["rng"])

    def train_step(self) -> dict[str, Any]:
        config = self.config
        step = self.state.step + 1
        lr = learning_rate(Schedule.of(config), step)
        set_learning_rate(self.optimizer, lr)
        started = time.perf_counter()
        totals = {"loss": 0.0, "mlm": [], "lm": []}
        tokens = 0
        for _ in range(config.grad_accum):
            loss, per_task, batch_tokens = self.forward_backward(self.stream.next_batch())
            totals["loss"] += loss / config.grad_accum
            for name, value in per_task.items():
                if math.isfinite(value):
                    totals[name].append(value)
            tokens += batch_tokens
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        self.state = RunState(step, self.state.tokens + tokens, self.state.elapsed + seconds)
        cost, co2 = self.state.cost(config, devices=self.world_size)
        return {
            "type": "train", "step": step, "loss": finite_or_none(totals["loss"]),
            "loss_infill": finite_or_none(float(np.mean(totals["mlm"]))) if totals["mlm"] else None,
            "loss_generate": finite_or_none(float(np.mean(totals["lm"]))) if totals["lm"] else None,
            "lr": lr, "tokens": self.state.tokens, "tokens_per_s": tokens / seconds,
            "grad_norm": finite_or_none(grad_norm), "memory_mb": round(memory_mb(), 1),
            "elapsed_s": round(self.state.elapsed, 3), "cost": round(cost, 6), "co2_kg": round(co2, 6),
            "time": time.time(),
        }

    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, float], int]:
        """One micro-batch: forward, ``backward`` of its share of the step's loss; returns the
        loss, the per-objective losses (NaN when absent) and the number of tokens."""
        config = self.config
        batch = batch.to(self.device)
        with autocast(config.precision, self.device):
            loss, per_task = masked_lm_loss(self.model, batch)
        (loss / config.grad_accum).backward()
        return loss.item(), {name: value.item() for name, value in per_task.items()}, int(batch.valid.sum())

    def clip_gradients(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip).item()

    def evaluate(self) -> float:
        return evaluate_loss(self.model, self.val_batches, self.config.precision, self.device)

    def parameter_stats(self) -> dict[str, list[float]]:
        return parameter_stats(self.model)

    def save(self) -> Path | None:
        return save_training_checkpoint(self.run_dir, self.model, self.optimizer, self.stream, self.state,
                                        self.config, self.vocab_path)

    def run(self) -> RunState:
        config = self.config
        self.log.write({"type": "start", "step": self.state.step, "config": config.to_dict(),
                        "parameters": self.model.num_parameters(), "world_size": self.world_size,
                        "mixture": self.stream.shares, "time": time.time()})
        bar = progress_bar(config.max_steps, self.state.step, "pretrain", config.progress and self.is_main)
        try:
            run_steps(self, self.state.step, config.max_steps, bar, self.stop_agreed)
        finally:
            self.log.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return self.state

    def save_interrupted(self, saved: int) -> None:
        """The checkpoint of an interrupted run, unless its last step is saved already."""
        if self.state.step > saved:
            target = self.save()
            if self.is_main:
                warn(f"stopped at step {self.state.step}, saved as {target}; continue with --resume auto")

    def step_and_report(self, bar: Any, saved: int) -> int:
        """One step with its logging, evaluation and checkpoint; returns the last saved step."""
        config = self.config
        record = self.train_step()
        self.log.write(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        step = record["step"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}" if record["loss"] is not None else "nan",
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if step % config.inspect_every == 0 or step == 1:
            self.log.write({"type": "params", "step": step, "stats": self.parameter_stats()})
        if step % config.eval_every == 0 or step == config.max_steps:
            val = self.evaluate()
            self.log.write({"type": "eval", "step": step, "val_loss": finite_or_none(val), "time": time.time()})
        if step % config.save_every == 0 or step == config.max_steps:
            self.save()
            return step
        return saved


def tensorboard_writer(run_dir: Path):
    """TensorBoard scalars beside metrics.jsonl (needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CpmliveError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


__all__ = ["PretrainConfig", "RunState", "Trainer", "build_or_load_model", "make_optimizer", "new_model_config",
           "run_model_config", "save_training_checkpoint"]
