"""The alignment recipes, ``cpmlive align sft|rm|dpo|ppo|grpo``, on fine-tuning's loop (steps,
validation every N steps, the best adapter kept, exact resume, Ctrl-C saves; see
``tune.finetune``), with LoRA on the policy by default.

* ``sft``: the completion's (assistant turns') token-mean cross-entropy.
* ``rm``: backbone + LoRA + a scalar head on the last token, pairwise logistic loss; the head
  is saved beside the adapter (``reward_head.safetensors``).
* ``dpo``: DPO / robust DPO / IPO; the reference is the same base with the adapter off.
* ``ppo``: sampled rollouts, the reward model's score minus ``kl_coef``·KL to the reference, a
  value head on the policy's hidden states, GAE, clipped policy and value losses.
* ``grpo``: ``num_samples`` rollouts per prompt, group-relative advantages, no critic.

The rollout recipes score with a reward model (``reward_model=DIR``, an ``rm`` run's adapter on
the same base, attached to the one copy of the weights as adapter ``reward``) or, for
``reward=rouge``, with ROUGE-L against the record's reference answer. Metrics use TRL's names.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from rouge_score import rouge_scorer

from cpmlive.align import losses
from cpmlive.align.bee import answer_scores, sample_task_answers
from cpmlive.align.policy import (Pair, ScalarHead, completion_hidden, completion_logprobs, is_task_pair, reference_of,
                                  sample_completions, sequence_scores, target_ids, token_logprobs)
from cpmlive.data.bee import Example, answers_of, blank_answers, preference_tasks, training_example, tuning_tasks
from cpmlive.data.align import (TRUNCATION_MODES, PreferencePair, PromptedText, preference_pairs, prompts, sft_examples,
                                starts_with_bos, text_ids, truncate_prompt)
from cpmlive.data.chat import ChatTemplate
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import read_safetensors, save_checkpoint, save_safetensors
from cpmlive.model.registry import family_of
from cpmlive.recipe import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bound, LoopArgs
from cpmlive.train.checkpoints import check_optimizer_fits, cleaned_up_on_failure, read_trainer_state, warn
from cpmlive.train.core import memory_mb
from cpmlive.train.metrics import finite_or_none
from cpmlive.tune import delta as deltas
from cpmlive.tune.finetune import BEST, Finetuner, TuneArgs, resolve_model_path, run_recipe
from cpmlive.tune.metrics import CharTokenizer
from cpmlive.tune.task import TaskSpec
from cpmlive.utils import atomic_write_text

METHODS = ("sft", "rm", "dpo", "ppo", "grpo")
REWARD_HEAD = "reward_head.safetensors"
WEIGHT = "_weight"  # a batch loss's metrics key: what its loss is a mean over, when not its items
VALUE_HEAD = "value_head.safetensors"
ALIGN_FILE = "align.json"
REWARD_ADAPTER = "reward"
REFERENCE_ADAPTER = "reference"


@dataclass
class AlignConfig(TuneArgs):
    method: str = "sft"
    out: str = "runs/align"
    adapter: str = ""  # start from this adapter (an SFT run's best/); a frozen copy of it is the reference
    tuning: str = "lora"  # lora: the delta on a frozen base; full: every weight (best/ is a checkpoint)
    max_input_tokens: int = 160
    # pre-1.0 TRL's prompt truncation (1.16 cuts only whole sequences): a prompt over max_prompt_length
    # tokens keeps <s> and its last (keep_end) or first (keep_start) max_prompt_length - 1; 0: none, and
    # a prompt over max_input_tokens is refused
    max_prompt_length: int = 0
    truncation_mode: str = "keep_end"
    epochs: float = 1.0
    warmup_steps: int = 10
    # dpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    # ppo / grpo
    reward: str = "model"
    reward_model: str = ""
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    missing_eos_penalty: float = 0.0  # TRL's: subtracted from the score of a rollout that never ends
    temperature: float = 1.0
    ppo_epochs: int = 2
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    num_samples: int = 4
    eval_prompts: int = 32

    RANGES: ClassVar[dict[str, Bound]] = {
        **TuneArgs.RANGES, "max_input_tokens": Bound(2),  # a prompt needs <s> and one token
        "max_prompt_length": NON_NEGATIVE,
        "beta": POSITIVE, "label_smoothing": Bound(0, 0.5, high_open=True), "kl_coef": NON_NEGATIVE,
        "temperature": POSITIVE, "ppo_epochs": AT_LEAST_ONE, "missing_eos_penalty": NON_NEGATIVE,
        "clip_range": POSITIVE, "clip_range_value": POSITIVE, "vf_coef": NON_NEGATIVE, "gamma": Bound(0, 1),
        "lam": Bound(0, 1), "num_samples": Bound(2), "eval_prompts": AT_LEAST_ONE,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **LoopArgs.CHOICES, "method": METHODS, "loss_type": losses.DPO_LOSSES,
        "reward": ("model", "rouge"), "kl_estimator": losses.KL_ESTIMATORS, "tuning": ("lora", "full"),
        "truncation_mode": TRUNCATION_MODES,
    }
    VERB: ClassVar[str] = "align"

    def check(self) -> None:
        super().check()
        if self.method in ("ppo", "grpo") and self.reward == "model" and not self.reward_model:
            raise CpmliveError(f"config: {self.method} needs reward_model=DIR (an `align rm` run's best adapter) "
                               "or reward=rouge")
        if self.method == "ppo" and self.max_steps < 1:
            raise CpmliveError("config: ppo runs for max_steps rollout batches; set max_steps")
        if self.method == "grpo" and self.max_steps < 1:
            raise CpmliveError("config: grpo runs for max_steps rollout batches; set max_steps")
        if self.tuning == "full" and self.adapter:
            raise CpmliveError("config: full tuning starts from model= (e.g. a full SFT run's best/), not adapter=")
        if self.max_prompt_length and not 2 <= self.max_prompt_length <= self.max_input_tokens:
            raise CpmliveError(f"config: max_prompt_length must be 0 (no truncation) or 2..max_input_tokens "
                               f"({self.max_input_tokens}): <s> and at least one token; got {self.max_prompt_length}")

    @property
    def chosen_metric(self) -> str:
        return {"sft": "loss", "rm": "accuracy", "dpo": "loss", "ppo": "reward", "grpo": "reward"}[self.method]


def chat_spec(template: ChatTemplate, config: AlignConfig) -> TaskSpec:
    """The task spec saved with an aligned adapter: ``generate`` wraps a prompt in the chat
    template's user turn and opens the assistant's, as training saw it."""
    wrapped = template.render([{"role": "user", "content": "\x00"}]).replace("{", "{{").replace("}", "}}")
    return TaskSpec("generate", wrapped.replace("\x00", "{input}"), config.max_input_tokens, config.max_output_tokens)


class AlignTrainer(Finetuner):
    """Shared set-up: the policy (base + delta), the tokenizer, the data, the loop's state."""

    needs_reference: ClassVar[bool] = False
    evaluate_first: ClassVar[bool] = False
    reads_tasks: ClassVar[bool] = True  # it trains on CPM-Bee's filled tasks too

    def __init__(self, config: AlignConfig, resume: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.out)
        path = resolve_model_path(config.model)
        kind = family_of(path)
        kind.require("align")
        self.tasks = kind.can("bee")  # CPM-Bee aligns on JSON tasks: its records are filled tasks
        if self.tasks and not self.reads_tasks:
            raise CpmliveError(f"align {config.method} reads the text layout; CPM-Bee aligns with sft, rm, dpo and "
                               "grpo on JSON tasks")
        self.start_run(resume)
        self.model_path = path
        self.vocab_path = path / kind.vocab_name
        self.tokenizer = kind.tokenizer.from_file(self.vocab_path)
        self.model = kind.load(path, dtype=torch.float32)[0].train()
        limit = self.model.config.max_length - self.model.config.prompt_length - 1
        if config.max_input_tokens + config.max_output_tokens > limit:
            raise CpmliveError(f"config: max_input_tokens + max_output_tokens is {config.max_input_tokens} + "
                               f"{config.max_output_tokens}; the model takes at most {limit}")
        self.template = ChatTemplate.load(path) or ChatTemplate()
        self.spec = chat_spec(self.template, config)
        self.heads: dict[str, ScalarHead] = {}
        self.attach_models()
        self.attach_policy()
        self.train_pairs = self.read(config.data)
        self.eval_pairs = self.read(config.eval) if config.eval else []
        self._prepare_run(resume)

    def attach_models(self) -> None:
        """Anything attached before the trained adapter (a frozen reward adapter)."""

    def attach_policy(self) -> None:
        """The trained adapter: a new delta, or a copy of ``adapter`` (another copy, frozen, is the
        reference: TRL's way of re-training an adapter). Full tuning trains every weight, and a
        second, frozen copy of the model is the reference."""
        self.reference: str | None = None
        self.reference_model: torch.nn.Module | None = None
        if self.config.tuning == "full":
            self.delta = None
            if self.needs_reference:
                self.reference_model = family_of(self.model_path).load(self.model_path, dtype=torch.float32)[0].eval()
                self.reference_model.requires_grad_(False)
            self.model.requires_grad_(True)
            return
        if self.config.adapter:
            if self.needs_reference:
                self.reference = deltas.load_adapter(self.model, self.config.adapter, name=REFERENCE_ADAPTER)
            deltas.load_adapter(self.model, self.config.adapter, name="default", trainable=True)
            self.delta = deltas.delta_state(self.model).configs["default"]
        else:
            self.delta = deltas.DeltaConfig.from_dict(self.config.delta)
            deltas.attach(self.model, self.delta)

    def progress_label(self) -> str:
        return f"align {self.config.method}"

    def move_to_device(self) -> None:
        """The policy, its reference, reward model and heads, on the recipe's device; under
        torchrun the frozen copies full tuning keeps (reference, reward model) are sharded."""
        for module in (self.model, self.reference_model, getattr(self, "reward_model", None),
                       getattr(self, "reward_head", None), *self.heads.values()):
            if module is not None:
                module.to(self.device)
        if self.reference_model is not None:
            self.reference_model = self.parallel.shard_frozen(self.reference_model)
            self.evaluate_everywhere = self.parallel.world > 1
        reward = getattr(self, "reward_model", None)
        if reward is not None and reward is not self.model:
            self.reward_model = self.parallel.shard_frozen(reward)
            self.evaluate_everywhere = self.parallel.world > 1

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        heads = [p for head in self.heads.values() for p in head.parameters()]
        return [p for p in self.model.parameters() if p.requires_grad] + heads

    # ---- encoding --------------------------------------------------------------------------

    def prompt_ids(self, text: str, where: str) -> list[int]:
        """``<s>`` and the prompt's ids, cut to ``max_prompt_length`` as TRL cuts a prompt (``<s>``
        stays: CPM-Ant reads it first); a prompt still over ``max_input_tokens`` is refused."""
        config = self.config
        ids = text_ids(self.tokenizer, text)
        # the start token, where the tokenizer has one and the chat template did not write it
        starts = starts_with_bos(self.tokenizer) and ids[:1] != [self.tokenizer.bos_id]
        if config.max_prompt_length:
            ids = truncate_prompt(ids, config.max_prompt_length - starts, config.truncation_mode)
        ids = [self.tokenizer.bos_id, *ids] if starts else ids
        if len(ids) > config.max_input_tokens:
            raise CpmliveError(f"{where}: the prompt is {len(ids)} tokens (with <s> and the chat template); "
                               f"max_input_tokens is {config.max_input_tokens}: shorten it, raise the limit or "
                               "set max_prompt_length=N (truncation_mode=keep_end|keep_start) to cut it")
        return ids

    def completion_ids(self, text: str) -> list[int]:
        ids = text_ids(self.tokenizer, text)
        return ids[:self.config.max_output_tokens] + [self.tokenizer.eos_id]

    def read(self, path: str) -> list:
        raise NotImplementedError

    # ---- one step --------------------------------------------------------------------------

    def step_record(self, step: int, lr: float, metrics: dict[str, float], tokens: int,
                    seconds: float) -> dict[str, Any]:
        pos = self.position
        return {"type": "train", "step": step, "epoch": pos.epoch + pos.index / max(len(self.train_pairs), 1),
                **{k: finite_or_none(float(v)) for k, v in metrics.items()}, "lr": lr, "tokens": pos.tokens,
                "tokens_per_s": tokens / seconds, "memory_mb": round(memory_mb(), 1),
                "elapsed_s": round(pos.elapsed, 3), "time": time.time(), "method": self.config.method}

    def optimize(self) -> tuple[dict[str, float], int]:
        """Gradient-accumulated batches of :meth:`batch_loss`, one optimizer step."""
        totals: dict[str, float] = {}
        tokens = 0
        for _ in range(self.config.grad_accum):
            items = self.parallel.rows(self.next_pairs())
            with self.autocast():
                loss, metrics = self.batch_loss(items)
            weight = metrics.pop(WEIGHT, len(items))  # what the loss is a mean over: pairs, or tokens
            factor, _ = self.parallel.share(weight)
            (loss * factor / self.config.grad_accum).backward()
            figures = {"loss": self.parallel.weighted_mean(loss.item(), weight), **self.parallel.average(metrics)}
            for name, value in figures.items():
                totals[name] = totals.get(name, 0.0) + value / self.config.grad_accum
            tokens += self.count_tokens(items)
        totals["grad_norm"] = self.apply_gradients()
        return totals, self.parallel.total(tokens)

    def batch_loss(self, items: list) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def count_tokens(self, items: list) -> int:
        return sum(sum(len(part) for part in item if isinstance(part, (list, Example))) for item in items)

    def task_example(self, task: dict, where: str) -> Example:
        """A filled CPM-Bee task as training reads it, refused when it does not fit the model."""
        example = training_example(self.tokenizer, task)
        limit = self.model.config.max_length
        if len(example) > limit:
            raise CpmliveError(f"{where}: the task is {len(example)} tokens long; the model takes at most {limit}")
        return example

    # ---- validation and saving -------------------------------------------------------------

    def run(self):
        """The loop; a rollout recipe first measures the policy it starts from (step 0)."""
        if self.evaluate_first and self.position.step == 0 and self.eval_pairs:
            self.log_eval(0, self.evaluate(), best=False)
        return super().run()

    def save_adapter(self, directory: Path, metrics: dict[str, Any] | None = None) -> None:
        if self.config.tuning == "full":
            save_checkpoint(self.model, self.model.config, directory, vocab=self.vocab_path)
        else:
            deltas.save_adapter(self.model, directory, "default", base_model_name_or_path=str(self.config.model))
        self.spec.save(directory)
        self.template.save(directory)
        shutil.copyfile(self.vocab_path, directory / self.vocab_path.name)
        self.save_heads(directory)
        atomic_write_text(directory / ALIGN_FILE, json.dumps({"method": self.config.method, "model": self.config.model},
                                                             indent=2) + "\n")
        if metrics is not None:
            atomic_write_text(directory / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    def save_heads(self, directory: Path) -> None:
        """The trained scalar heads beside the adapter."""

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        if self.config.tuning == "full":
            state = read_trainer_state(path, ("optimizer", "position", "rng"))
            check_optimizer_fits(self.optimizer, state["optimizer"], path)
            weights = family_of(path / "adapter").load(path / "adapter", dtype=torch.float32)[0].state_dict()
            with torch.no_grad():
                for name, tensor in self.model.state_dict().items():
                    tensor.copy_(weights[name])
        else:
            state = super().read_checkpoint(path)
        self.load_heads(path / "adapter")
        return state

    def load_heads(self, directory: Path) -> None:
        """Refill the trained scalar heads from a saved adapter directory."""

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference model, under no_grad: the policy with its trained adapter off, or
        the separate copy full tuning keeps."""
        if self.reference_model is not None:
            with torch.no_grad():
                yield self.reference_model
        else:
            with reference_of(self.model, self.reference):
                yield self.model

    # ---- shared measurements ---------------------------------------------------------------

    def pair_logprobs(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logprobs(self.model, pairs)


def pair_logprobs(model: torch.nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's summed log-probability and its token count."""
    if is_task_pair(pairs):
        sums, counts, _ = answer_scores(model, [example for _, example in pairs])
        return sums, counts
    logps, mask = completion_logprobs(model, pairs)
    return logps.sum(1), mask.sum(1)


# ---- SFT --------------------------------------------------------------------------------------------


class SftTrainer(AlignTrainer):
    def read(self, path: str) -> list[Pair]:
        if self.tasks:
            return [(where, self.task_example(task, where)) for where, task in tuning_tasks(path)]
        return [(self.prompt_ids(e.prompt, e.where or path), self.completion_ids(e.completion))
                for e in sft_examples(path, self.template)]

    def batch_loss(self, items: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        logps, tokens = self.pair_logprobs(items)
        return -logps.sum() / tokens.sum(), {WEIGHT: tokens.sum().item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            total, count = 0.0, 0.0
            for start in range(0, len(self.eval_pairs), self.config.batch_size):
                logps, tokens = self.pair_logprobs(self.eval_pairs[start:start + self.config.batch_size])
                total, count = total - logps.sum().item(), count + tokens.sum().item()
            return {"loss": total / max(count, 1)}
        finally:
            self.model.train()


# ---- preference recipes -------------------------------------------------------------------------------


class PreferenceTrainer(AlignTrainer):
    """Pairs ``(prompt ids, chosen ids, rejected ids)``."""

    def read(self, path: str) -> list[tuple[list[int], list[int], list[int]]]:
        if self.tasks:  # CPM-Bee: two fillings of one task
            return [(where, self.task_example(chosen, where), self.task_example(rejected, where))
                    for where, chosen, rejected in preference_tasks(path)]
        out, same = [], 0
        for pair in preference_pairs(path, self.template):
            chosen, rejected = self.completion_ids(pair.chosen), self.completion_ids(pair.rejected)
            if chosen == rejected:
                same += 1
                continue
            out.append((self.prompt_ids(pair.prompt, pair.where), chosen, rejected))
        if same:
            warn(f"{path}: {same} pairs left out, their answers being the same once cut to "
                 f"max_output_tokens={self.config.max_output_tokens}")
        if not out:
            raise CpmliveError(f"{path}: no pair differs within max_output_tokens={self.config.max_output_tokens}")
        return out

    @staticmethod
    def split(items: list) -> tuple[list[Pair], list[Pair]]:
        return [(p, c) for p, c, _ in items], [(p, r) for p, _, r in items]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            sums: dict[str, float] = {}
            for start in range(0, len(self.eval_pairs), self.config.batch_size):
                chunk = self.eval_pairs[start:start + self.config.batch_size]
                loss, metrics = self.batch_loss(chunk)
                for name, value in {"loss": loss.item(), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value * len(chunk)
            return {name: value / len(self.eval_pairs) for name, value in sums.items()}
        finally:
            self.model.train()


class RewardTrainer(PreferenceTrainer):
    def attach_models(self) -> None:
        self.heads["reward"] = ScalarHead(self.model.config.dim_model)

    def batch_loss(self, items: list) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.split(items)
        scores = sequence_scores(self.model, self.heads["reward"], chosen + rejected)
        chosen_scores, rejected_scores = scores.chunk(2)
        loss = losses.reward_loss(chosen_scores, rejected_scores)
        margin = (chosen_scores - rejected_scores).detach()
        return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
                      "mean_reward": scores.mean().item()}

    def save_heads(self, directory: Path) -> None:
        save_safetensors({k: v.detach() for k, v in self.heads["reward"].state_dict().items()}, directory / REWARD_HEAD)

    def load_heads(self, directory: Path) -> None:
        load_head(self.heads["reward"], directory / REWARD_HEAD)


class DpoTrainer(PreferenceTrainer):
    needs_reference = True

    def batch_loss(self, items: list) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.split(items)
        logps, tokens = self.pair_logprobs(chosen + rejected)
        with self.as_reference() as model:
            reference, _ = pair_logprobs(model, chosen + rejected)
        config = self.config
        (pc, pr), (rc, rr), (tc, tr) = logps.chunk(2), reference.chunk(2), tokens.chunk(2)
        result = losses.dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing, config.loss_type, tc, tr)
        return result.losses.mean(), {**result.metrics(), "logps/chosen": pc.mean().item(),
                                      "logps/rejected": pr.mean().item()}


# ---- rollout recipes ----------------------------------------------------------------------------------


def load_head(head: ScalarHead, path: Path) -> None:
    if not path.is_file():
        raise CpmliveError(f"{path.parent}: no {path.name} (not a reward model made by `cpmlive align rm`)")
    head.load_state_dict(read_safetensors(path))


_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over characters, as ``tune.metrics.rouge`` counts it (0 for an empty side)."""
    if not candidate.strip() or not reference.strip():
        return 0.0
    return _ROUGE_L.score(reference, candidate)["rougeL"].fmeasure


class RolloutTrainer(AlignTrainer):
    """Prompts in, sampled completions scored by a reward (model or ROUGE-L)."""

    needs_reference = True
    evaluate_first = True

    def attach_models(self) -> None:
        if self.config.reward != "model":
            return
        directory = Path(self.config.reward_model)
        marker = directory / ALIGN_FILE
        if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")).get("method") != "rm":
            raise CpmliveError(f"{directory}: not a reward model (an `align rm` run's best/ directory)")
        self.reward_model = self.model
        if self.config.tuning == "full":  # the policy's weights move: the reward model keeps its own copy
            base = resolve_model_path(json.loads(marker.read_text(encoding="utf-8")).get("model", self.config.model))
            self.reward_model = family_of(base).load(base, dtype=torch.float32)[0].eval()
        deltas.load_adapter(self.reward_model, directory, name=REWARD_ADAPTER)
        self.reward_head = ScalarHead(self.model.config.dim_model)
        load_head(self.reward_head, directory / REWARD_HEAD)
        self.reward_head.requires_grad_(False)

    def read(self, path: str) -> list[tuple[list[int], str]]:
        if self.tasks:  # CPM-Bee: filled tasks, their answers the references
            return [(blank_answers(task), "\n".join(text for _, text in answers_of(task)))
                    for _, task in tuning_tasks(path)]
        records = prompts(path, self.template)
        if self.config.reward == "rouge":
            missing = next((p for p in records if not p.completion.strip()), None)
            if missing is not None:
                raise CpmliveError(f"{missing.where}: reward=rouge scores against a reference answer; this record "
                                   "has no 'completion' or 'chosen'")
        return [(self.prompt_ids(p.prompt, p.where or path), p.completion) for p in records]

    def count_tokens(self, items: list) -> int:
        return sum(len(ids) for ids, _ in items) if not self.tasks else len(items)

    def sample(self, prompt_rows: list[list[int]]) -> list[list[int]]:
        self.model.eval()
        try:
            return sample_completions(self.model, prompt_rows, self.config.max_output_tokens, self.tokenizer.eos_id,
                                      self.config.temperature)
        finally:
            self.model.train()

    def text(self, pair: Pair) -> str:
        """A rollout's answer text (a CPM-Bee rollout carries it: its answers, a line each)."""
        if self.tasks:
            return pair[0][0]
        return self.tokenizer.decode([i for i in pair[1] if i != self.tokenizer.eos_id])

    def unfinished(self, pair: Pair) -> bool:
        return not pair[0][1] if self.tasks else pair[1][-1] != self.tokenizer.eos_id

    @torch.no_grad()
    def rewards(self, pairs: list[Pair], references: list[str]) -> torch.Tensor:
        """Each rollout's score; one that ran out of tokens before ``</s>`` loses
        ``missing_eos_penalty`` (a reward model that likes long answers is otherwise gamed by length)."""
        if self.config.reward == "rouge":
            scores = torch.tensor([rouge_l(self.text(pair), ref) for pair, ref in zip(pairs, references)])
        else:
            with deltas.active_adapter(self.reward_model, REWARD_ADAPTER):
                scores = sequence_scores(self.reward_model, self.reward_head, pairs).float()
        unfinished = torch.tensor([self.unfinished(pair) for pair in pairs])
        return scores - self.config.missing_eos_penalty * unfinished.float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward and KL of sampled answers to the first ``eval_prompts`` dev prompts."""
        items = self.eval_pairs[:self.config.eval_prompts]
        state = torch.random.get_rng_state()
        torch.manual_seed(self.config.seed + 1)  # the same draws every time: comparable across steps
        try:
            pairs, references = self.rollout(items, 1)
            scores = self.rewards(pairs, references)
            logps, mask = completion_logprobs(self.model, pairs)
            with self.as_reference() as model:
                reference, _ = completion_logprobs(model, pairs)
        finally:
            torch.random.set_rng_state(state)
        kl = ((logps - reference) * mask).sum(1)
        return {"reward": scores.mean().item(), "kl": kl.mean().item(),
                "length": mask.sum(1).mean().item()}

    def rollout(self, items: list[tuple[list[int], str]], copies: int) -> tuple[list[Pair], list[str]]:
        rows = [ids for ids, _ in items for _ in range(copies)]
        references = [ref for _, ref in items for _ in range(copies)]
        if self.tasks:
            return self.task_rollouts(rows), references
        completions = self.sample(rows)
        return [(p, c if c else [self.tokenizer.eos_id]) for p, c in zip(rows, completions)], references


    def task_rollouts(self, tasks: list[dict]) -> list[Pair]:
        """CPM-Bee rollouts: ``((answer text, finished), filled task as training reads it)``."""
        self.model.eval()
        try:
            sampled = sample_task_answers(self.model, self.tokenizer, tasks, self.config.max_output_tokens,
                                          self.config.temperature)
        finally:
            self.model.train()
        return [(("\n".join(text for _, text in answers_of(task)), finished), training_example(self.tokenizer, task))
                for task, finished in sampled]


class PpoTrainer(RolloutTrainer):
    reads_tasks = False  # its value head reads the text layout
    def attach_models(self) -> None:
        super().attach_models()
        self.heads["value"] = ScalarHead(self.model.config.dim_model)

    def policy_and_values(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, mask = completion_hidden(self.model, pairs)
        logps = token_logprobs(self.model, hidden, target_ids(pairs, hidden.device), mask)
        return logps, self.heads["value"](hidden) * mask, mask

    def optimize(self) -> tuple[dict[str, float], int]:
        config = self.config
        items = self.parallel.rows(self.next_pairs())
        pairs, references = self.rollout(items, 1)
        scores = self.rewards(pairs, references)
        with torch.no_grad():
            old_logps, old_values, mask = self.policy_and_values(pairs)
            with self.as_reference() as model:
                ref_logps, _ = completion_logprobs(model, pairs)
        rewards, kl = losses.shaped_rewards(scores, old_logps, ref_logps, mask, config.kl_coef, config.kl_estimator)
        advantages, returns = losses.generalized_advantages(rewards, old_values, mask, config.gamma, config.lam)
        stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            with self.autocast():
                logps, values, _ = self.policy_and_values(pairs)
            policy_loss, policy_clip = losses.clipped_policy_loss(logps, old_logps, advantages, mask, config.clip_range)
            value_loss, value_clip = losses.clipped_value_loss(values, old_values, returns, mask,
                                                               config.clip_range_value)
            # both losses are means over the batch's completion tokens
            ((policy_loss + config.vf_coef * value_loss) * self.parallel.share(mask.sum().item())[0]).backward()
            grad_norm = self.apply_gradients()
            for name, value in (("loss/policy_avg", policy_loss), ("loss/value_avg", value_loss),
                                ("policy/clipfrac_avg", policy_clip), ("val/clipfrac_avg", value_clip)):
                stats.setdefault(name, []).append(value.item())
            stats.setdefault("grad_norm", []).append(grad_norm)
        kl_sum = kl.sum(1).mean().item()
        record = self.parallel.average({name: sum(v) / len(v) for name, v in stats.items()})
        record.update({"loss": record["loss/policy_avg"] + config.vf_coef * record["loss/value_avg"],
                       "objective/kl": kl_sum, "objective/scores": scores.mean().item(),
                       "objective/non_score_reward": -config.kl_coef * kl_sum,
                       "objective/rlhf_reward": scores.mean().item() - config.kl_coef * kl_sum,
                       "objective/entropy": -(old_logps.sum(1)).mean().item(),
                       "val/num_eos_tokens": float(sum(c[-1] == self.tokenizer.eos_id for _, c in pairs)),
                       "val/ratio": torch.exp((logps - old_logps) * mask).sum().item() / mask.sum().item()})
        return record, self.parallel.total(sum(len(p) + len(c) for p, c in pairs))

    def save_heads(self, directory: Path) -> None:
        save_safetensors({k: v.detach() for k, v in self.heads["value"].state_dict().items()}, directory / VALUE_HEAD)

    def load_heads(self, directory: Path) -> None:
        self.heads["value"].load_state_dict(read_safetensors(directory / VALUE_HEAD))


class GrpoTrainer(RolloutTrainer):
    def optimize(self) -> tuple[dict[str, float], int]:
        config = self.config
        items = self.parallel.rows(self.next_pairs())
        pairs, references = self.rollout(items, config.num_samples)
        scores = self.rewards(pairs, references)
        advantages = losses.group_advantages(scores, config.num_samples)
        with torch.no_grad():
            old_logps, mask = completion_logprobs(self.model, pairs)
            with self.as_reference() as model:
                ref_logps, _ = completion_logprobs(model, pairs)
        stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            with self.autocast():
                logps, _ = completion_logprobs(self.model, pairs)
            loss, kl = losses.grpo_loss(logps, old_logps, ref_logps, advantages, mask, config.clip_range,
                                        config.kl_coef)
            (loss * self.parallel.share(len(pairs))[0]).backward()
            stats.setdefault("grad_norm", []).append(self.apply_gradients())
            stats.setdefault("loss", []).append(loss.item())
            stats.setdefault("kl", []).append(kl.item())
        groups = scores.view(-1, config.num_samples)
        record = self.parallel.average({name: sum(v) / len(v) for name, v in stats.items()})
        kl_sum = ((old_logps - ref_logps) * mask).sum(1).mean().item()
        record.update({"reward": scores.mean().item(), "reward_std": groups.std(1).mean().item(),
                       "frac_reward_zero_std": (groups.std(1) < 1e-6).float().mean().item(),
                       "objective/kl": kl_sum, "objective/rlhf_reward": scores.mean().item() - config.kl_coef * kl_sum,
                       "completions/mean_length": mask.sum(1).mean().item()})
        return record, self.parallel.total(sum(len(p) + len(c) for p, c in pairs))


TRAINERS: dict[str, type[AlignTrainer]] = {"sft": SftTrainer, "rm": RewardTrainer, "dpo": DpoTrainer,
                                           "ppo": PpoTrainer, "grpo": GrpoTrainer}


def align(config: AlignConfig, resume: str | None = None) -> Path:
    """Run the recipe; returns the best adapter's directory."""
    with cleaned_up_on_failure(Path(config.out), keep=(BEST,)):
        run_recipe(TRAINERS[config.method], config, resume)
    return Path(config.out) / BEST


__all__ = ["ALIGN_FILE", "AlignConfig", "AlignTrainer", "METHODS", "PreferencePair", "PromptedText", "REWARD_HEAD",
           "TRAINERS", "align", "chat_spec", "load_head", "rouge_l"]
