"""The server's runtime under issue 28 ("Hardening, round 3"): jobs stop when their request
ends and run in slices between the streams' steps (point 2), every cancelled generation is in
the metrics (point 4), connections and their headers are bounded (point 5), and a shutdown
ends the streams in flight with an error at once (point 8)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import aclosing

import pytest
from fastapi.testclient import TestClient
from serving import serving

import cpmlive
from cpmlive.data.layout import GENERATION, build_batch
from cpmlive.infer import engine as engine_module
from cpmlive.infer.engine import Cancelled, Engine, Request
from cpmlive.infer.generate import GenerationConfig
from cpmlive.serve import tasks
from cpmlive.serve.app import Settings, create_app, server_config
from cpmlive.serve.runtime import ServerError

PROMPT = "今天天气不错，"
BOUND = 30  # seconds: a guard against a hang, never a measurement


@pytest.fixture(scope="module")
def lm():
    return cpmlive.load("demo")


@pytest.fixture
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer)
    engine.start()
    yield engine
    engine.stop()


def forward(lm):
    """One model call, as each step of a job (a batch of classify, a decoding step of a title) makes."""
    batch = build_batch([lm.encode_raw(PROMPT)], GENERATION, lm.config.prompt_length)
    lm.model(**batch.as_inputs())


def long_request(lm, tokens=40):
    return Request(lm.encode_raw(PROMPT), GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens))


def address(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


# ---- point 2: jobs are cancellable between steps and run in slices ---------------------------------


def test_a_cancelled_job_stops_at_its_next_model_call(lm, engine):
    calls, reached, go = [], threading.Event(), threading.Event()

    def work():
        for index in range(50):
            forward(lm)
            calls.append(index)
            if index == 2:
                reached.set()
                go.wait(BOUND)
        return "ran to the end"

    job = engine.call(work)
    assert reached.wait(BOUND)
    job.cancel()  # while it runs, between its third and fourth model call
    go.set()
    assert isinstance(job.exception(timeout=BOUND), engine_module.Cancelled)
    assert calls == [0, 1, 2] and job.steps == 3


def test_streams_take_a_step_between_each_two_model_calls_of_a_job(lm, engine):
    log, streaming = [], threading.Event()

    def sink(event):  # on the engine's thread, as the job is: the log's order is the order of the work
        log.append("token")
        streaming.set()

    handle = engine.submit(long_request(lm), sink)
    assert streaming.wait(BOUND)

    def work():
        for _ in range(5):
            forward(lm)
            log.append("job")

    engine.call(work).result(timeout=BOUND)
    handle.cancel()
    first, last = log.index("job"), len(log) - 1 - log[::-1].index("job")
    assert log[first:last + 1] == ["job", "token"] * 4 + ["job"]


def test_a_timed_out_job_stops_and_holds_its_slot_until_it_has(lm, monkeypatch):
    app = create_app(lm, Settings(timeout=0.2))
    state = app.state.server
    started, gate, calls = threading.Event(), threading.Event(), []

    def endless(lm, body):
        started.set()
        gate.wait(BOUND)  # no model call until the answer went out
        while len(calls) < 1000:
            forward(lm)
            calls.append(1)
        return {}

    monkeypatch.setattr(tasks, "fill_for", endless)
    with TestClient(app) as test:
        response = test.post("/v1/fill", json={"text": "今天<mask>"})
    assert response.status_code == 504 and started.is_set()
    assert state.in_flight == 1  # the work has not stopped yet: its slot is still taken
    gate.set()
    state.engine.call(lambda: None).result(timeout=BOUND)  # runs once the timed-out job has ended
    assert calls == [] and state.in_flight == 0  # its first model call after the timeout stopped it


def test_a_client_that_disconnects_cancels_its_job(lm, monkeypatch):
    started, stopped, calls = threading.Event(), threading.Event(), []

    def endless(lm, body):
        started.set()
        try:
            while len(calls) < 1000:
                forward(lm)
                calls.append(1)
        finally:
            stopped.set()
        return {}

    monkeypatch.setattr(tasks, "labels_for", endless)
    with serving(create_app(lm)) as url:
        body = json.dumps({"text": "好"}).encode()
        with socket.create_connection(address(url)) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert started.wait(BOUND)
        assert stopped.wait(BOUND) and len(calls) < 1000


# ---- point 4: cancelled generations are in the metrics ----------------------------------------------


def metric(text, name):
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_cancelled_generations_are_counted_with_their_tokens_and_latencies(lm):
    app = create_app(lm)
    state, count = app.state.server, 3

    async def start_and_leave():
        generations = state.submit([long_request(lm, 100) for _ in range(count)])
        seen = set()
        async with aclosing(generations.events()) as events:
            async for index, event in events:
                seen.add(index)
                if len(seen) == count:
                    break  # the client is gone: what still runs is cancelled
        return generations.handles

    handles = asyncio.run(start_and_leave())
    assert all(h.done.wait(BOUND) for h in handles)
    assert [h.finish_reason for h in handles] == ["cancelled"] * count
    text = TestClient(app).get("/metrics").text
    assert metric(text, 'cpmlive_request_success_total{finished_reason="cancelled"}') == count
    assert metric(text, "cpmlive_generation_tokens_total") == sum(h.completion_tokens for h in handles) >= count
    assert metric(text, "cpmlive_prompt_tokens_total") == sum(h.prompt_tokens for h in handles)
    assert metric(text, "cpmlive_e2e_request_latency_seconds_count") == count
    assert metric(text, "cpmlive_time_to_first_token_seconds_count") == count


# ---- point 5: connections and header time are bounded ----------------------------------------------


def read_until(sock, marker):
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


def read_all(sock):
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_headers_that_do_not_arrive_in_time_close_the_connection(lm):
    app = create_app(lm, Settings(header_timeout=0.2))
    with serving(app, config=server_config(app, app.state.server.settings)) as url:
        with socket.create_connection(address(url), timeout=BOUND) as slow:
            slow.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            assert read_all(slow) == b""  # closed by the server, not by the guard's timeout
        with socket.create_connection(address(url), timeout=BOUND) as kept:
            kept.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until(kept, b'"alive"}').startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /livez HTTP/1.1\r\n")  # the next request on it trickles
            assert read_all(kept) == b""


def test_a_job_the_server_itself_stopped_answers_503_not_500(lm):
    """A second Ctrl-C stops the job under the request: that is the server shutting down."""
    state = create_app(lm).state.server

    def interrupted() -> None:
        raise Cancelled("interrupted")

    with pytest.raises(ServerError) as caught:
        asyncio.run(state.job(interrupted))
    assert (caught.value.status, caught.value.code) == (503, "shutdown")


def test_a_body_that_does_not_arrive_in_time_is_answered_408(lm):
    """Headers on time, then a trickled body: the connection must not be held for ever."""
    app = create_app(lm, Settings(header_timeout=0.2))
    with serving(app, config=server_config(app, app.state.server.settings)) as url:
        with socket.create_connection(address(url), timeout=BOUND) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            answer = read_until(slow, b"}}")
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.2 s" in answer
        served = http.client.HTTPConnection(*address(url), timeout=BOUND)  # a whole body is still read
        served.request("POST", "/v1/fill", body=json.dumps({"text": "北京<mask>"}),
                       headers={"Content-Type": "application/json"})
        assert served.getresponse().status == 200


def test_connections_beyond_the_cap_are_refused_while_the_others_are_served(lm):
    app = create_app(lm, Settings(max_connections=3))
    with serving(app, config=server_config(app, app.state.server.settings)) as url:
        idle = [socket.create_connection(address(url), timeout=BOUND) for _ in range(2)]
        try:
            served = http.client.HTTPConnection(*address(url), timeout=BOUND)  # the third connection
            served.request("GET", "/livez")
            assert served.getresponse().read() == b'{"status":"alive"}'
            with socket.create_connection(address(url), timeout=BOUND) as extra:  # the fourth
                answer = read_all(extra)
            assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
            served.request("GET", "/livez")  # the connections within the cap still work
            assert served.getresponse().status == 200
            served.close()
        finally:
            for sock in idle:
                sock.close()


# ---- point 8: Ctrl-C ends the streams in flight with an error, at once -------------------------------


def test_ctrl_c_ends_a_stream_in_flight_with_a_shutdown_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "stderr").open("w")
    server = subprocess.Popen([sys.executable, "-m", "cpmlive", "serve", "demo", "--port", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = ""
        while " at http://" not in line and server.poll() is None:  # the banner, once the port is bound
            line = server.stdout.readline()
        assert " at http://" in line, (line, (tmp_path / "stderr").read_text())
        host, port = address(line.split(" at ")[1].split("/ ")[0])
        wait_until_ready(host, port)
        conn = http.client.HTTPConnection(host, port, timeout=BOUND)
        body = {"model": "demo", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "n": 8, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # it runs
        server.send_signal(signal.SIGINT)
        events = [e.strip() for e in response.read().decode().split("\n\n") if e.strip()]  # socket timeout: BOUND
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "shutdown", events[-3:]
        assert server.wait(BOUND) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def wait_until_ready(host, port):
    deadline = time.monotonic() + 120  # the model loads behind the bound port
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=BOUND)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        finally:
            conn.close()
        time.sleep(0.1)
    pytest.fail("the server did not become ready")
