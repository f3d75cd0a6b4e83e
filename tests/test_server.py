"""``cpmlive serve``'s OpenAI-compatible API through the official ``openai`` client, and the
server's guarantees: readiness, metrics, bounded queue, timeouts, cancellation on disconnect,
API keys, and 4xx (never 500) for bad input."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from serving import serving

import cpmlive
from cpmlive.data.chat import ChatTemplate
from cpmlive.infer.generate import GenerationConfig, generate_ids
from cpmlive.serve.app import MAX_BODY_BYTES, Settings, create_app, parse_adapter
from cpmlive.tune import delta
from cpmlive.tune.task import TaskSpec

PROMPT = "今天天气不错，"


@pytest.fixture(scope="module")
def lm():
    model = cpmlive.load("demo")
    for name, seed in (("alpha", 1), ("beta", 2)):  # two generation adapters that change the output
        delta.attach(model.model, delta.DeltaConfig(method="lora", r=4, alpha=8), name=name)
        with torch.no_grad():
            for key, param in model.model.named_parameters():
                if f"lora_B.{name}" in key:
                    param.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
        model.tasks[name] = TaskSpec()
    model.use(None)
    model.chat_templates["alpha"] = ChatTemplate()
    return model


@pytest.fixture(scope="module")
def app(lm):
    return create_app(lm)


@pytest.fixture(scope="module")
def server(app):
    with serving(app) as url:
        yield url


@pytest.fixture
def app_engine(app):
    return app.state.server.engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def direct(lm, text, adapter=None, max_new_tokens=12):
    """The reference: ``generate_ids`` on its own, not through the engine."""
    with delta.active_adapter(lm.model, adapter):
        ids = lm.encode_for(text, adapter)
        return lm.tokenizer.decode(generate_ids(lm.model, [ids], GenerationConfig(max_new_tokens=max_new_tokens),
                                                lm.tokenizer.eos_id)[0])


def test_models_list_the_base_and_its_adapters(client):
    assert [m.id for m in client.models.list()] == ["demo", "alpha", "beta"]


def test_greedy_completion_equals_direct_decoding(client, lm):
    answer = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == direct(lm, PROMPT)
    assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.prompt_tokens == len(lm.encode_prompt(PROMPT))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_stream_equals_the_whole_answer(client):
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0.8, seed=5)
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0.8, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": 4, "stream": True})
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    conn.close()


def test_several_prompts_n_and_seeds(client):
    answer = client.completions.create(model="demo", prompt=["北京", "上海"], max_tokens=8, n=2, temperature=1.0,
                                       seed=3)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="demo", prompt=["北京", "上海"], max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [c.text for c in answer.choices] == [c.text for c in again.choices]  # a seed reproduces
    assert answer.choices[0].text != answer.choices[1].text  # n choices are not copies


def test_logprobs_echo_and_stop(client, lm):
    answer = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    choice = choice_text = answer.choices[0]
    assert choice_text.text.startswith(PROMPT)
    logprobs = choice.logprobs
    prompt_tokens = len(lm.encode_prompt(PROMPT))
    assert logprobs.token_logprobs[:prompt_tokens] == [None] * prompt_tokens
    generated = logprobs.token_logprobs[prompt_tokens:]
    assert len(generated) == answer.usage.completion_tokens and all(v <= 0 for v in generated)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-5)  # greedy: the best is chosen
               for top, v in zip(logprobs.top_logprobs[prompt_tokens:], generated))
    full = direct(lm, PROMPT, max_new_tokens=12)
    stop = full[3:5]
    cut = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_each_request_gets_its_adapter_in_one_batch(client, lm):
    names = ["alpha", "demo", "beta", "alpha", "beta", "demo"]
    prompts = ["北京", "上海的", "今天", "我们", "新闻", "体育"]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda a: client.completions.create(model=a[0], prompt=a[1], max_tokens=10,
                                                                    temperature=0), zip(names, prompts)))
    got = [a.choices[0].text for a in answers]
    want = [direct(lm, p, None if n == "demo" else n, 10) for n, p in zip(names, prompts)]
    assert got == want
    base = [direct(lm, p, None, 10) for p in prompts]
    assert sum(w != b for w, b, n in zip(want, base, names) if n != "demo") >= 3  # the adapters matter


def test_chat_with_a_template(client, lm):
    messages = [{"role": "user", "content": "你好"}]
    answer = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    prompt = ChatTemplate().render(messages)
    reference = direct(lm, prompt, "alpha", 8)
    cut = reference.find("\n用户：")
    assert answer.choices[0].message.content == (reference if cut < 0 else reference[:cut])
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="demo", messages=messages)


@pytest.mark.parametrize(("kwargs", "error", "contains"), [
    ({"model": "nope", "prompt": "好"}, openai.NotFoundError, "does not exist"),
    ({"model": "demo", "prompt": "   "}, openai.BadRequestError, "empty prompt"),
    ({"model": "demo", "prompt": "好", "max_tokens": -1}, openai.BadRequestError, "max_tokens"),
    ({"model": "demo", "prompt": "好", "max_tokens": 10_000}, openai.BadRequestError, "ask for at most"),
    ({"model": "demo", "prompt": "好", "n": 50}, openai.BadRequestError, "n: "),
    ({"model": "demo", "prompt": "好", "temperature": "hot"}, openai.BadRequestError, "temperature"),
    ({"model": "demo", "prompt": "好", "logprobs": 50}, openai.BadRequestError, "logprobs"),
    ({"model": "demo", "prompt": "好", "stop": ["a"] * 9}, openai.BadRequestError, "stop"),
    ({"model": "demo", "prompt": "好", "presence_penalty": 1.0}, openai.BadRequestError, "presence_penalty"),
    ({"model": "demo", "prompt": "好", "min_tokens": 9, "max_tokens": 4}, openai.BadRequestError, "min_tokens"),
])
def test_bad_requests_are_4xx_with_openais_error_shape(client, kwargs, error, contains):
    extra = {k: kwargs.pop(k) for k in ("min_tokens",) if k in kwargs}
    with pytest.raises(error, match=contains) as caught:
        client.completions.create(**kwargs, extra_body=extra or None)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and "\n" not in body["message"]


def test_malformed_and_oversized_bodies(server):
    test = TestClient(create_app(cpmlive.load("demo")))
    for content, status in ((b"{not json", 400), (b"[1, 2]", 400), (b'{"model": "demo", "prompt": 5}', 400),
                            (b"x" * (MAX_BODY_BYTES + 1), 413)):
        response = test.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert test.get("/v1/nope").status_code == 404 and "error" in test.get("/v1/nope").json()


def test_metrics_after_requests(client, server):
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0)
    text = get_text(server, "/metrics")
    for name in ("cpmlive_num_requests_running", "cpmlive_num_requests_waiting", "cpmlive_kv_cache_used_bytes",
                 "cpmlive_time_to_first_token_seconds_count", "cpmlive_time_per_output_token_seconds_count",
                 "cpmlive_generation_tokens_total", "cpmlive_prompt_tokens_total"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("cpmlive_time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def get_text(url, path):
    """The body of a GET on the running server."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_healthz_is_503_while_loading(lm):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return lm

    app = create_app(slow_load)
    test = TestClient(app)
    loading = test.get("/healthz")
    assert loading.status_code == 503 and loading.json()["status"] == "loading" and "retry-after" in loading.headers
    assert test.post("/v1/completions", json={"model": "demo", "prompt": "好"}).status_code == 503
    assert test.get("/livez").status_code == 200
    loaded.set()
    app.state.loading.join(30)
    assert test.get("/healthz").json()["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(lm):
    app = create_app(lm, Settings(max_batch=1, max_waiting=0))
    with TestClient(app) as test, ThreadPoolExecutor(1) as other:
        with lm.lock:  # a fill job holds the engine's thread
            first = other.submit(test.post, "/v1/fill", json={"text": "今天<mask>"})
            deadline = time.monotonic() + 30
            while app.state.server.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = test.post("/v1/completions", json={"model": "demo", "prompt": "好", "max_tokens": 2})
        assert first.result().status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] and busy.json()["error"]["code"] == "overloaded"


