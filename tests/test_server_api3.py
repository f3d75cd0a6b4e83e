"""The server's request surface, hardening round 3 (issue 28): ``/v1/bee`` bounds a task before
any model work and builds its prompt in linear Python steps; a route or verb a family cannot
serve says so in one line; strict request types and clear messages; the OpenAPI document."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, \
    status_code_conformance

import cpmlive
from cpmlive.data.bee import MAX_DEPTH, prompt_for, tree_arrays
from cpmlive.serve.app import create_app
from cpmlive.serve.bee import MAX_ANSWERS, MAX_TASK_CHARS, MAX_TASK_KEYS

TRANSLATE = {"input": "北京是中国的首都", "prompt": "中翻英", "<ans>": ""}


@pytest.fixture(scope="module")
def bee_lm():
    return cpmlive.load("bee-demo")


@pytest.fixture(scope="module")
def ant_lm():
    return cpmlive.load("demo")


@pytest.fixture(scope="module")
def bee_client(bee_lm):
    return TestClient(create_app(bee_lm))


@pytest.fixture(scope="module")
def ant_client(ant_lm):
    return TestClient(create_app(ant_lm))


def error_of(response) -> str:
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]


# ---- point 1: /v1/bee bounds a task before any work; prompt building is linear --------------------


def nested(depth: int) -> dict:
    value: dict | str = ""
    for level in range(depth):
        value = {f"k{level}": value}
    return {"<ans>": "", "deep": value}


def client_with_job_spy(lm) -> tuple[TestClient, list]:
    """A client of a server whose model thread records, and fails, any job that reaches it."""
    app = create_app(lm)
    jobs: list = []

    async def spy(work, *args, **kwargs):
        jobs.append(work)
        raise AssertionError("refused work reached the model's thread")

    app.state.server.job = spy
    return TestClient(app), jobs


@pytest.mark.parametrize(("task", "fragment"), [
    ({"input": "x", "<ans>": {f"q{i}": "" for i in range(MAX_ANSWERS + 1)}}, f"at most {MAX_ANSWERS}"),
    ({"<ans>": "", **{f"k{i}": {"a": "b"} for i in range(MAX_TASK_KEYS // 2 + 1)}}, f"at most {MAX_TASK_KEYS}"),
    ({"input": "好" * MAX_TASK_CHARS, "<ans>": ""}, f"at most {MAX_TASK_CHARS}"),
    (nested(MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
    ({"<ans>": {}}, "no answer to predict"),
    ({"input": 3, "<ans>": ""}, "every value must be a string"),
])
def test_an_oversized_or_bad_bee_task_is_refused_before_any_model_work(bee_lm, task, fragment):
    client, jobs = client_with_job_spy(bee_lm)
    for body in ({"task": task}, {"tasks": [TRANSLATE, task]}):
        assert fragment in error_of(client.post("/v1/bee", json=body))
    assert jobs == []


def test_the_5000_leaf_task_of_the_issue_is_refused_at_once(bee_client):
    task = {"input": "x" * 60_000, "<ans>": {f"问题{i}": "" for i in range(5000)}}
    assert "at most" in error_of(bee_client.post("/v1/bee", json={"task": task}))
    assert bee_client.get("/healthz").json()["status"] == "ok"


def python_calls(build) -> int:
    """Python and C function calls made by ``build()``: a count of steps, not a time."""
    calls = Counter()

    def count(frame, event, arg):
        calls[event] += 1

    sys.setprofile(count)
    try:
        build()
    finally:
        sys.setprofile(None)
    return calls["call"] + calls["c_call"]


def test_prompt_building_takes_linear_python_steps(bee_lm):
    def steps(leaves: int) -> int:
        task = {"input": "今天天气不错", "<ans>": {f"问题{i}": {"a": "", "b": ""} for i in range(leaves)}}
        return python_calls(lambda: prompt_for(bee_lm.tokenizer, task))

    small, large = steps(100), steps(400)
    assert large < 4.5 * small  # four times the leaves: linear is ~4x, the pairwise loop was ~16x


def pairwise_relations(data: dict) -> list[int]:
    """The original ``convert_data_to_id``'s relation table, pair by pair (the reference)."""
    nodes: list[tuple[int, list]] = [(0, [])]  # (depth, children), pre-order

    def build(value, depth: int) -> list[int]:
        if not isinstance(value, dict):
            nodes.append((depth, []))
            return [len(nodes) - 1]
        out = []
        for key, child in value.items():
            nodes.append((depth, []))
            index = len(nodes) - 1
            nodes[index][1].extend(build(child, depth + 1))
            out.append(index)
        return out

    nodes[0][1].extend(build(data, 1))
    count = len(nodes)
    table = [0] * count * count

    def bucket(up: int, down: int) -> int:
        value = up * MAX_DEPTH + down
        return value + 1 if value else 0

    def fill(node: int) -> list[int]:
        depth = nodes[node][0]
        below = [node]
        for child in nodes[node][1]:
            sub = fill(child)
            for a in sub:
                for b in below:
                    up, down = min(nodes[a][0] - depth, MAX_DEPTH - 1), min(nodes[b][0] - depth, MAX_DEPTH - 1)
                    table[a * count + b], table[b * count + a] = bucket(up, down), bucket(down, up)
            below.extend(sub)
        return below

    fill(0)
    return table


