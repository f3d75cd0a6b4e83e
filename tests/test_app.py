"""``cpmlive serve``: the headline app's JSON API on the demo model, and its page in headless Chromium."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from serving import chromium_page, serving

import cpmlive
from cpmlive.api import LM
from cpmlive.cli import main
from cpmlive.apps.headline import MAX_ARTICLE_CHARS
from cpmlive.serve.app import (MAX_BODY_BYTES, MAX_NAME_CHARS, MAX_REQUEST_CHARS, MAX_TEXT_CHARS, MAX_TEXTS,
                               RETRY_AFTER_SECONDS, Settings, create_app)
from cpmlive.serve.dashboard import bind
from cpmlive.tune import delta
from cpmlive.tune.task import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
ARTICLE = ("新华社北京3月5日电 第十四届全国人民代表大会第二次会议今天上午在人民大会堂开幕。"
           "国务院总理作政府工作报告，提出今年经济社会发展的主要预期目标。")
FAST = {"num_beams": 2, "samples": 1}
GREEDY = {"num_beams": 1, "samples": 0}
SENTIMENT = ["正面", "负面"]
TOPICS = ["体育", "经济", "文化"]


@pytest.fixture(scope="module")
def lm() -> LM:
    return cpmlive.load("demo")


@pytest.fixture(scope="module")
def client(lm: LM) -> TestClient:
    return TestClient(create_app(lm))


def attach_untrained(lm: LM, name: str, spec: TaskSpec) -> None:
    """An adapter as ``lm.add_adapter`` would leave it, with fresh LoRA weights instead of a saved file."""
    delta.attach(lm.model, delta.DeltaConfig(method="lora"), name=name)
    lm.tasks[name] = spec


@pytest.fixture(scope="module")
def tuned_client() -> TestClient:
    """Several adapters on one base: a short title generator and two classifiers."""
    tuned = cpmlive.load("demo")
    attach_untrained(tuned, "headline", TaskSpec(max_output_tokens=8))
    attach_untrained(tuned, "sentiment", TaskSpec(task="classify", labels=SENTIMENT))
    attach_untrained(tuned, "topic", TaskSpec(task="classify", labels=TOPICS))
    tuned.use(None)
    return TestClient(create_app(tuned))


def assert_error(response, status: int, contains: str) -> None:
    """The app's one error shape: ``{"error": "one line"}`` as JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert list(answer) == ["error"] and "\n" not in answer["error"]
    assert contains in answer["error"], answer["error"]


def assert_bad_request(response, contains: str) -> None:
    assert_error(response, 400, contains)


# ---- API on the base model ------------------------------------------------------------------------


def test_page_and_health(client: TestClient) -> None:
    page = client.get("/title")
    assert page.status_code == 200 and "生成标题" in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert 'href="/"' in page.text and 'href="/dashboard"' not in page.text  # the site's bar, no run given
    assert client.get("/api/health").json() == {"model": "demo", "adapters": [], "tasks": {}}


@pytest.mark.slow
def test_titles_are_distinct_strings(client: TestClient) -> None:
    response = client.post("/api/titles", json={"article": ARTICLE, "n": 3, **FAST})
    assert response.status_code == 200, response.text
    answer = response.json()
    titles = answer["titles"]
    assert 1 <= len(titles) <= 3 and all(isinstance(t, str) and t.strip() for t in titles)
    assert len(set(titles)) == len(titles)
    assert answer["warning"] is None and answer["adapter"] is None and answer["seconds"] > 0


