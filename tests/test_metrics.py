"""Character ROUGE (via rouge-score) against hand counts and an independent LCS; accuracy and
macro-F1 against scikit-learn."""

import random

import pytest

from cpmlive.errors import CpmliveError
from cpmlive.tune.metrics import (
    CharTokenizer,
    accuracy,
    classification_scores,
    macro_f1,
    per_label_f1,
    rouge,
)


def test_char_tokenizer_drops_every_kind_of_space():
    assert CharTokenizer().tokenize("a b\u3000c\n中，文\t") == ["a", "b", "c", "中", "，", "文"]


def test_rouge_hand_computed():
    # unigrams: 北 京 天 shared of 4 each; bigrams: only 北京 of 3 each; LCS 北京天 = 3.
    assert rouge(["北京天气"], ["北京晴天"]) == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 75.0})
    # clipped counts: 哈 matches once; P = 1/3, R = 1, F = 0.5; no bigram in the reference.
    assert rouge(["哈哈哈"], ["哈"]) == pytest.approx({"rouge1": 50.0, "rouge2": 0.0, "rougeL": 50.0})
    # order matters for ROUGE-2 and ROUGE-L, not for ROUGE-1.
    assert rouge(["天今"], ["今天"]) == pytest.approx({"rouge1": 100.0, "rouge2": 0.0, "rougeL": 50.0})


def test_rouge_extremes_and_spaces():
    assert rouge(["中国 人民"], ["中国人民"]) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge(["甲乙"], ["丙丁"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge([""], ["标题"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_is_a_mean_over_pairs():
    assert rouge(["北京天气", "甲乙"], ["北京晴天", "甲乙"])["rouge1"] == pytest.approx((75.0 + 100.0) / 2)


def lcs_length(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for char in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if char == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def lcs_f1(prediction: str, reference: str) -> float:
    prediction, reference = prediction.replace(" ", ""), reference.replace(" ", "")
    common = lcs_length(prediction, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 100 * 2 * precision * recall / (precision + recall)


def test_rouge_l_matches_an_independent_lcs():
    rng = random.Random(7)
    alphabet = "新华社北京电今天的人民日报一二三 ab"

    def text() -> str:
        return "".join(rng.choices(alphabet, k=rng.randint(1, 30)))

    pairs = [(text(), text()) for _ in range(200)]
    pairs += [("abcbdab", "bdcaba"), ("人民日报社论", "日报人民社论")]
    for prediction, reference in pairs:
        expected = lcs_f1(prediction, reference)
        assert rouge([prediction], [reference])["rougeL"] == pytest.approx(expected), (prediction, reference)


def test_accuracy_and_macro_f1_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(3)
    for trial in range(50):
        labels = ["正面", "负面", "中性", "x"][: rng.randint(1, 4)]
        gold = [rng.choice(labels) for _ in range(rng.randint(1, 40))]
        predicted = [rng.choice(labels + ["未知"]) if trial % 3 == 0 else rng.choice(labels) for _ in gold]
        assert accuracy(predicted, gold) == pytest.approx(100 * metrics.accuracy_score(gold, predicted))
        expected = metrics.f1_score(gold, predicted, average="macro", zero_division=0)
        assert macro_f1(predicted, gold) == pytest.approx(100 * expected)


def test_macro_f1_hand_computed():
    gold = ["正面", "正面", "负面", "负面"]
    predicted = ["正面", "负面", "负面", "负面"]
    # 正面: TP 1, FP 0, FN 1 -> 2/3; 负面: TP 2, FP 1, FN 0 -> 4/5.
    assert per_label_f1(predicted, gold) == pytest.approx({"正面": 200 / 3, "负面": 80.0})
    assert macro_f1(predicted, gold) == pytest.approx((200 / 3 + 80) / 2)
    scores = classification_scores(predicted, gold)
    assert scores["accuracy"] == 75.0 and scores["macro_f1"] == pytest.approx(macro_f1(predicted, gold))
    assert set(scores["f1"]) == {"正面", "负面"}


def test_label_never_predicted_scores_zero():
    assert per_label_f1(["a", "a"], ["a", "b"]) == pytest.approx({"a": 200 / 3, "b": 0.0})


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(CpmliveError, match="2 predictions for 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(CpmliveError, match="nothing to score"):
        accuracy([], [])
    with pytest.raises(CpmliveError, match="nothing to score"):
        macro_f1([], [])
