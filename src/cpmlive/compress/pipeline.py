"""``cpmlive compress MODEL OUT --recipe recipe.yaml``: compression steps in order, resumable.

A recipe names a token store (for the steps that train) and a list of steps, each one of:

* ``prune``: learned structured pruning to ``target`` (share of the prunable parameters kept),
  with distillation from the recipe's input model when it has a ``distill`` mapping;
* ``distill``: train the current model on the teacher's distribution (the input model of the
  whole recipe), e.g. to recover after pruning;
* ``sparse24``: 2:4 sparsity (``method`` magnitude or wanda), then ``steps`` of fine-tuning
  (0: one-shot) with the mask kept; only ``quantize`` may follow it (``cpmlive.compress.sparsity``);
* ``qat``: quantization-aware fine-tuning (``steps``, ``lr``, optional ``distill``) through the
  rounding of the ``quantize`` step that must follow it (``cpmlive.compress.qat``);
* ``quantize``: ``bits``, ``group_size``, ``method`` (``gptq`` / ``awq`` calibrate on rows of the
  store's training split), ``activations``.

* ``moefy``: MoEfication (``experts``, ``top_k``, ``router`` similarity or mlp, ``router_steps``;
  the MLP router trains on rows of the store's training split); last, and not with ``quantize``.

A step the model's family cannot do (its registry abilities ``prune``, ``moefy``, ``retrain`` for
the steps that train on the store with the family's pretraining objective, ``calibrate`` for GPTQ
/ AWQ) is refused before anything runs. Quantization is last (nothing here trains integer
weights), and a model is pruned once. The
run lives beside the output, in ``OUT.run/``: one directory per step, holding that step's
checkpoints (every ``save_every`` steps, with the data position, the gates, the optimizers and
the RNG: ``--resume auto`` continues exactly) and, once the step is done, its model in
``done/``. The output directory is written last, whole.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cpmlive.compress.distill import DistillConfig, distillation_loss
from cpmlive.compress.prune import GateTrainer, PruneConfig
from cpmlive.compress.qat import attach_fake_quant, detach_fake_quant
from cpmlive.compress.sparsity import METHODS as SPARSITY_METHODS
from cpmlive.compress.sparsity import apply_masks, sparsify_2of4
from cpmlive.compress.quantize import calibration_batches, calibration_rows, quantize_model
from cpmlive.compress.moefy import ffn_inputs, moefy, train_router
from cpmlive.config import MoEConfig, QuantConfig
from cpmlive.data.objectives import IGNORE_INDEX
from cpmlive.data.store import TokenStore
from cpmlive.data.stream import INFILL_GENERATE, PretrainStream
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import checkpoint_vocab, save_checkpoint
from cpmlive.model.registry import family_of
from cpmlive.model.loss import masked_lm_loss
from cpmlive.recipe import AT_LEAST_ONE, Recipe
from cpmlive.train.checkpoints import TRAINER_STATE, StopRequest, read_trainer_state, resume_point, write_checkpoint
from cpmlive.train.core import progress_bar, rng_state, set_rng_state
from cpmlive.train.distributed import Replicas, rows_of_rank
from cpmlive.train.metrics import MetricsLog, NullLog
from cpmlive.utils import atomic_write_text, check_output

STEP_KINDS = ("prune", "distill", "sparse24", "qat", "quantize", "moefy")
COMPRESSION_NAME = "compression.json"  # how the model was made; `cpmlive info` shows it
DONE = "done"
RUN_MARKER = "compress-run.json"  # written first into OUT.run/: tells a compress run from any other directory
STEP_DIR = re.compile(r"step-\d+-(" + "|".join(STEP_KINDS) + ")")


@dataclass
class CompressRecipe(Recipe):
    data: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    seq_length: int = 256
    batch_size: int = 8
    save_every: int = 50
    keep_checkpoints: int = 2
    calibration_rows: int = 64
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # where the steps run: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N
    run_time: str = ""  # what the recipe takes, as measured by its author; `cpmlive compress` prints it

    RANGES = {"seq_length": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "save_every": AT_LEAST_ONE,
              "keep_checkpoints": AT_LEAST_ONE, "calibration_rows": AT_LEAST_ONE}

    def check(self) -> None:
        if not self.steps:
            raise CpmliveError("compress recipe: steps is empty (give prune, distill and/or quantize steps)")
        kinds = [self.kind(step) for step in self.steps]
        check_order(kinds)
        if any(k in ("prune", "distill", "qat", "sparse24") for k in kinds) and not self.data:
            raise CpmliveError("compress recipe: prune, distill, sparse24 and qat steps train or calibrate: "
                               "give data (a token store)")
        settings = [step_settings(step) for step in self.steps]  # all checked before anything runs
        if any(isinstance(s, MoEStep) and s.moe.router == "mlp" for s in settings) and not self.data:
            raise CpmliveError("compress recipe: the mlp router trains on calibration rows: give data (a token store)")
        prune = next((s.prune for s in settings if isinstance(s, TrainingStep) and s.prune is not None), None)
        quantize = settings[-1] if isinstance(settings[-1], QuantConfig) else None
        int4_groups = quantize is not None and quantize.bits == 4
        if prune is not None and int4_groups and prune.multiple_of % quantize.group_size:
            raise CpmliveError(f"compress recipe: the pruned FFN width is a multiple of {prune.multiple_of}, which "
                               f"int4 groups of {quantize.group_size} do not divide: set prune's multiple_of to a "
                               f"multiple of {quantize.group_size}")

    @staticmethod
    def kind(step: object) -> str:
        if not isinstance(step, dict) or len(step) != 1:
            raise CpmliveError(f"compress recipe: each step is a one-key mapping such as {{prune: {{target: 0.5}}}}, "
                               f"got {step!r}")
        (kind,) = step
        if kind not in STEP_KINDS:
            raise CpmliveError(f"compress recipe: unknown step {kind!r} (one of {', '.join(STEP_KINDS)})")
        return kind


def check_order(kinds: list[str]) -> None:
    """Refuse step orders that cannot work, naming the order given."""
    if "quantize" in kinds[:-1]:
        raise CpmliveError("compress recipe: quantize must be the last step (nothing after it trains "
                           f"integer weights); the steps are {' -> '.join(kinds)}")
    if "moefy" in kinds and (kinds[-1] != "moefy" or "quantize" in kinds):
        raise CpmliveError("compress recipe: moefy must be the last step, and a MoEfied model is not "
                           f"quantized (yet); the steps are {' -> '.join(kinds)}")
    if "qat" in kinds and (kinds.index("qat") != len(kinds) - 2 or kinds[-1] != "quantize"):
        raise CpmliveError("compress recipe: qat trains through the rounding of the quantize step, so it must "
                           f"come right before a final quantize step; the steps are {' -> '.join(kinds)}")
    if "sparse24" in kinds and any(k != "quantize" for k in kinds[kinds.index("sparse24") + 1:]):
        raise CpmliveError("compress recipe: only quantize may follow sparse24 (a step that trains would "
                           f"fill the 2:4 zeros in again); the steps are {' -> '.join(kinds)}")
    if kinds.count("prune") > 1:
        raise CpmliveError("compress recipe: one prune step per recipe (give its target as the final size)")


@dataclass
class TrainingStep:
    """The settings of a step that trains (prune, distill, sparse24 or qat)."""

    steps: int = 100
    lr: float = 1e-4
    distill: DistillConfig | None = None
    prune: PruneConfig | None = None
    qat: QuantConfig | None = None  # the grid to train through (the recipe's final quantize step)
    sparse24: str | None = None  # the 2:4 mask's method (magnitude | wanda)


@dataclass
class MoEStep:
    moe: MoEConfig
    router_steps: int = 300


def step_settings(step: dict[str, Any]) -> TrainingStep | QuantConfig | MoEStep:
    kind = CompressRecipe.kind(step)
    settings = dict(step[kind] or {})
    if not isinstance(settings, dict):
        raise CpmliveError(f"compress recipe: the settings of {kind} must be a mapping")
    try:
        if kind == "quantize":
            return QuantConfig(**settings)
        if kind == "moefy":
            steps = settings.pop("router_steps", 300)
            return MoEStep(moe=MoEConfig(**settings), router_steps=_positive(steps, "moefy router_steps"))
        if kind == "distill":
            steps, lr = settings.pop("steps", 100), settings.pop("lr", 1e-4)
            return TrainingStep(steps=_positive(steps, "distill steps"), lr=_rate(lr, "distill lr"),
                                distill=DistillConfig(**settings))
        if kind == "sparse24":
            method = settings.pop("method", "magnitude")
            if method not in SPARSITY_METHODS:
                raise CpmliveError(f"compress recipe: sparse24: method must be one of {', '.join(SPARSITY_METHODS)}, "
                                   f"got {method!r}")
            steps, lr, distill = settings.pop("steps", 0), settings.pop("lr", 1e-4), settings.pop("distill", None)
            if settings:
                raise CpmliveError(f"compress recipe: sparse24: unknown key {sorted(settings)[0]!r}")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise CpmliveError(f"compress recipe: sparse24 steps must be an integer >= 0, got {steps!r}")
            return TrainingStep(steps=steps, lr=_rate(lr, "sparse24 lr"), sparse24=method,
                                distill=DistillConfig(**distill) if distill is not None else None)
        if kind == "qat":
            steps, lr, distill = settings.pop("steps", 100), settings.pop("lr", 1e-5), settings.pop("distill", None)
            if settings:
                raise CpmliveError(f"compress recipe: qat: unknown key {sorted(settings)[0]!r}")
            return TrainingStep(steps=_positive(steps, "qat steps"), lr=_rate(lr, "qat lr"),
                                distill=DistillConfig(**distill) if distill is not None else None)
        distill = settings.pop("distill", None)
        prune = PruneConfig(**settings)
        return TrainingStep(steps=prune.steps, lr=prune.lr, prune=prune,
                            distill=DistillConfig(**distill) if distill is not None else None)
    except TypeError as exc:
        raise CpmliveError(f"compress recipe: {kind}: {exc}") from None


def _rate(value: object, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise CpmliveError(f"compress recipe: {name} must be a number >= 0 (YAML reads 1e-4 as text: "
                           f"write 1.0e-4 or 0.0001), got {value!r}")
    return float(value)


def _positive(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CpmliveError(f"compress recipe: {name} must be a positive integer, got {value!r}")
    return value


def abilities_needed(step: dict[str, Any]) -> list[str]:
    """The family abilities (:data:`cpmlive.model.registry.ABILITIES`) a step needs of its model."""
    kind = CompressRecipe.kind(step)
    if kind == "quantize":
        # a recipe calibrates on rows of its token store, which only "retrain" families read
        return [] if step_settings(step).method == "rtn" else ["calibrate", "retrain"]
    return [{"prune": "prune", "moefy": "moefy"}.get(kind, "retrain")]


# ---- running -------------------------------------------------------------------------------------


def compress(src: str | Path, out: str | Path, recipe: CompressRecipe, resume: str | None = None,
             force: bool = False) -> Path:
    """Run every step of ``recipe`` on ``src`` and write the result to the model directory ``out``."""
    parallel, finished = Replicas.join(), False
    try:
        written = _compress(src, out, recipe, resume, force, parallel)
        finished = True
        return written
    finally:
        parallel.close(finished)


def _compress(src: str | Path, out: str | Path, recipe: CompressRecipe, resume: str | None, force: bool,
              parallel: Replicas) -> Path:
    """:func:`compress` on every rank of a torchrun job (or alone): the training steps split
    each batch over the ranks (``train.distributed.Replicas``), rank 0 writes every file."""
    parallel.check_batch(recipe.batch_size)
    out = parallel.on_main(lambda: check_output(out, force))
    run_dir = out.with_name(out.name + ".run")
    parallel.on_main(lambda: check_run_dir(run_dir, out, resume))
    family = family_of(src)
    for step in recipe.steps:
        for ability in abilities_needed(step):
            family.require(ability)
    device = parallel.device_for(recipe.device)
    original, directory = family.load(src, dtype=torch.float32, device=device)
    if original.config.quantization is not None:
        raise CpmliveError(f"{src}: already quantized; compress its float checkpoint")
    def mark() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_MARKER, json.dumps({"output": str(out), "source": str(src)}) + "\n")

    parallel.on_main(mark)
    vocab = checkpoint_vocab(directory)
    model = original
    history = []
    for index, step in enumerate(recipe.steps, 1):
        kind = CompressRecipe.kind(step)
        step_dir = run_dir / f"step-{index}-{kind}"
        if (step_dir / DONE).is_dir():
            model = family_of(step_dir / DONE).load(step_dir / DONE)[0]  # the step's model, as it saved it
        else:
            settings = step_settings(step)
            if isinstance(settings, QuantConfig):
                model = quantize_model(copy.deepcopy(model), settings, _calibration(recipe, model))
            elif isinstance(settings, MoEStep):
                model = _moefied(copy.deepcopy(model), settings, _calibration(recipe, model))
            else:
                if kind == "qat":
                    settings = dataclasses.replace(settings, qat=step_settings(recipe.steps[-1]))
                label = f"{index}/{len(recipe.steps)} {kind}"
                calibration = _calibration(recipe, model) if settings.sparse24 == "wanda" else None
                model = TrainingRun(model, original, settings, recipe, step_dir, label, calibration,
                                    objective=family.pretrain_objective, parallel=parallel).run()
            parallel.on_main(lambda: save_checkpoint(model.state_dict(), model.config, step_dir / DONE, vocab=vocab))
        history.append({"step": kind, "settings": step[kind] or {}, "parameters": model.num_parameters()})
    record = {"source": str(src), "parameters": original.num_parameters(), "steps": history,
              "data": recipe.data, "seed": recipe.seed}

    def write() -> Path:
        written = save_checkpoint(model.state_dict(), model.config, out, vocab=vocab)
        atomic_write_text(written / COMPRESSION_NAME, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return written

    return parallel.on_main(write)


def check_run_dir(run_dir: Path, out: Path, resume: str | None) -> None:
    """``OUT.run/`` is new or empty, or (to resume) a compress run: one with the marker this writes
    first, or only ``step-N-kind`` directories (a run from before the marker)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CpmliveError(f"{run_dir} is a file; compress keeps its run there: move it away")
    entries = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    if not entries:
        return
    ours = (run_dir / RUN_MARKER).is_file() or all(STEP_DIR.fullmatch(entry.name) for entry in entries)
    if not ours:
        raise CpmliveError(f"{run_dir} exists and is not a compress run (no {RUN_MARKER}); compress keeps its run "
                           "there: move it away or choose another OUT")
    if resume is None:
        raise CpmliveError(f"{run_dir} holds an earlier compress run of {out}; continue it with --resume auto "
                           "or remove it")


