"""DPO learns what it is shown (issue 28, point 15): the completion log-probabilities it is built on
equal step-by-step decoding, a batch's loss is TRL's ``DPOTrainer`` loss on the same rows,
training-pair accuracy and margins rise at the default settings, and an over-long prompt can be
cut as TRL cuts it (``max_prompt_length``, ``truncation_mode``) instead of refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cpmlive.align.evaluate import pair_metrics
from cpmlive.align.policy import completion_logprobs
from cpmlive.align.recipes import AlignConfig, DpoTrainer
from cpmlive.model.ant.config import AntConfig
from cpmlive.model.registry import preset
from cpmlive.data.layout import GENERATION, TEXT_SEGMENT, build_batch
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import build_model
from cpmlive.model.checkpoint import save_checkpoint
from cpmlive.resources import ASSETS
from cpmlive.tokenizer import AntTokenizer

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl_stubs import trainer_stub  # noqa: E402

CITIES = ["北京", "上海", "广州", "深圳", "南京", "武汉", "成都", "西安"]
THINGS = ["下雪", "开会", "修路", "办展", "植树", "赛跑", "演出", "招聘"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def title_pairs(count: int) -> list[dict]:
    """The issue's experiment in miniature: each prompt's own answer against another prompt's
    (answers of one shape, so neither side wins by length)."""
    rows = [(f"{c}今天{t}了吗？", f"{c}{t}") for c in CITIES for t in THINGS][:count]
    return [{"prompt": p, "chosen": a, "rejected": rows[(i + 11) % len(rows)][1]} for i, (p, a) in enumerate(rows)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo3")
    config = AntConfig.from_dict({**preset("tiny").to_dict(), "vocab_size": 16000, "max_length": 256})
    model = build_model(config, seed=0)
    torch.nn.init.normal_(model.input_embedding.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    save_checkpoint(model, config, root / "base", vocab=ASSETS / "demo" / "vocab.txt")
    return {"root": root, "base": root / "base", "pairs": write_jsonl(root / "pairs.jsonl", title_pairs(32))}


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "align-dpo.yaml"


def dpo_config(world, out: str, **extra: object) -> AlignConfig:
    """``recipes/align-dpo.yaml`` (learning rate, schedule, LoRA, beta) on the tiny model, from the
    base (a new adapter; the base is the reference), without a dev set."""
    fields = dict(model=world["base"], data=world["pairs"], out=world["root"] / out, adapter="", eval="",
                  max_steps=40, eval_every=40, save_every=40, progress="false", max_input_tokens=24,
                  max_output_tokens=8)
    return AlignConfig.from_file(RECIPE, [f"{k}={v}" for k, v in {**fields, **extra}.items()])


@pytest.fixture(scope="module")
def run(world) -> tuple[DpoTrainer, dict[str, float]]:
    """The recipe's run, and its training-pair figures before it."""
    trainer = DpoTrainer(dpo_config(world, "dpo"))
    before = train_metrics(trainer)
    trainer.run()
    return trainer, before


@torch.no_grad()
def train_metrics(trainer: DpoTrainer) -> dict[str, float]:
    """Pair accuracy and mean log-probability margin of the policy on the training pairs (what
    ``cpmlive evaluate --pairs`` prints), and the implicit rewards' accuracy and mean margin
    against the reference (TRL's ``rewards/accuracies`` and ``rewards/margins``)."""
    model = trainer.model.eval()
    try:
        figures = pair_metrics(model, trainer.tokenizer, trainer.config.data, trainer.template)
        _, metrics = trainer.batch_loss(trainer.train_pairs)
    finally:
        model.train()
    return {**figures, "reward_margin": metrics["rewards/margins"], "reward_accuracy": metrics["rewards/accuracies"]}


# ---- the log-probabilities DPO is built on -------------------------------------------------------


@torch.no_grad()
def decoded_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """A completion's log-probability token by token, as ``generate`` scores it: the prompt
    prefilled, then each completion token fed through the cache."""
    batch = build_batch([prompt], GENERATION, model.config.prompt_length)
    cache = model.new_cache(1, batch.input_ids.size(1) + len(completion))
    hidden = model(**batch.as_inputs(), cache=cache, last=1)[:, -1]
    total, one = 0.0, torch.ones(1, 1, dtype=torch.int32)
    for token in completion:
        total += F.log_softmax(model.logits(hidden).float(), dim=-1)[0, token].item()
        hidden = model(torch.tensor([[token]]), one * TEXT_SEGMENT[GENERATION], ~one.bool(), one * 0, one.bool(),
                       cache=cache)[:, -1]
    return total


def test_completion_logprobs_equal_step_by_step_decoding(world):
    """Every completion token counted once, from the position before it, none of the prompt and
    no padding: a padded batch of uneven rows sums to what decoding each row alone gives."""
    trainer = DpoTrainer(dpo_config(world, "boundary"))
    model = trainer.model.eval()
    pairs = [(p, c) for p, c, _ in trainer.train_pairs[:3]] + [(trainer.train_pairs[0][0][:3], [7, 8, 9, 10, 2])]
    with torch.no_grad():
        logps, mask = completion_logprobs(model, pairs)
    assert mask.sum(1).tolist() == [len(c) for _, c in pairs]
    expected = torch.tensor([decoded_logprob(model, p, c) for p, c in pairs])
    torch.testing.assert_close(logps.sum(1), expected, rtol=1e-4, atol=1e-4)


# ---- the loss against TRL's trainer ----------------------------------------------------------------


