"""The shipped demo model: it loads from the package, generates, fills, and scores text."""

import json
import subprocess
import sys

import pytest

import cpmlive
from cpmlive.resources import ASSETS
from cpmlive.infer.score import score_texts


@pytest.fixture(scope="module")
def demo():
    return cpmlive.load("demo")


def test_demo_is_small_half_precision_and_sharded_below_20_mb():
    files = sorted(ASSETS.joinpath("demo").glob("*.safetensors"))
    assert files and all(f.stat().st_size < 20 * 2**20 for f in files)
    assert sum(f.stat().st_size for f in files) <= 50 * 2**20
    config = json.loads(ASSETS.joinpath("demo", "config.json").read_text())
    assert config["half"] is True


def test_demo_generates_and_fills(demo):
    assert 15e6 < demo.model.num_parameters() < 40e6
    text = demo.generate("中国人民", max_new_tokens=16, min_new_tokens=8)
    assert len(demo.tokenizer.encode(text)) >= 8
    filled = demo.fill("北京是中国的<mask>。", max_new_tokens=3)
    assert filled.startswith("北京是中国的") and filled.endswith("。") and len(filled) > len("北京是中国的。")


def test_demo_model_beats_uniform_by_far(demo):
    """A trained model, not random weights: far below log2(vocab) bits per token."""
    score = score_texts(demo.model, demo.tokenizer, ["新华社北京1月5日电，国务院总理今天在人民大会堂会见了外国客人。"])
    assert score.bits_per_char < 8.0


def test_cli_generate_demo():
    result = subprocess.run([sys.executable, "-m", "cpmlive", "generate", "demo", "今天", "--max-new-tokens", "4",
                             "--min-new-tokens", "4", "--json"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert len(json.loads(result.stdout)["ids"]) == 4


ARTICLE = ("新华社北京1月5日电 国务院总理李鹏今天在人民大会堂会见了来访的美国国务卿奥尔布赖特，"
           "双方就中美关系和共同关心的国际问题交换了意见。")


def test_shipped_adapters_fit_the_demo_model_and_are_small():
    from cpmlive.resources import shipped_adapters

    assert {"headline", "sentiment"} <= set(shipped_adapters())
    lm = cpmlive.load("demo", adapter=["headline", "sentiment"])
    assert lm.task.task == "classify" and set(lm.task.labels) == {"正面", "负面"}
    assert lm.classify(["房间很干净，服务也好，下次还来。", "太差了，再也不来了。"])[0] in lm.task.labels
    for name in ("headline", "sentiment"):
        size = sum(f.stat().st_size for f in ASSETS.joinpath("adapters", name).glob("*.safetensors"))
        assert size < 8 * 2**20


def test_title_cli_uses_the_shipped_headline_adapter():
    out = subprocess.run([sys.executable, "-m", "cpmlive", "title", ARTICLE, "-n", "3", "--json", "--samples", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    titles = json.loads(out.stdout)["titles"]
    assert 1 <= len(titles) <= 3 and len(set(titles)) == len(titles)
    assert all(set(title) <= set(ARTICLE) for title in titles)  # built from the article's spans


def test_make_demo_tour_runs_every_section():
    out = subprocess.run([sys.executable, "-m", "cpmlive.demo"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    sections = [line.split("==")[1].strip() for line in out.stdout.splitlines() if line.startswith("== ")]
    assert [s.split()[0] for s in sections] == ["the", "tokenize", "generate", "generate", "fill", "title",
                                                 "classify", "stream", "CPM-Bee", "CPM-1"]
    bee_lines = [line for line in out.stdout.split("== CPM-Bee")[1].splitlines() if line.startswith("{")]
    cpm1_lines = out.stdout.split("== CPM-1")[1].splitlines()
    assert len([line for line in cpm1_lines if "|" in line]) == 3  # one continuation per prompt
    filled = [json.loads(line) for line in bee_lines]
    assert len(filled) == 5 and all(isinstance(task["<ans>"], str) and task["<ans>"] for task in filled)
    classified = out.stdout.split("== classify")[1].split("== stream")[0].split()
    assert {"正面", "负面"} & set(classified)
    titles = [line for line in out.stdout.split("== title")[1].split("== classify")[0].splitlines()
              if line.strip()[:2] in ("1.", "2.", "3.")]
    assert titles and all(set(t.split(". ", 1)[1]) <= set(ARTICLE) for t in titles)