@pytest.mark.parametrize(("body", "contains"), [
    ({"article": " \n\t "}, "the article is empty"),
    ({"article": ""}, "the article is empty"),
    ({}, "article: Field required"),
    ({"article": 3}, "article: Input should be a valid string"),
    ({"article": ARTICLE, "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"article": ARTICLE, "n": 11}, "n: Input should be less than or equal to 10"),
    ({"article": ARTICLE, "num_beams": 64}, "num_beams"),
    ({"article": ARTICLE, "samples": -1}, "samples"),
    ({"article": ARTICLE, "seed": 2**40}, "seed"),
    ({"article": ARTICLE, "adapter": "nope"}, "no adapter named 'nope'"),
    (["not", "an", "object"], "the request body must be a JSON object"),
])
def test_bad_title_requests(client: TestClient, body: object, contains: str) -> None:
    assert_bad_request(client.post("/api/titles", json=body), contains)


def test_bad_json(client: TestClient) -> None:
    response = client.post("/api/titles", content=b'{"article": "abc', headers={"Content-Type": "application/json"})
    assert_bad_request(response, "not valid JSON")


@pytest.mark.slow
def test_long_article_is_truncated_with_a_warning(client: TestClient) -> None:
    article = (ARTICLE * (100_000 // len(ARTICLE) + 1))[:100_000]
    response = client.post("/api/titles", json={"article": article, "n": 1, **GREEDY})
    assert response.status_code == 200, response.text
    warning = response.json()["warning"]
    assert "truncated" in warning and str(MAX_ARTICLE_CHARS) in warning and "\n" not in warning


def test_classify_needs_a_classification_adapter(client: TestClient) -> None:
    assert_bad_request(client.post("/api/classify", json={"text": "好"}), "no classification adapter")


@pytest.mark.parametrize(("path", "body", "contains"), [
    ("/api/classify", {"text": ["好"] * (MAX_TEXTS + 1)}, f"text: Value should have at most {MAX_TEXTS} items"),
    ("/api/classify", {"text": "好" * (MAX_TEXT_CHARS + 1)}, f"text.0: String should have at most {MAX_TEXT_CHARS} "),
    ("/api/classify", {"text": ["好", "好" * (MAX_TEXT_CHARS + 1)]}, "text.1: String should have at most"),
    ("/api/classify", {"text": "好", "adapter": "a" * (MAX_NAME_CHARS + 1)}, "adapter: String should have at most"),
    ("/api/titles", {"article": "好" * (MAX_REQUEST_CHARS + 1), **GREEDY},
     f"article: String should have at most {MAX_REQUEST_CHARS} characters"),
])
def test_inputs_are_bounded(client: TestClient, path: str, body: dict, contains: str) -> None:
    assert_bad_request(client.post(path, json=body), contains)


def chunks(size: int) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), so only the bytes read can tell its size."""
    yield b'{"article": "'
    for _ in range(size // 65536 + 1):
        yield b"a" * 65536
    yield b'"}'


@pytest.mark.parametrize("chunked", [False, True])
def test_body_too_large(client: TestClient, chunked: bool) -> None:
    body = chunks(MAX_BODY_BYTES) if chunked else b"".join(chunks(MAX_BODY_BYTES))
    response = client.post("/api/titles", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 413, f"larger than {MAX_BODY_BYTES} bytes")


def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/api/nope"), 404, "Not Found")
    wrong = client.get("/api/titles")
    assert_error(wrong, 405, "Method Not Allowed")
    assert wrong.headers["allow"] == "POST"


def fake_titles(record: list[threading.Thread] | None = None) -> Callable[..., list[str]]:
    """``suggest_titles`` without the model (the app's scheduling is under test, not the titles)."""
    def suggest(*_: object) -> list[str]:
        if record is not None:
            record.append(threading.current_thread())
        return ["标题"]
    return suggest


def test_unexpected_exception_is_a_json_500(lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> list[str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr("cpmlive.serve.tasks.suggest_titles", broken)
    response = TestClient(create_app(lm), raise_server_exceptions=False).post("/api/titles", json={"article": "好"})
    assert_error(response, 500, "internal error (RuntimeError)")


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the request never reached the model"
        time.sleep(0.01)


def test_busy_model_answers_503(lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cpmlive.serve.tasks.suggest_titles", fake_titles())
    app = create_app(lm, Settings(max_batch=1, max_waiting=0))
    body = {"article": ARTICLE, **GREEDY}
    with TestClient(app) as client, ThreadPoolExecutor(1) as other_client:
        with lm.lock:  # the model is busy: the first request waits for it on the model's thread
            first = other_client.submit(client.post, "/api/titles", json=body)
            wait_until(lambda: app.state.server.in_flight == 1)
            busy = client.post("/api/titles", json=body)
            also_busy = client.post("/api/classify", json={"text": "好"})
        assert first.result().status_code == 200
        assert client.post("/api/titles", json=body).status_code == 200
    assert_error(busy, 503, "busy")
    assert busy.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert_error(also_busy, 503, "busy")


def test_model_work_runs_on_one_thread(lm: LM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread that runs torch keeps a malloc arena of its own: all model work shares one."""
    threads: list[threading.Thread] = []
    monkeypatch.setattr("cpmlive.serve.tasks.suggest_titles", fake_titles(threads))
    app = create_app(lm)
    body = {"article": ARTICLE, **GREEDY}
    for _ in range(3):  # a client outside ``with`` runs each request on an event loop of its own
        assert TestClient(app).post("/api/titles", json=body).status_code == 200
    with TestClient(app) as client, ThreadPoolExecutor(4) as clients:
        with lm.lock:
            answers = [clients.submit(client.post, "/api/titles", json=body) for _ in range(4)]
        assert all(answer.result().status_code == 200 for answer in answers)
    assert len(threads) == 7 and len(set(threads)) == 1 and threads[0] is not threading.main_thread()


# ---- adapters chosen per request --------------------------------------------------------------


def test_health_lists_adapters(tuned_client: TestClient) -> None:
    assert tuned_client.get("/api/health").json() == {
        "model": "demo", "adapters": ["headline", "sentiment", "topic"],
        "tasks": {"headline": "generate", "sentiment": "classify", "topic": "classify"}}


@pytest.mark.slow
def test_classify_with_the_requested_adapter(tuned_client: TestClient) -> None:
    topic = tuned_client.post("/api/classify", json={"text": ["比赛很精彩", "股市上涨"], "adapter": "topic"}).json()
    assert topic["adapter"] == "topic" and len(topic["labels"]) == 2 and set(topic["labels"]) <= set(TOPICS)
    default = tuned_client.post("/api/classify", json={"text": "这家店很好"}).json()
    assert default["adapter"] == "sentiment" and len(default["labels"]) == 1 and default["labels"][0] in SENTIMENT


@pytest.mark.slow
def test_titles_prefer_the_headline_adapter(tuned_client: TestClient) -> None:
    answer = tuned_client.post("/api/titles", json={"article": ARTICLE, "n": 1, **GREEDY}).json()
    assert answer["adapter"] == "headline" and isinstance(answer["titles"], list)


@pytest.mark.parametrize(("path", "body", "contains"), [
    ("/api/titles", {"article": ARTICLE, "adapter": "sentiment"}, "'sentiment' is for classify, not generate"),
    ("/api/classify", {"text": "好", "adapter": "headline"}, "'headline' is for generate, not classify"),
    ("/api/classify", {"text": "好", "adapter": "nope"}, "no adapter named 'nope'"),
    ("/api/classify", {"text": []}, "empty text"),
    ("/api/classify", {"text": ["好", " "]}, "empty text"),
    ("/api/classify", {"texts": "好"}, "text: Field required"),
])
def test_bad_adapter_requests(tuned_client: TestClient, path: str, body: dict, contains: str) -> None:
    assert_bad_request(tuned_client.post(path, json=body), contains)


# ---- the CLI verb ---------------------------------------------------------------------------------


def test_cli_unknown_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--adapter", "no-such-adapter"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "cpmlive: error: no-such-adapter: no such adapter directory or shipped adapter (shipped: headline, sentiment)"]


def test_cli_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with bind("127.0.0.1", 0) as busy:
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cpmlive: error: cannot listen on 127.0.0.1:")


# ---- the page in a browser ----------------------------------------------------------------------


def running_server(lm: LM):
    return serving(create_app(lm))


def health_seconds(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"{url}/api/health", timeout=10) as response:
        assert json.load(response)["model"] == "demo"
    return time.perf_counter() - start


def check_titles(page, url: str) -> None:
    page.fill("#article", ARTICLE)
    page.click("#generate")
    # read while busy, in one go: a quick generation re-enables the button right after
    busy = page.wait_for_function(
        "(() => { const b = document.getElementById('generate'); const s = document.querySelector('#status');"
        " return b.disabled ? {label: b.innerText, spinner: s.classList.contains('show')} : null; })()",
        timeout=2_000).json_value()
    assert "生成中" in busy["label"] and busy["spinner"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "title-app-loading.png"), full_page=True)
    assert health_seconds(url) < 3, "the server stopped answering while generating"
    page.wait_for_selector("#titles li", timeout=120_000)
    assert page.is_enabled("#generate") and not page.is_visible("#status")
    titles = page.locator("#titles li .text")
    assert titles.count() >= 1 and all(text.strip() for text in titles.all_inner_texts())
    assert not page.is_visible("#error")


def check_empty_article(page) -> None:
    page.fill("#article", "   ")
    page.click("#generate")
    page.wait_for_selector("#error.show", timeout=30_000)
    assert "the article is empty" in page.inner_text("#error")
    page.screenshot(path=str(ARTIFACTS / "title-app-error.png"), full_page=True, animations="disabled")


@pytest.mark.slow
def test_title_page_in_chromium(lm: LM) -> None:
    with running_server(lm) as url, chromium_page(1100, 900) as (page, errors):
        page.goto(f"{url}/title?beams={FAST['num_beams']}&samples={FAST['samples']}")
        page.wait_for_function("document.getElementById('model').textContent.includes('demo')")
        page.select_option("#count", "3")
        check_titles(page, url)
        page.screenshot(path=str(ARTIFACTS / "title-app.png"), full_page=True, animations="disabled")
        check_empty_article(page)
        page.click("#example")
        assert len(page.input_value("#article")) > 100
        assert errors == []
    assert (ARTIFACTS / "title-app.png").read_bytes()[:4] == b"\x89PNG"