def test_a_request_over_its_time_is_504(lm):
    app = create_app(lm, Settings(timeout=0.3))
    with TestClient(app) as test:
        with lm.lock:
            response = test.post("/v1/fill", json={"text": "今天<mask>"})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"


def test_a_client_that_disconnects_cancels_its_generation(lm, server, app_engine):
    engine = app_engine
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.fp.readline()  # the first chunk arrived: it is running
    assert engine.stats()["running"] == 1
    conn.close()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0  # long before 400 tokens


def test_api_key_guards_v1_only(lm):
    settings = Settings(api_key="s3cret")
    with serving(create_app(lm, settings)) as url:
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list()][0] == "demo"
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="demo", prompt="好")
        assert json.loads(get_text(url, "/healthz"))["status"] == "ok"


def test_api_key_guards_the_sites_api_too_but_not_health_or_preflight(lm):
    test = TestClient(create_app(lm, Settings(api_key="k", cors_origins=("http://ok.example",))))
    assert test.post("/api/titles", json={"article": "好"}).status_code == 401
    assert test.post("/api/fill", json={"text": "今天<mask>"}).status_code == 401
    assert test.get("/healthz").status_code == 200 and test.get("/").status_code == 200
    preflight = test.options("/v1/completions", headers={"Origin": "http://ok.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://ok.example"
    keyed = test.post("/api/fill", json={"text": "今天<mask>"}, headers={"Authorization": "Bearer k"})
    assert keyed.status_code == 200


def test_unpaired_surrogates_are_400_not_500(server):
    for path, body in (("/v1/completions", b'{"model": "demo", "prompt": "\\ud800", "echo": true}'),
                       ("/v1/fill", b'{"text": "\\ud800<mask>"}')):
        host, port = server.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 400, response.read()
        message = json.loads(response.read())["error"]["message"]
        assert message.startswith(("prompt: ", "text: ")) and ("surrogate" in message or "unicode" in message)
        conn.close()


def test_a_non_streaming_client_that_disconnects_cancels_too(lm, server, app_engine):
    import socket

    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while app_engine.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    deadline = time.monotonic() + 30
    while app_engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app_engine.stats()["running"] == 0


def test_no_cross_origin_access_unless_named(lm):
    plain = TestClient(create_app(lm)).get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in plain.headers
    allowed = TestClient(create_app(lm, Settings(cors_origins=("http://ok.example",))))
    answer = allowed.get("/v1/models", headers={"Origin": "http://ok.example"})
    assert answer.headers["access-control-allow-origin"] == "http://ok.example"


def test_adapter_flags():
    assert parse_adapter("headline") == (None, "headline")
    assert parse_adapter("mine=runs/a/adapter") == ("mine", "runs/a/adapter")
    assert parse_adapter("runs/x=y/adapter") == (None, "runs/x=y/adapter")


def test_admission_counts_generations_not_http_requests():
    from cpmlive.serve.runtime import ServerError, ServerState

    state = ServerState(Settings(max_batch=1, max_waiting=2))
    first = state.admit(2)  # e.g. one prompt with n=2
    with pytest.raises(ServerError) as refused:
        state.admit(2)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    third = state.admit(1)
    first.release()
    first.release()  # idempotent
    assert state.in_flight == 1
    third.release()
    assert state.in_flight == 0
    alone = state.admit(16)  # a single request larger than the bound is still let in when nothing runs
    alone.release()