@pytest.mark.parametrize("data", [
    TRANSLATE,
    {"a": {"b": {"c": "x", "d": {"e": "y"}}, "f": "z"}, "<ans>": {"g": "", "h": {"i": ""}}},
    nested(MAX_DEPTH - 1) | {"wide": {f"k{i}": "v" for i in range(12)}},
])
def test_segment_relations_equal_the_pairwise_reference(bee_lm, data):
    arrays = tree_arrays(bee_lm.tokenizer, data)
    assert arrays.segment_rel.tolist() == pairwise_relations(data)


def test_a_lone_surrogate_anywhere_in_a_bee_task_is_400(bee_client):
    for body in (b'{"task": {"<ans>": "", "in\\ud800put": "x"}}',
                 b'{"task": {"<ans>": {"a": "\\udfff"}}}',
                 b'{"tasks": [{"<ans>": ""}, {"<ans>": "", "n": {"m": {"\\ud83d": "x"}}}]}'):
        response = bee_client.post("/v1/bee", content=body, headers={"Content-Type": "application/json"})
        assert "surrogate" in error_of(response), body
    assert json.loads(bee_client.post("/v1/bee", json={"task": TRANSLATE, "max_tokens": 2}).text)["result"]


def test_barred_columns_equal_the_per_column_loop(bee_lm):
    import torch

    from cpmlive.data.bee import batch_prompts
    from cpmlive.infer.bee import BARRED, barred_columns

    tokenizer = bee_lm.tokenizer
    tasks = [{"document": "今天<mask_0>和<mask_1>", "<ans>": {"<mask_0>": "", "<mask_1>": ""}},
             {"input": "😀 ☃ 北京", "<ans>": ""}, TRANSLATE]
    batch = batch_prompts([prompt_for(tokenizer, t) for t in tasks], tokenizer.vocab_size)
    width, columns = 2, tokenizer.vocab_size + len(batch.ext_ids)
    expected = torch.zeros(len(tasks) * width, columns)
    for task, table in enumerate(batch.row_tables):  # the original's loop
        rows = slice(task * width, (task + 1) * width)
        if tokenizer.unk_id not in table:
            expected[rows, tokenizer.unk_id] = BARRED
        for column in range(tokenizer.vocab_size, columns):
            if column not in table:
                expected[rows, column] = BARRED
    barred = barred_columns(batch, width, tokenizer.unk_id, tokenizer.vocab_size)
    assert len(batch.ext_ids) >= 2 and torch.equal(torch.zeros_like(expected).masked_fill_(barred, BARRED), expected)


# ---- point 3: what a family cannot do is refused in one line, everywhere ---------------------------

