"""Alignment on CPM-Bee (issue 32): `align sft|rm|dpo|grpo` on filled JSON tasks (a preference pair
is two fillings of one task), scored as CPM-Bee's training scores answers; the shipped example
files; one-line refusals (pairs of different tasks, rollout recipes)."""

import json
from pathlib import Path

import pytest
import torch

import cpmlive
from cpmlive.align.bee import answer_scores, answer_tokens, sample_task_answers
from cpmlive.data.bee import blank_answers, pack, preference_tasks, training_example, tuning_tasks
from cpmlive.train.bee import batch_loss
from test_cli import assert_clean_error, run

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "data"
SFT, DPO = RECIPES / "bee-sft.jsonl", RECIPES / "bee-dpo.jsonl"


@pytest.fixture(scope="module")
def lm():
    return cpmlive.load("bee-demo")


def test_answer_scores_are_the_training_loss_per_task(lm):
    """Each task's summed answer log-probability is minus its training cross-entropy times its
    answer tokens (``train.bee.batch_loss``, checked against the original), alone or in a batch."""
    tasks = [task for _, task in tuning_tasks(SFT)][:5]
    examples = [training_example(lm.tokenizer, task) for task in tasks]
    with torch.no_grad():
        sums, counts, last = answer_scores(lm.model, examples)
        for index, example in enumerate(examples):
            loss, count = batch_loss(lm.model, pack([example], len(example), lm.tokenizer.vocab_size))
            assert count == counts[index] and abs(float(sums[index]) + float(loss) * count) < 1e-3 * count
    assert last.shape == (5, lm.model.config.dim_model)


def test_the_shipped_files_read(lm):
    assert len(tuning_tasks(SFT)) == 10 and len(preference_tasks(DPO)) == 6
    for _, chosen, rejected in preference_tasks(DPO):
        assert {k: v for k, v in chosen.items() if k != "<ans>"} == {k: v for k, v in rejected.items() if k != "<ans>"}


def margins(model, tokenizer) -> torch.Tensor:
    pairs = preference_tasks(DPO)
    with torch.no_grad():
        chosen = answer_scores(model, [training_example(tokenizer, c) for _, c, _ in pairs])[0]
        rejected = answer_scores(model, [training_example(tokenizer, r) for _, _, r in pairs])[0]
    return chosen - rejected


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_rm_and_dpo_on_json_tasks(lm, tmp_path):
    common = ["max_steps=16", "batch_size=4", "lr=0.01", "eval_every=8", "save_every=8", "progress=false"]
    for method, data in (("sft", SFT), ("rm", DPO), ("dpo", DPO)):
        out = tmp_path / method
        result = run("align", method, "--model", "bee-demo", "--data", data, "--eval", data, "--out", out, *common)
        assert result.returncode == 0, result.stderr.decode()
        evals = [r for r in records(out) if r["type"] == "eval"]
        assert evals[-1]["val_loss"] < evals[0]["val_loss"], method
    assert [r for r in records(tmp_path / "rm") if r["type"] == "eval"][-1]["val_accuracy"] == 1.0
    assert (tmp_path / "rm" / "best" / "reward_head.safetensors").is_file()
    tuned = cpmlive.load("bee-demo", adapter=tmp_path / "dpo" / "best")
    assert (margins(tuned.model, tuned.tokenizer) > margins(lm.model, lm.tokenizer)).all()
    sft = cpmlive.load("bee-demo", adapter=tmp_path / "sft" / "best")
    assert isinstance(sft.chat([{"role": "user", "content": "你好"}], max_new_tokens=8), str)


def test_bad_alignment_input_is_one_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": {"input": "北京", "<ans>": "Beijing"},
                                 "rejected": {"input": "上海", "<ans>": "Shanghai"}}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert_clean_error(run("align", "dpo", "--model", "bee-demo", "--data", pairs, "--out", tmp_path / "a",
                           "max_steps=2"), "chosen and rejected fill different tasks")
    same = tmp_path / "same.jsonl"
    task = {"input": "北京", "<ans>": "Beijing"}
    same.write_text(json.dumps({"chosen": task, "rejected": task}) + "\n", encoding="utf-8")
    assert_clean_error(run("align", "dpo", "--model", "bee-demo", "--data", same, "--out", tmp_path / "b",
                           "max_steps=2"), "give the same answer")
    assert_clean_error(run("align", "ppo", "--model", "bee-demo", "--data", SFT, "--out", tmp_path / "c",
                           "reward=rouge", "max_steps=2"), "CPM-Bee aligns with sft, rm, dpo and grpo")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_rollouts_sample_the_policy_and_score_per_token(lm):
    """Near temperature 0 a rollout is the greedy filling; its per-token log-probabilities sum
    to its answer score."""
    tasks = [blank_answers(task) for _, task in tuning_tasks(SFT)][:4]
    sampled = sample_task_answers(lm.model, lm.tokenizer, tasks, 12, temperature=1e-4,
                                  generator=torch.Generator().manual_seed(0))
    greedy = lm.bee(tasks, max_new_tokens=12)

    def leaves(value):
        return [x for v in value.values() for x in leaves(v)] if isinstance(value, dict) else [value or ""]

    assert [leaves(task["<ans>"]) for task, _ in sampled] == [leaves(task["<ans>"]) for task in greedy]
    examples = [training_example(lm.tokenizer, task) for task, _ in sampled]
    with torch.no_grad():
        logprobs, mask, hidden = answer_tokens(lm.model, examples)
        sums, counts, _ = answer_scores(lm.model, examples)
    assert torch.allclose(logprobs.sum(1), sums) and torch.equal(mask.sum(1), counts)
    assert hidden.shape[:2] == mask.shape and (logprobs <= 0).all()


def test_grpo_on_json_tasks(tmp_path):
    out = tmp_path / "grpo"
    result = run("align", "grpo", "--model", "bee-demo", "--data", SFT, "--eval", SFT, "--out", out, "reward=rouge",
                 "max_steps=4", "batch_size=2", "num_samples=4", "eval_every=2", "save_every=2", "eval_prompts=4",
                 "max_output_tokens=16", "lr=0.005", "progress=false")
    assert result.returncode == 0, result.stderr.decode()
    trains = [r for r in records(out) if r["type"] == "train"]
    assert len(trains) == 4 and all(0 <= r["reward"] <= 1 and r["completions/mean_length"] > 0 for r in trains)
    assert [r["step"] for r in records(out) if r["type"] == "eval"] == [0, 2, 4]
    assert (out / "best" / "adapter_config.json").is_file()