def _moefied(model: nn.Module, settings: MoEStep, calibration: list | None) -> nn.Module:
    inputs = ffn_inputs(model, calibration) if settings.moe.router == "mlp" else []
    layers = moefy(model, settings.moe.experts, settings.moe.top_k, settings.moe.router, settings.moe.router_hidden)
    for layer, rows in zip(layers, inputs):
        train_router(layer, rows, steps=settings.router_steps)
    return model.eval()


def _calibration(recipe: CompressRecipe, model: nn.Module) -> list | None:
    if not recipe.data:
        return None
    store = TokenStore(recipe.data, "train")
    order = list(range(store.num_documents))
    random.Random(recipe.seed).shuffle(order)
    documents = (store.document(index).tolist()[1:-1] for index in order)
    rows = calibration_rows(documents, recipe.calibration_rows, recipe.seq_length - model.config.prompt_length - 1)
    return calibration_batches(rows[:recipe.calibration_rows], int(store.meta["bos_id"]), model.config.prompt_length)


class TrainingRun:
    """One prune, distill, sparse24 or qat step: a loop of optimizer steps over the store's batches
    (under ``objective``, the one the model's family pretrains with) with checkpoints, exact resume
    and a progress bar."""

    def __init__(self, model: nn.Module, original: nn.Module, settings: TrainingStep, recipe: CompressRecipe,
                 step_dir: Path, label: str, calibration: list | None = None,
                 objective: str = INFILL_GENERATE, parallel: Replicas | None = None) -> None:
        self.settings, self.recipe, self.step_dir, self.label = settings, recipe, step_dir, label
        self.parallel = parallel or Replicas()
        self.student = copy.deepcopy(model)
        self.teacher = original.eval() if settings.distill is not None else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        torch.manual_seed(recipe.seed)
        if settings.qat is not None:
            attach_fake_quant(self.student, settings.qat)
        self.masks = sparsify_2of4(self.student, settings.sparse24, calibration) if settings.sparse24 else None
        self.gates = GateTrainer(self.student, settings.prune) if settings.prune is not None else None
        self.optimizer = self.gates.optimizer if self.gates else torch.optim.AdamW(self.student.parameters(),
                                                                                     lr=settings.lr, weight_decay=0.0)
        store = TokenStore(recipe.data, "train")
        self.stream = PretrainStream(store, recipe.seq_length, recipe.batch_size, seed=recipe.seed,
                                     prompt_length=model.config.prompt_length, vocab_size=model.config.vocab_size,
                                     objective=objective)
        self.step = 0

    def loss(self, batch) -> Callable[[nn.Module], torch.Tensor]:
        if self.teacher is None:
            return lambda model: masked_lm_loss(model, batch)[0]
        return lambda model: distillation_loss(model, self.teacher, batch, self.settings.distill)[0]

    def state(self) -> dict[str, Any]:
        state = {"step": self.step, "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "stream": self.stream.state_dict(), "rng": rng_state()}
        if self.masks is not None:
            state["sparsity_masks"] = self.masks
        if self.gates is not None:
            state.update(masks=self.gates.masks.state_dict(), lagrangian=self.gates.lagrangian.state_dict(),
                         ascent=self.gates.ascent.state_dict(), gate_steps=self.gates.step_count)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        if self.masks is not None:
            self.masks = state["sparsity_masks"]
        if self.gates is not None:
            self.gates.masks.load_state_dict(state["masks"])
            self.gates.lagrangian.load_state_dict(state["lagrangian"])
            self.gates.ascent.load_state_dict(state["ascent"])
            self.gates.step_count = state["gate_steps"]

    def save(self) -> None:
        state = self.state()
        self.parallel.on_main(lambda: write_checkpoint(self.step_dir, self.step, self.recipe.keep_checkpoints,
                                                       lambda build: torch.save(state, build / TRAINER_STATE)))

    def run(self) -> nn.Module:
        found = resume_point(self.step_dir, "auto", lambda path: read_trainer_state(path, ("step", "model")))
        if found is not None:
            self.restore(found[1])
        main = self.parallel.is_main
        log = MetricsLog(self.step_dir, self.step) if main else NullLog()
        bar = progress_bar(self.settings.steps, self.step, f"compress {self.label}", self.recipe.progress and main)
        try:
            with StopRequest() as stop:
                while self.step < self.settings.steps:
                    record = self.one_step()
                    log.write({"type": "train", "step": self.step, **record})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
                    stopping = self.parallel.stop_agreed(stop.requested)
                    if self.step % self.recipe.save_every == 0 or self.step == self.settings.steps or stopping:
                        self.save()
                    if stopping:
                        raise KeyboardInterrupt
        finally:
            log.close()
            if bar is not None:
                bar.close()
        if self.gates is not None:
            return self.gates.finish()
        return detach_fake_quant(self.student).eval()

    def one_step(self) -> dict[str, float]:
        self.step += 1
        parallel = self.parallel
        batch = rows_of_rank(self.stream.next_batch(), parallel.rank, parallel.world)
        batch = batch.to(next(self.student.parameters()).device)
        weight = int((batch.target != IGNORE_INDEX).sum())  # both losses are means over the target tokens
        factor, _ = parallel.share(weight)
        if self.gates is not None:
            record = self.gates.step(self.loss(batch), scale=factor, sync=parallel.average_gradients)
            return {**record, "loss": parallel.weighted_mean(record["loss"], weight)}
        self.student.train()
        loss = self.loss(batch)(self.student)
        (loss * factor).backward()
        parallel.average_gradients([p for p in self.student.parameters() if p.requires_grad])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masks is not None:
            apply_masks(self.student, self.masks)
        return {"loss": parallel.weighted_mean(loss.item(), weight)}


__all__ = ["CompressRecipe", "abilities_needed", "compress", "step_settings"]
