"""Prefix caching (``infer/prefix.py`` in the engine): prompts that share a prefix reuse its keys
and values and decode exactly what they decode without it; CPM-Ant, which reads its prompt both
ways, reuses only an identical prompt and never a prefix; the LRU stays within its bytes."""

import pytest
import torch

from cpmlive.infer.engine import Engine, Request
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.infer.prefix import BLOCK
from test_speculative import FAMILIES, NumberTokenizer

OPTIONS = GenerationConfig(max_new_tokens=10)


def shared_prompts(seed=0):
    """A 40-token 'system prompt' and three questions after it; the third repeats the first."""
    g = torch.Generator().manual_seed(seed)
    system = [1] + torch.randint(10, 400, (39,), generator=g).tolist()
    questions = [torch.randint(10, 400, (n,), generator=g).tolist() for n in (5, 9)]
    return [system + questions[0], system + questions[1], system + questions[0]]


def one_by_one(engine, rows):
    """Each request alone, after the one before it (so each may reuse what came before)."""
    results = []
    for row in rows:
        results.append(engine.submit(Request(row, OPTIONS)).result().ids)
    return results


@pytest.mark.parametrize("family", ["llama", "cpm-1"])
def test_a_shared_prefix_is_reused_and_changes_nothing(family):
    model = FAMILIES[family]()
    rows = shared_prompts()
    expected = [generate_ids(model, [row], OPTIONS, 2)[0] for row in rows]
    engine = Engine(model, NumberTokenizer())
    assert one_by_one(engine, rows) == expected
    stats = engine.stats()
    whole_blocks = 40 // BLOCK * BLOCK  # the system prompt's whole blocks
    # the second reuses the system prompt; the third its own first copy, short of its last token
    assert stats["prefix_hit_tokens"] == whole_blocks + (len(rows[2]) - 1) // BLOCK * BLOCK
    assert stats["prefix_queried_tokens"] == sum(map(len, rows))
    assert one_by_one(Engine(model, NumberTokenizer(), prefix_cache_bytes=0), rows) == expected


def test_a_chat_turn_reuses_the_turn_before():
    model = FAMILIES["llama"]()
    engine = Engine(model, NumberTokenizer())
    first = shared_prompts()[0]
    answer = engine.submit(Request(first, OPTIONS)).result().ids
    second = first + answer + [7, 8, 9]
    got = engine.submit(Request(second, OPTIONS)).result().ids
    assert got == generate_ids(model, [second], OPTIONS, 2)[0]
    assert engine.stats()["prefix_hit_tokens"] == len(first) // BLOCK * BLOCK


def test_cpm_ant_reuses_an_identical_prompt_only():
    model = FAMILIES["cpm-ant"]()
    rows = shared_prompts()
    expected = [generate_ids(model, [row], OPTIONS, 2)[0] for row in rows]
    engine = Engine(model, NumberTokenizer())
    assert one_by_one(engine, rows[:2]) == expected[:2]
    assert engine.stats()["prefix_hit_tokens"] == 0  # a different suffix never reuses the shared prefix
    assert one_by_one(engine, rows[2:]) == expected[2:]
    assert engine.stats()["prefix_hit_tokens"] == len(rows[2])  # the identical prompt, whole


def test_the_lru_stays_within_its_bytes():
    model = FAMILIES["llama"]()
    engine = Engine(model, NumberTokenizer(), prefix_cache_bytes=40_000)
    g = torch.Generator().manual_seed(3)
    rows = [[1] + torch.randint(10, 400, (47,), generator=g).tolist() for _ in range(6)]
    one_by_one(engine, rows)
    cache = engine.prefix
    assert 0 < cache.bytes <= 40_000 and len(cache.blocks) < 6 * 3  # older blocks left
    assert one_by_one(engine, rows[-1:]) == [generate_ids(model, [rows[-1]], OPTIONS, 2)[0]]
    assert engine.stats()["prefix_hit_tokens"] > 0  # the latest prompt is still there


def test_adapters_and_prompt_tasks_never_share_blocks():
    from cpmlive.infer.prefix import PrefixCache

    cache = PrefixCache(causal=True)
    assert cache._keys(("a", None), list(range(32))) != cache._keys((None, None), list(range(32)))
    assert cache._keys((None, 1), list(range(32)))[0][0] != cache._keys((None, 2), list(range(32)))[0][0]


def test_the_server_sizes_or_turns_off_the_prefix_cache():
    import cpmlive
    from cpmlive.cli import serve as serve_cli
    from cpmlive.serve.app import Settings, create_app

    lm = cpmlive.load("llama-demo")
    assert create_app(lm, Settings(prefix_cache_bytes=0)).state.server.engine.prefix is None
    assert create_app(lm, Settings(prefix_cache_bytes=2**20)).state.server.engine.prefix.capacity == 2**20
    import argparse

    parser = argparse.ArgumentParser()
    serve_cli.add_serve(parser.add_subparsers())
    assert parser.parse_args(["serve", "demo", "--prefix-cache", "64MB"]).prefix_cache == 64_000_000


def test_a_failing_reused_prefill_fails_only_its_request(monkeypatch):
    model = FAMILIES["llama"]()
    engine = Engine(model, NumberTokenizer())
    first, second, _ = shared_prompts()
    engine.submit(Request(first, OPTIONS)).result()

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_prefill_after", broken)
    g = torch.Generator().manual_seed(9)
    fresh = [1] + torch.randint(10, 400, (20,), generator=g).tolist()
    handles = [engine.submit(Request(second, OPTIONS)), engine.submit(Request(fresh, OPTIONS))]
    with pytest.raises(Exception, match="boom"):
        handles[0].result()
    assert handles[1].result().ids == generate_ids(model, [fresh], OPTIONS, 2)[0]