ARTICLE = "新华社北京电 今天，北京迎来了今年的第一场雪。市民纷纷走上街头赏雪拍照。"
ROUTES = [  # (method, path, ability, body)
    ("POST", "/v1/completions", "generate", {"model": "m", "prompt": "好", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", "chat", {"model": "m", "messages": [{"role": "user", "content": "好"}]}),
    ("POST", "/v1/fill", "fill", {"text": "今天<mask>"}),
    ("POST", "/api/fill", "fill", {"text": "今天<mask>"}),
    ("POST", "/v1/title", "title", {"article": ARTICLE, "num_beams": 1, "samples": 0}),
    ("POST", "/api/titles", "title", {"article": ARTICLE, "num_beams": 1, "samples": 0}),
    ("POST", "/v1/classify", "classify", {"text": "好"}),
    ("POST", "/api/classify", "classify", {"text": "好"}),
    ("POST", "/v1/bee", "bee", {"task": TRANSLATE, "max_tokens": 2}),
    ("GET", "/title", "title", None),
    ("GET", "/bee", "bee", None),
]


@pytest.mark.parametrize("model", ["demo", "bee-demo"])
def test_every_route_a_family_cannot_serve_is_a_400_naming_it(model, ant_lm, bee_lm):
    lm = ant_lm if model == "demo" else bee_lm
    client, jobs = client_with_job_spy(lm)
    refused = [route for route in ROUTES if not lm.family.can(route[2])]
    assert refused  # demo cannot answer JSON tasks; bee-demo does nothing else
    for method, path, ability, body in refused:
        for sent in (body, {"not": "even valid"}):  # refused before the body is looked at
            response = client.request(method, path, json=sent)
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            message = error["message"] if path.startswith("/v1") else error
            assert message.startswith(f"{lm.family.name} cannot ") and "needs a" in message, (path, message)
    assert jobs == []


@pytest.mark.parametrize("model", ["demo", "bee-demo"])
def test_every_python_method_a_family_cannot_do_says_so(model, ant_lm, bee_lm):
    from cpmlive.apps.headline import suggest_titles
    from cpmlive.errors import CpmliveError

    lm = ant_lm if model == "demo" else bee_lm
    calls = {"generate": lambda: lm.generate("好", max_new_tokens=1), "fill": lambda: lm.fill("今天<mask>"),
             "chat": lambda: lm.chat([{"role": "user", "content": "好"}]), "classify": lambda: lm.classify("好"),
             "title": lambda: suggest_titles(lm, ARTICLE), "bee": lambda: lm.bee(TRANSLATE, max_new_tokens=1)}
    for ability, call in calls.items():
        if not lm.can(ability):
            with pytest.raises(CpmliveError, match=f"^{lm.family.name} cannot "):
                call()


def test_the_title_verb_on_a_bee_model_is_one_line():
    from test_cli import assert_clean_error, run

    assert_clean_error(run("title", "--model", "bee-demo", ARTICLE), "CPM-Bee cannot suggest titles")


def test_the_bee_sites_bar_names_only_its_pages(bee_client, ant_client):
    assert "智取标题" not in bee_client.get("/").text and "CPM-Bee 任务" in bee_client.get("/").text
    assert "智取标题" in ant_client.get("/").text and ant_client.get("/title").status_code == 200


# ---- point 6: strict types, clear messages, model optional -------------------------------------------


@pytest.mark.parametrize(("path", "body", "fragment"), [
    ("/v1/completions", {"prompt": "好", "max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "好", "max_tokens": "4"}, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "好", "max_tokens": 4.5}, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "好", "temperature": "0"}, "temperature: Input should be a valid number"),
    ("/v1/completions", {"prompt": "好", "echo": "true"}, "echo: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": "好", "stream": 1}, "stream: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": "好", "seed": "1"}, "seed: Input should be a valid integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ("/v1/fill", {"text": "今天<mask>", "max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ("/v1/title", {"article": ARTICLE, "n": "3"}, "n: Input should be a valid integer"),
    ("/v1/bee", {"task": TRANSLATE, "max_tokens": True}, "max_tokens: Input should be a valid integer"),
])
def test_numbers_and_booleans_are_strict(path, body, fragment, ant_client, bee_client):
    client = bee_client if path == "/v1/bee" else ant_client
    assert fragment in error_of(client.post(path, json=body))


@pytest.mark.parametrize(("stop", "message"), [
    ("", "stop: an empty stop sequence would match before any text: leave it out"),
    (["好", ""], "stop.1: an empty stop sequence would match before any text: leave it out"),
    (["好"] * 10_000, "stop: at most 4 stop sequences, not 10000"),
    (["好"] * 5, "stop: at most 4 stop sequences, not 5"),
    (["好" * 65], "stop.0: String should have at most 64 characters"),
])
def test_stop_sequences_are_refused_with_the_reason(ant_client, stop, message):
    assert error_of(ant_client.post("/v1/completions", json={"prompt": "好", "stop": stop})) == message


def test_too_many_prompts_are_named(ant_client):
    assert error_of(ant_client.post("/v1/completions", json={"prompt": ["好"] * 17})) == \
        "prompt: at most 16 prompts, not 17"


def test_a_request_without_model_is_served_by_the_base_model(ant_client):
    body = {"prompt": "今天天气不错，", "max_tokens": 3, "temperature": 0}
    unnamed = ant_client.post("/v1/completions", json=body)
    assert unnamed.status_code == 200, unnamed.text
    named = ant_client.post("/v1/completions", json={**body, "model": "demo"}).json()
    assert unnamed.json()["model"] == "demo" and unnamed.json()["choices"] == named["choices"]
    streamed = ant_client.post("/v1/completions", json={**body, "stream": True}).text
    assert '"model": "demo"' in streamed and streamed.rstrip().endswith("data: [DONE]")
    chat = ant_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "好"}]})
    assert "the model 'demo' has no chat template" in error_of(chat)


