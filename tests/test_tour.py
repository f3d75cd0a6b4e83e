"""The README's command tours are the output of ``cpmlive.tour``'s commands, so they cannot drift;
every ``$ cpmlive`` line of the README lies in such a block; ``make demo``'s reviews follow the
rule the README states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cpmlive import tour

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", list(tour.TOURS))
def test_readme_block_is_what_the_commands_print(readme, name):
    assert tour.readme_block(readme, name) == tour.render(name), (
        f"README's tour:{name} block is stale: run `python -m cpmlive.tour --write README.md`")


def test_every_readme_command_with_output_is_in_a_tour_block(readme):
    """A ``$ cpmlive`` line anywhere else would be output nobody regenerates."""
    inside = {line for name in tour.TOURS for line in tour.readme_block(readme, name).splitlines()}
    stray = [line for line in readme.splitlines() if line.startswith("$ cpmlive") and line not in inside]
    assert stray == []


def test_tour_commands_need_only_what_ships():
    """A newcomer runs the tour on a fresh install: no test fixture, no file outside the package."""
    for commands in tour.TOURS.values():
        for command in commands:
            assert not re.search(r"fixtures|cpm-ant-vocab\.txt|ant-tiny|\.\./shared", command), command


def test_rewrite_replaces_only_the_named_block():
    text = "a\n<!-- tour:x -->\n```text\nold\n```\nb\n<!-- tour:y -->\n```text\nkeep\n```\n"
    assert tour.rewrite(text, {"x": "new\n"}) == text.replace("old\n", "new\n")
    with pytest.raises(KeyError):
        tour.rewrite(text, {"z": "new\n"})


def test_run_shows_a_failure_with_its_exit_code(tmp_path):
    assert tour.run('cpmlive fill demo "没有空"', tmp_path) == (
        '$ cpmlive fill demo "没有空"\ncpmlive: error: fill needs at least one <mask> in the text\n(exit 2)')


def test_demo_reviews_are_the_first_of_the_test_split():
    """``make demo`` classifies the first 8 test reviews with their gold labels (README's rule),
    not examples picked to flatter the adapter."""
    from cpmlive.data.sentiment import load_sentiment, split_sentiment
    from cpmlive.demo import REVIEWS

    assert REVIEWS == split_sentiment(load_sentiment())["test"][:len(REVIEWS)]


@pytest.mark.parametrize("name, family", [("demo", "CPM-Ant"), ("bee-demo", "CPM-Bee"), ("cpm1-demo", "CPM-1")])
def test_every_family_ships_a_demo(name, family):
    from cpmlive.model.registry import family_of
    from cpmlive.resources import SHIPPED_MODELS

    assert name in SHIPPED_MODELS and family_of(name).name == family


def test_cpm1_demo_generates_with_cpm_generate_special_pieces():
    import cpmlive
    from cpmlive.resources import demo_dir
    from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

    assert sum(p.stat().st_size for p in demo_dir("cpm1-demo").iterdir()) <= 30_000_000
    lm = cpmlive.load("cpm1-demo")
    assert isinstance(lm.tokenizer, Cpm1Tokenizer)
    pieces = [lm.tokenizer.id_to_token(i) for i in range(8)]
    assert pieces == ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>"]
    assert lm.tokenizer.eos_id == 7 and lm.model.config.vocab_size == lm.tokenizer.vocab_size
    text = lm.generate("中国", max_new_tokens=4, min_new_tokens=4)
    assert text and text == lm.generate("中国", max_new_tokens=4, min_new_tokens=4)


def test_cpm1_demo_recipe_builds_the_shipped_architecture():
    import json

    from cpmlive.resources import demo_dir
    from cpmlive.train.pretrain import PretrainConfig, new_model_config

    config = PretrainConfig.from_file(README.parent / "recipes" / "cpm1-demo.yaml")
    shipped = json.loads((demo_dir("cpm1-demo") / "config.json").read_text("utf-8"))
    assert {**new_model_config(config).to_dict(), "half": True} == shipped
