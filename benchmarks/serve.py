"""Load test of ``cpmlive serve`` over loopback, reported as vLLM's ``benchmark_serving.py`` does.

Starts ``python -m cpmlive serve`` in a subprocess (the demo model, or a random-weight model of
``--shape``), then

1. **load**: ``--clients`` concurrent clients each send ``--requests`` streamed
   ``/v1/completions`` one after another (``max_tokens`` = ``min_tokens`` = ``--max-tokens``, so
   every request generates the same count, as vLLM's ``--ignore-eos``). It checks that every
   request got exactly one complete answer (none lost, none duplicated: distinct ids, and the
   server's own count of finished generations grew by exactly the number sent), and prints
   TTFT, TPOT and ITL (mean, median, p99), requests/s and output tokens/s, and the server's RSS
   after ``--rss-early`` and after ``--rss-late`` answered requests;
2. **scaling**: output tokens/s of 1 stream and of ``--streams`` concurrent streams, and the ratio.

    python benchmarks/serve.py                          # demo model: 64 x 20 requests, then 1 vs 16 streams
    python benchmarks/serve.py --shape 80m --skip-load  # the ~80M shape, scaling only
    python benchmarks/serve.py --clients 8 --requests 5 --skip-scaling

Bounded in count (the requests given) and time (``--time-limit`` seconds for each phase). Run it
by hand, on an otherwise idle machine (it is not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from serve_memory import free_port

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
PROMPTS = ["今天天气不错，", "新华社北京3月5日电", "据报道，全省第一季度", "中国女排在昨晚进行的比赛中",
           "本报讯 记者从市气象局获悉，", "这家店的服务", "科学家发现", "随着互联网的发展，"]
SHAPES = {"80m": dict(dim_model=768, num_heads=12, dim_head=64, dim_ff=2048, num_layers=8)}


def random_model(shape: str, directory: Path) -> Path:
    """A checkpoint of ``shape`` with random weights and the demo's vocabulary."""
    sys.path.insert(0, str(ROOT / "src"))
    import cpmlive
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.checkpoint import VOCAB_NAME, save_checkpoint

    demo = cpmlive.load("demo")
    config = AntConfig(vocab_size=demo.config.vocab_size, half=False, **SHAPES[shape])
    target = directory / f"ant-{shape}"
    save_checkpoint(build_model(config, seed=0), config, target)
    (target / VOCAB_NAME).write_bytes((Path(demo.name) / VOCAB_NAME).read_bytes())
    return target


def start_server(model: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cpmlive", "serve", model, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def finished_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(r"^cpmlive_request_success_total\{[^}]*\} (\S+)$", text, re.M))


class Result:
    def __init__(self) -> None:
        self.ok, self.ident, self.ttft, self.latency, self.tokens = False, None, None, None, 0
        self.gaps: list[float] = []
        self.error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, model: str) -> Result:
    result = Result()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    idents = set()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                idents.add(chunk["id"])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ident = idents.pop() if len(idents) == 1 else None
    result.ok = result.ok and result.ident is not None and result.tokens == max_tokens
    return result


async def run_clients(url: str, model: str, clients: int, requests: int, max_tokens: int, time_limit: float,
                      on_done=None) -> tuple[list[Result], float]:
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(index: int) -> None:
            for j in range(requests):
                prompt = PROMPTS[(index + j) % len(PROMPTS)] + f"（{index}-{j}）"
                results.append(await one_request(client, url, prompt, max_tokens, model))
                if on_done is not None:
                    on_done(len(results))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(clients))), time_limit)
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.fmean(ordered), statistics.median(ordered), p99


def report(title: str, results: list[Result], duration: float) -> float:
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    print(f"============ {title} ============")
    print(f"{'Successful requests:':<40}{len(good)} of {len(results)}")
    print(f"{'Benchmark duration (s):':<40}{duration:.2f}")
    print(f"{'Total generated tokens:':<40}{tokens}")
    print(f"{'Request throughput (req/s):':<40}{len(good) / duration:.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{tokens / duration:.2f}")
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1 and r.ttft is not None]
    for name, values in (("TTFT", [r.ttft for r in good if r.ttft is not None]), ("TPOT", tpot),
                         ("ITL", [g for r in good for g in r.gaps])):
        mean, median, p99 = percentiles(values)
        print(f"{'Mean ' + name + ' (ms):':<40}{mean * 1e3:.2f}")
        print(f"{'Median ' + name + ' (ms):':<40}{median * 1e3:.2f}")
        print(f"{'P99 ' + name + ' (ms):':<40}{p99 * 1e3:.2f}")
    errors = sorted({r.error for r in results if r.error})
    for error in errors[:5]:
        print("error:", error)
    return tokens / duration