# ---- point 7: the OpenAPI document, and the server held to it -----------------------------------------


def test_openapi_json_and_docs_are_served_with_every_body(ant_client):
    document = ant_client.get("/openapi.json").json()
    assert ant_client.get("/docs").status_code == 200 and "swagger" in ant_client.get("/docs").text.lower()
    schemas = document["components"]["schemas"]
    posts = {path: ops["post"] for path, ops in document["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/completions", "/v1/chat/completions", "/v1/fill", "/v1/title", "/v1/classify",
                          "/v1/bee", "/v1/embeddings", "/api/fill", "/api/titles", "/api/classify"}
    for path, operation in posts.items():
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert "422" not in operation["responses"] and "default" in operation["responses"], path
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert operation["responses"]["200"]["content"], path
    assert schemas["TitleRequest"]["required"] == ["article"] and schemas["ClassifyRequest"]["required"] == ["text"]
    assert {"id", "choices", "usage"} <= set(schemas["CompletionResponse"]["properties"])


def test_the_openapi_document_loads_while_the_model_does():
    assert create_app(None).openapi()["info"]["title"] == "cpmlive"


def test_a_bee_answer_matches_its_documented_body(bee_client):
    from cpmlive.serve.bee import BeeResponse

    answer = bee_client.post("/v1/bee", json={"tasks": [TRANSLATE], "max_tokens": 2}).json()
    assert BeeResponse.model_validate(answer).results and set(answer) == {"results", "adapter", "seconds"}


@pytest.fixture(scope="module")
def fuzzed_app():
    """A tiny random CPM-Ant of 64 positions with a chat template: every route's work stays small."""
    from conftest import ANT_VOCAB

    from cpmlive.api import LM
    from cpmlive.model.registry import preset
    from cpmlive.data.chat import ChatTemplate
    from cpmlive.model.ant.model import build_model
    from cpmlive.tokenizer import AntTokenizer
    from cpmlive.tune import delta
    from cpmlive.tune.task import TaskSpec

    config = preset("tiny")
    config.max_length = 128
    lm = LM(build_model(config, seed=1), AntTokenizer.from_file(ANT_VOCAB), name="tiny")
    lm.chat_templates[None] = ChatTemplate()
    delta.attach(lm.model, delta.DeltaConfig(method="lora", r=2, alpha=4), name="sentiment")
    lm.tasks["sentiment"] = TaskSpec(task="classify", labels=["正面", "负面"], max_input_tokens=32)
    lm.use(None)
    return create_app(lm)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_documented_example_is_answered_as_documented(fuzzed_app):
    """The request bodies' examples (what /docs offers to try) each get 200 and a body that
    matches the document (on the tiny CPM-Ant, which cannot answer /v1/bee or embed: 400 there)."""
    document = TestClient(fuzzed_app).get("/openapi.json").json()
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    answered = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        body = document["paths"][operation.path][operation.method.lower()].get("requestBody")
        if body is None:
            continue
        name = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        for example in document["components"]["schemas"][name]["examples"]:
            response = operation.Case(body=example, media_type="application/json").call_and_validate(checks=CHECKS)
            answered[response.status_code] += 1
            refused = operation.path in ("/v1/bee", "/v1/embeddings")
            assert response.status_code == (400 if refused else 200), (operation.label, example)
    assert answered == {200: 9, 400: 2}


def test_no_request_the_document_allows_is_a_5xx_or_off_the_document(fuzzed_app):
    """schemathesis over every operation of /openapi.json: up to 20 generated requests each (a
    fixed seed), each answered below 500 with a status, content type and body the document names.
    (Driven through its Python API: its pytest plugin's lazy schemas do not run on pytest 9.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 20
    for operation in operations:
        @settings(max_examples=20, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        call()
