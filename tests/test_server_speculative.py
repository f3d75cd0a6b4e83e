"""Speculative decoding through the server: ``--assistant-model`` for every request (a body opts
out), prompt lookup per request, the acceptance rate in ``/metrics``, one-line 400s for bad values."""

from __future__ import annotations

import copy

import openai
import pytest
from serving import serving

import cpmlive
from cpmlive.api import LM
from cpmlive.data.chat import ChatTemplate
from cpmlive.serve.app import create_app
from test_server import get_text

QUOTING = "宝玉笑道：“林妹妹，你这话说的是。”黛玉笑道：“宝哥哥，你这话说的是。”宝玉笑道："


@pytest.fixture(scope="module")
def lm():
    model = cpmlive.load("demo")
    model.chat_templates[None] = ChatTemplate()
    model.set_assistant(LM(copy.deepcopy(model.model), model.tokenizer, "twin"))
    return model


@pytest.fixture(scope="module")
def server(lm):
    with serving(create_app(lm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def plain(lm, text, tokens):
    return lm.generate(text, max_new_tokens=tokens, min_new_tokens=tokens, assistant_model=None)


def counters(server):
    lines = dict(line.rsplit(" ", 1) for line in get_text(server, "/metrics").splitlines()
                 if line.startswith("cpmlive_spec_decode"))
    return {name: float(value) for name, value in lines.items()}


def test_the_assistant_drafts_unless_a_request_opts_out(client, server, lm):
    expected = plain(lm, QUOTING, 16)
    before = counters(server)
    answer = client.completions.create(model="demo", prompt=QUOTING, max_tokens=16, temperature=0,
                                       extra_body={"min_tokens": 16})
    after = counters(server)
    assert answer.choices[0].text == expected
    drafted = after["cpmlive_spec_decode_num_draft_tokens"] - before["cpmlive_spec_decode_num_draft_tokens"]
    kept = after["cpmlive_spec_decode_num_accepted_tokens"] - before["cpmlive_spec_decode_num_accepted_tokens"]
    assert drafted == kept > 0  # the twin drafts what the model would choose
    assert 0 < after["cpmlive_spec_decode_draft_acceptance_rate"] <= 1
    answer = client.completions.create(model="demo", prompt=QUOTING, max_tokens=16, temperature=0,
                                       extra_body={"min_tokens": 16, "use_assistant_model": False})
    assert answer.choices[0].text == expected and counters(server) == after


def test_prompt_lookup_per_request_in_chat_and_completions(client, lm):
    expected = plain(lm, QUOTING, 20)
    answer = client.completions.create(model="demo", prompt=QUOTING, max_tokens=20, temperature=0,
                                       extra_body={"min_tokens": 20, "prompt_lookup_num_tokens": 4,
                                                   "use_assistant_model": False})
    assert answer.choices[0].text == expected
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUOTING}],
                                           max_tokens=8, temperature=0.7, seed=3,
                                           extra_body={"prompt_lookup_num_tokens": 3})
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("field, value", [("num_assistant_tokens", 0), ("prompt_lookup_num_tokens", 10_000),
                                          ("max_matching_ngram_size", 0), ("use_assistant_model", "yes")])
def test_bad_speculation_fields_are_400s(client, field, value):
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="demo", prompt="你好", max_tokens=4, extra_body={field: value})
    assert client.completions.create(model="demo", prompt="你好", max_tokens=2, temperature=0).choices


def test_the_prefix_cache_hit_rate_is_in_the_metrics(client, server):
    def rate():
        line = [line for line in get_text(server, "/metrics").splitlines()
                if line.startswith("cpmlive_prefix_cache_hit_rate")]
        return float(line[0].split()[-1])

    for _ in range(2):  # CPM-Ant: the second identical prompt is reused whole
        client.completions.create(model="demo", prompt="今天天气不错，", max_tokens=3, temperature=0)
    assert 0 < rate() <= 1
