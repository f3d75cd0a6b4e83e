"""The server's runtime under issue 28 ("Hardening, round 3"): every cancelled generation is
in the metrics (point 4), connections and their headers are bounded (point 5)."""

from __future__ import annotations

import asyncio
import http.client
import socket
from contextlib import aclosing

import pytest
from fastapi.testclient import TestClient
from serving import serving

import cpmlive
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
from cpmlive.serve.app import Settings, create_app, server_config

PROMPT = "今天天气不错，"
BOUND = 30  # seconds: a guard against a hang, never a measurement


@pytest.fixture(scope="module")
def lm():
    return cpmlive.load("demo")


def long_request(lm, tokens=40):
    return Request(lm.encode_raw(PROMPT), GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens))


def address(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


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
