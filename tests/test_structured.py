"""Structured output (``infer/structured.py``, llguidance as a mask in the engine's sampler): every
output parses and validates against its schema (checked with the ``jsonschema`` reference
validator), through the Python API and through the official ``openai`` client on both endpoints;
constrained and free requests share a batch; bad constraints are one-line errors and 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from serving import serving

import cpmlive
from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
from cpmlive.infer.structured import constraint_from
from cpmlive.serve.app import create_app

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["北京", "上海", "广州"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}}}}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
PHONE = r"1[3-9]\d{9}"
CITY_GRAMMAR = 'start: "我住在" CITY "，今年" AGE "岁。"\nCITY: "北京" | "上海"\nAGE: /[1-9][0-9]?/\n'


@pytest.fixture(scope="module")
def lm():
    return cpmlive.load("llama-demo")


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 1}, {"do_sample": True, "seed": 2,
                                                                        "temperature": 1.5}])
def test_json_schema_outputs_validate(lm, options):
    text = lm.generate("个人信息：", max_new_tokens=80, response_format=AS_SCHEMA, **options)
    jsonschema.validate(json.loads(text), PERSON)


def test_regex_and_grammar_outputs_match(lm):
    for seed in range(3):
        assert re.fullmatch(PHONE, lm.generate("电话：", max_new_tokens=20, guided_regex=PHONE, do_sample=True,
                                                seed=seed))
    text = "".join(lm.stream("介绍：", max_new_tokens=20, guided_grammar=CITY_GRAMMAR))
    assert re.fullmatch(r"我住在(北京|上海)，今年[1-9][0-9]?岁。", text)


def test_constrained_and_free_requests_share_a_batch(lm):
    free = GenerationConfig(max_new_tokens=12)
    expected = lm.generate("宝玉笑道：", max_new_tokens=12)
    handles = [lm.engine.submit(Request(lm.encode_prompt("宝玉笑道："), free)),
               lm.engine.submit(Request(lm.encode_prompt("电话："), GenerationConfig(max_new_tokens=20),
                                        constraint=constraint_from(guided_regex=PHONE))),
               lm.engine.submit(Request(lm.encode_prompt("宝玉笑道："), GenerationConfig(max_new_tokens=12,
                                                                                       prompt_lookup_num_tokens=3)))]
    free_text, phone, drafted = (h.result() for h in handles)
    assert free_text.text == drafted.text == expected and re.fullmatch(PHONE, phone.text)


@pytest.mark.parametrize("kwargs, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "Invalid type: nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format type must be one of"),
    ({"guided_regex": "(abc"}, "unclosed group"),
    ({"guided_regex": r"[^\s\S]"}, "no text this model's vocabulary can write matches it"),
    ({"guided_grammar": "start: foo("}, "grammar:"),
    ({"guided_regex": "a", "guided_grammar": 'start: "a"'}, "give one of"),
    ({"response_format": {"type": "json_object"}, "num_beams": 2}, "not in beam search"),
])
def test_bad_constraints_are_refused_in_one_line(lm, kwargs, message):
    with pytest.raises(CpmliveError, match=re.escape(message)):
        lm.generate("你好", max_new_tokens=4, **kwargs)


def test_a_vocabulary_without_braces_cannot_write_json():
    with pytest.raises(CpmliveError, match="has no token for '{': it cannot write JSON"):
        cpmlive.load("demo").generate("你好", response_format={"type": "json_object"})


def test_the_cli_takes_a_schema_and_refuses_a_bad_regex(tmp_path, capsys):
    from cpmlive.cli import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON), encoding="utf-8")
    assert main(["generate", "llama-demo", "个人信息：", "--max-new-tokens", "80", "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert main(["generate", "llama-demo", "你好", "--regex", "(abc"]) == 2
    err = capsys.readouterr().err
    assert "unclosed group" in err and len(err.strip().splitlines()) == 1


# ---- the server, through the official client --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(lm):
    with serving(create_app(lm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_response_format_on_completions_and_chat(client):
    for seed in (1, 2):
        answer = client.completions.create(model="llama-demo", prompt="个人信息：", max_tokens=80, temperature=0.9,
                                           seed=seed, extra_body={"response_format": AS_SCHEMA})
        jsonschema.validate(json.loads(answer.choices[0].text), PERSON)
        reply = client.chat.completions.create(model="llama-demo", messages=[{"role": "user", "content": "介绍你自己"}],
                                               max_tokens=80, seed=seed, response_format=AS_SCHEMA)
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    stream = client.chat.completions.create(model="llama-demo", messages=[{"role": "user", "content": "电话"}],
                                            max_tokens=20, stream=True, extra_body={"guided_regex": PHONE})
    assert re.fullmatch(PHONE, "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))


def test_json_object_and_guided_json(client):
    reply = client.chat.completions.create(model="llama-demo", messages=[{"role": "user", "content": "JSON"}],
                                           max_tokens=120, temperature=0, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut at max_tokens: a prefix of a JSON object
        assert reply.choices[0].message.content.startswith("{")
    answer = client.completions.create(model="llama-demo", prompt="个人信息：", max_tokens=80, temperature=0,
                                       extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(answer.choices[0].text), PERSON)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "Invalid type"),
    ({"guided_regex": "(abc"}, "unclosed group"),
    ({"guided_regex": r"[^\s\S]"}, "matches it"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "give one of"),
])
def test_bad_constraints_are_400s_and_the_server_goes_on(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model="llama-demo", prompt="你好", max_tokens=4, extra_body=extra)
    assert client.completions.create(model="llama-demo", prompt="你好", max_tokens=2, temperature=0).choices
