"""The shipped bilingual CPM-Bee demo ("bee-demo"): it loads from the package within the size
budget, answers every task kind, and reproduces the predictions its README table was made with."""

import json

import pytest

import cpmlive
from cpmlive.apps.bee_eval import HEADLINE
from cpmlive.data.bee import answers_of
from cpmlive.resources import ASSETS
from cpmlive.tokenizer.bee import unescape

DEMO = ASSETS / "bee-demo"
TABLE = DEMO / "eval.json"


@pytest.fixture(scope="module")
def bee():
    return cpmlive.load("bee-demo")


def test_the_demo_ships_within_budget(bee):
    size = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert size <= 50 * 1024**2
    shards = sorted(DEMO.glob("*.safetensors"))
    assert shards and all(f.stat().st_size < 20 * 2**20 for f in shards)  # as the CPM-Ant demo's
    assert bee.model.config.model_type == "cpm-bee" and bee.tokenizer.vocab_size == bee.model.config.vocab_size


def test_the_demo_reproduces_its_table_predictions(bee):
    """The table's settings (beam 3, repetition penalty 1.2, 48 steps) on the five recorded
    held-out tasks of each kind give the recorded predictions."""
    table = json.loads(TABLE.read_text(encoding="utf-8"))
    assert set(table) == set(HEADLINE)
    for kind, row in table.items():
        tasks = [example["task"] for example in row["examples"]]
        blank = [{**task, "<ans>": ""} for task in tasks]
        filled = bee.bee(blank, max_new_tokens=48, num_beams=3, repetition_penalty=1.2)
        predictions = [unescape(next(answers_of(f))[1] or "") for f in filled]
        assert predictions == [example["prediction"] or "" for example in row["examples"]], kind
        assert row["tasks"] >= 100 and 0 <= row["model"][HEADLINE[kind]] <= 1