def load_phase(url: str, server: subprocess.Popen, args: argparse.Namespace, model: str) -> bool:
    rss: dict[int, float] = {}
    process = psutil.Process(server.pid)

    def on_done(count: int) -> None:
        if count in (args.rss_early, args.rss_late):
            rss[count] = process.memory_info().rss / MiB

    before = finished_count(url)
    results, duration = asyncio.run(run_clients(url, model, args.clients, args.requests, args.max_tokens,
                                                args.time_limit, on_done))
    after = finished_count(url)
    report(f"load: {args.clients} clients x {args.requests} requests", results, duration)
    sent = args.clients * args.requests
    idents = [r.ident for r in results if r.ok]
    lost = sent - len(idents)
    duplicated = len(idents) - len(set(idents))
    print(f"{'Requests sent / answered in full:':<40}{sent} / {len(idents)} (lost {lost}, duplicated {duplicated})")
    print(f"{'Generations the server finished:':<40}{after - before:.0f}")
    if args.rss_early in rss and args.rss_late in rss:
        growth = rss[args.rss_late] / rss[args.rss_early] - 1
        print(f"{'Server RSS after %d / %d requests:' % (args.rss_early, args.rss_late):<40}"
              f"{rss[args.rss_early]:.0f} MiB / {rss[args.rss_late]:.0f} MiB ({growth:+.1%})")
    return lost == 0 and duplicated == 0 and after - before == sent


def scaling_phase(url: str, args: argparse.Namespace, model: str) -> None:
    rates = {}
    for streams in (1, args.streams):
        results, duration = asyncio.run(run_clients(url, model, streams, args.scaling_requests, args.max_tokens,
                                                    args.time_limit))
        rates[streams] = report(f"scaling: {streams} concurrent stream(s)", results, duration)
    print(f"{'%d streams / 1 stream, output tok/s:' % args.streams:<40}{rates[args.streams] / rates[1]:.2f}x")


ENGINE_SCALING = """
import json, sys, time
import cpmlive
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
lm = cpmlive.load(sys.argv[1])
streams, tokens = int(sys.argv[2]), int(sys.argv[3])
ids = lm.encode_prompt("今天天气不错，")
options = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
lm.engine.submit(Request(ids, GenerationConfig(max_new_tokens=4))).result()
rates = {}
for count in (1, streams):
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        handles = [lm.engine.submit(Request(ids, options)) for _ in range(count)]
        for handle in handles:
            handle.result()
        best = max(best, count * tokens / (time.perf_counter() - start))
    rates[count] = best
print(json.dumps(rates))
"""


def engine_scaling(model: str, args: argparse.Namespace) -> None:
    """The same scaling without HTTP: the engine alone in a fresh process (the server shares this
    machine's cores with the load generator's clients; here nothing else runs)."""
    command = [sys.executable, "-c", ENGINE_SCALING, model, str(args.streams), str(args.max_tokens * 2)]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    rates = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    print(f"{'engine alone, 1 / %d streams, tok/s:' % args.streams:<40}{rates[1]:.1f} / {rates[args.streams]:.1f} "
          f"({rates[args.streams] / rates[1]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="serve a random-weight model of this shape")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--scaling-requests", type=int, default=6, help="requests per stream in the scaling phase")
    parser.add_argument("--rss-early", type=int, default=100)
    parser.add_argument("--rss-late", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=1200.0)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = str(random_model(args.shape, Path(tmp))) if args.shape else args.model
        name = Path(model).name if args.shape else "demo" if model == "demo" else Path(model).name
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, port)
        try:
            wait_ready(url, server)
            asyncio.run(run_clients(url, name, 2, 2, 4, 300))  # warm up (kernels, allocator)
            ok = True
            if not args.skip_load:
                ok = load_phase(url, server, args, name)
            if not args.skip_scaling:
                scaling_phase(url, args, name)
        finally:
            server.terminate()
            server.wait(30)
        if not args.skip_scaling:
            engine_scaling(model, args)
    if not ok:
        raise SystemExit("requests were lost or duplicated")


if __name__ == "__main__":
    main()