def trl_layout_logprobs(model, inputs: dict, prompts: list[list[int]]) -> torch.Tensor:
    """What a causal LM returns to TRL's loss: at column t, log p(input_ids[t + 1]) where that
    token is a completion token (TRL's ``completion_mask``), 0 elsewhere. The rows are TRL's
    collator's; each row's completion is read back from its mask and scored by our model."""
    ids, mask = inputs["input_ids"], inputs["completion_mask"]
    rows = [(prompts[row % len(prompts)], ids[row][mask[row].bool()].tolist()) for row in range(ids.size(0))]
    logps, _ = completion_logprobs(model, rows)
    out = torch.zeros(ids.size(0), ids.size(1) - 1)
    for row, (prompt, completion) in enumerate(rows):
        out[row, len(prompt) - 1:len(prompt) - 1 + len(completion)] = logps[row, :len(completion)]
    return out


def test_dpo_batch_loss_equals_trls_dpo_trainer(run):
    """The trained policy and its reference on one batch: our loss and logged rewards are what
    TRL's ``DPOTrainer._compute_loss`` makes of TRL's collated batch of the same pairs."""
    trained = run[0]
    items = trained.train_pairs[:8]
    loss, metrics = trained.batch_loss(items)
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in items]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    prompts = [p for p, _, _ in items]
    with trained.as_reference() as reference:
        ref_chosen, ref_rejected = trl_layout_logprobs(reference, inputs, prompts).sum(1).chunk(2)
    policy = trl_layout_logprobs(trained.model, inputs, prompts)
    stub = trainer_stub(beta=trained.config.beta, label_smoothing=0.0, loss_types=["sigmoid"], loss_weights=[1.0],
                        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False)
    outputs = SimpleNamespace(log_probs=policy, entropy=torch.zeros_like(policy),
                              mean_logits=torch.zeros_like(policy), is_top1=torch.zeros_like(policy, dtype=torch.bool))
    expected = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs,
                                        {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected},
                                        False)
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}
    assert abs(logged["rewards/margins"]) > 1e-3  # the policy has moved: the comparison is not 0.693 == 0.693
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(logged[name], abs=1e-5)


# ---- learning ------------------------------------------------------------------------------------


def test_the_dpo_recipe_raises_training_pair_accuracy(run):
    """At the recipe's settings 40 steps on 32 pairs must fit them: the implicit rewards rank the
    chosen answer first on nearly every training pair, and the policy itself on more of them, with
    wider margins. (At the recipe's former lr 5e-4 on q and v the implicit margin stayed near 0.)"""
    trainer, before = run
    after = train_metrics(trainer)
    assert before["reward_margin"] == pytest.approx(0, abs=1e-5)  # the policy starts as the reference
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.5
    assert after["pair_accuracy"] >= before["pair_accuracy"] + 0.125
    assert after["mean_margin"] > before["mean_margin"] + 5


# ---- prompt truncation -----------------------------------------------------------------------------


def long_prompt_file(world) -> Path:
    text = "，".join(f"{c}{t}" for c in CITIES for t in THINGS[:3]) + "。这些事情里哪一件最重要？"
    return write_jsonl(world["root"] / "long.jsonl", [{"prompt": text, "chosen": "北京下雪", "rejected": "上海开会"}])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_max_prompt_length_cuts_the_prompt_as_trl_does(world, mode):
    """``max_prompt_length=N``: ``<s>`` and N - 1 of the prompt's tokens, the last or the first as
    TRL's collator keeps them under ``truncation_mode``; the completions are untouched."""
    data = long_prompt_file(world)
    trainer = DpoTrainer(dpo_config(world, f"cut-{mode}", data=data, max_prompt_length=12, truncation_mode=mode))
    tokenizer = AntTokenizer.from_file(ASSETS / "demo" / "vocab.txt")
    rendered = trainer.template.render([{"role": "user", "content": json.loads(data.read_text())["prompt"]}])
    full = [i for i in tokenizer.encode_for_model(rendered) if i != tokenizer.bos_id]
    assert len(full) > 24
    collated = DataCollatorForPreference(pad_token_id=0, max_length=11, truncation_mode=mode)(
        [{"prompt_ids": full, "chosen_ids": [], "rejected_ids": []}])
    prompt, chosen, rejected = trainer.train_pairs[0]
    assert prompt == [tokenizer.bos_id, *collated["input_ids"][0].tolist()]
    assert (chosen, rejected) == (tokenizer.encode("北京下雪") + [tokenizer.eos_id],
                                  tokenizer.encode("上海开会") + [tokenizer.eos_id])


def test_an_over_long_prompt_is_refused_without_max_prompt_length(world):
    with pytest.raises(CpmliveError, match="max_prompt_length=N"):
        DpoTrainer(dpo_config(world, "refused", data=long_prompt_file(world)))


@pytest.mark.parametrize("bad,message", [("max_prompt_length=1", "0 .no truncation. or 2..max_input_tokens"),
                                         ("max_prompt_length=25", "0 .no truncation. or 2..max_input_tokens"),
                                         ("max_prompt_length=-1", "max_prompt_length must be >= 0"),
                                         ("truncation_mode=keep_middle", "one of keep_end, keep_start")])
def test_bad_truncation_settings_are_refused(bad, message):
    with pytest.raises(CpmliveError, match=message):
        AlignConfig.from_file(None, ["method=dpo", "data=x.jsonl", "max_input_tokens=24", bad])
