"""Memory of a ``cpmlive serve`` process over many sequential requests.

Starts ``python -m cpmlive serve`` (the demo model with its shipped adapters, or ``--model``) in a
subprocess, sends ``--requests`` ``POST /api/titles`` (every third one a ``POST /api/classify``
too) with varied articles and seeds, in batches of ``--batch`` sent by ``--concurrency`` clients
at once, and prints the server's RSS (psutil) and thread count after each batch. A server whose
memory is bounded levels off after the first batches; one that leaks keeps growing.

    python benchmarks/serve_memory.py                     # 60 requests, RSS every 10
    python benchmarks/serve_memory.py --requests 40 --batch 5
    python benchmarks/serve_memory.py --concurrency 10    # 10 clients at once (busy answers counted)
    MALLOC_ARENA_MAX=2 python benchmarks/serve_memory.py  # the environment reaches the server

Run it by hand (it is not a test); ``PYTHONPATH=OTHER_CHECKOUT/src`` measures another version.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil

MiB = 1024 * 1024
ARTICLES = [
    "新华社北京3月5日电 第十四届全国人民代表大会第二次会议今天上午在人民大会堂开幕。"
    "国务院总理作政府工作报告，提出今年经济社会发展的主要预期目标。",
    "本报讯 记者从市气象局获悉，受冷空气影响，本周末我市将迎来大风降温天气，"
    "最低气温将降至零下五摄氏度，请市民注意防寒保暖。",
    "据新华社电 中国女排在昨晚进行的世界杯比赛中以三比零战胜对手，取得六连胜，"
    "主教练表示球队将继续保持良好状态，全力备战接下来的比赛。",
    "本报记者报道 全省第一季度地区生产总值同比增长百分之六点五，工业生产稳中有进，"
    "消费市场持续回暖，固定资产投资结构不断优化。",
]
REVIEWS = ["房间很干净，服务也好。", "等了一个小时才上菜，太差了。", "性价比很高，下次还来。"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> int:
    """The answer's HTTP status (a busy server's 503 is an answer too)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def title_body(i: int, args: argparse.Namespace) -> dict:
    article = ARTICLES[i % len(ARTICLES)] * (1 + i % 3)
    return {"article": article, "n": 3, "num_beams": args.beams, "samples": args.samples, "seed": i}


def one_request(url: str, i: int, args: argparse.Namespace) -> list[int]:
    statuses = [post(f"{url}/api/titles", title_body(i, args))]
    if args.model == "demo" and i % 3 == 0:
        statuses.append(post(f"{url}/api/classify", {"text": REVIEWS[: 1 + i % len(REVIEWS)]}))
    return statuses


def report(process: psutil.Process, done: int, statuses: list[int], start: float) -> None:
    rss = process.memory_info().rss / MiB
    busy = statuses.count(503)
    others = len(statuses) - busy - statuses.count(200)
    print(f"{done:4d} requests  rss {rss:7.1f} MiB  threads {process.num_threads():3d}  busy {busy:3d}  "
          f"failed {others:3d}  {time.perf_counter() - start:6.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1, help="clients sending at once")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cpmlive", "serve", "--model", args.model, "--port", str(port)])
    try:
        wait_ready(url, server)
        process = psutil.Process(server.pid)
        start, statuses = time.perf_counter(), []
        report(process, 0, statuses, start)
        with ThreadPoolExecutor(args.concurrency) as clients:
            for first in range(0, args.requests, args.batch):
                batch = range(first, min(first + args.batch, args.requests))
                for answer in clients.map(lambda i: one_request(url, i, args), batch):
                    statuses += answer
                report(process, batch.stop, statuses, start)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
