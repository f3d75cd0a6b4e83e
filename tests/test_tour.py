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

