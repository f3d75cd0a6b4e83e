"""Decoding speed when other processes want the CPU: idle, +1 and +2 CPU-bound competitors.

On a 2-core machine a competitor takes a core; OpenMP threads that spin while their core is taken
stall every parallel region of a decoding step. cpmlive picks its OpenMP wait policy at start-up
(``model/runtime/threads.py``): this script measures batch-1 greedy decoding of ``--tokens`` tokens
(best of 3, each configuration in a fresh process) under each load for

- ``cpmlive``: as it starts by default;
- ``cpmlive, torch's defaults``: with ``CPMLIVE_THREAD_POLICY=off`` (OpenMP's own spinning waits);
- ``cpmlive, 1 thread``: ``OMP_NUM_THREADS=1``;
- ``llama.cpp``: llama-cpp-python on the GGUF twin of ``llama-demo`` (skipped when not installed),

on the CPM-Ant demo and on ``llama-demo`` (the model llama.cpp runs too). Each competitor is a
Python process spinning on one core. Run it by hand on an otherwise idle machine.

    python benchmarks/under_load.py [--tokens 64] [--models demo llama-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = """
import json, sys, time
import cpmlive
from cpmlive.infer.engine import Request
from cpmlive.infer.generate import GenerationConfig
lm = cpmlive.load(sys.argv[1])
tokens = int(sys.argv[2])
ids = lm.encode_prompt("宝玉笑道：")
options = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
lm.engine.submit(Request(ids, GenerationConfig(max_new_tokens=4))).result()
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    lm.engine.submit(Request(ids, options)).result()
    best = max(best, tokens / (time.perf_counter() - start))
print(json.dumps({"rate": best}))
"""

LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, seed=0)
tokens = int(sys.argv[2])
best = 0.0
for _ in range(3):
    llm.reset()
    llm.eval([1, 5, 6])
    start = time.perf_counter()
    for step in range(tokens):
        llm.eval([100 + step])
    best = max(best, tokens / (time.perf_counter() - start))
print(json.dumps({"rate": best}))
"""

CONFIGS = {
    "cpmlive": {},
    "cpmlive, torch's defaults": {"CPMLIVE_THREAD_POLICY": "off"},
    "cpmlive, 1 thread": {"OMP_NUM_THREADS": "1"},
    "cpmlive, libgomp spinning 10k": {"CPMLIVE_THREAD_POLICY": "off", "GOMP_SPINCOUNT": "10000"},
}


def competitors(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def measure(code: str, args: list[str], env: dict[str, str], load: int) -> float:
    running = competitors(load)
    try:
        time.sleep(0.5)  # let them take their cores
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    finally:
        for process in running:
            process.kill()
            process.wait()
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["rate"]


def gguf_twin(directory: Path) -> Path | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    path = directory / "llama-demo-f32.gguf"
    subprocess.run([sys.executable, "-m", "cpmlive", "convert", "llama-demo", str(path), "--to", "gguf", "--dtype",
                    "f32"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["demo", "llama-demo"])
    parser.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; batch-1 greedy decoding of {args.tokens} tokens, best of 3, tokens/s\n")
    header = " | ".join(f"+{n} competitors" if n else "idle" for n in args.loads)
    print(f"| model | runtime | {header} | kept at +{args.loads[-1]} |")
    print("|---|---|" + "---|" * len(args.loads) + "---|")
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            runs = [(name, OURS, [model, str(args.tokens)], env) for name, env in CONFIGS.items()]
            if model == "llama-demo":
                gguf = gguf_twin(Path(scratch))
                if gguf is not None:
                    runs.append(("llama.cpp (F32 GGUF)", LLAMA_CPP, [str(gguf), str(args.tokens)], {}))
                else:
                    print(f"| {model} | llama.cpp | not installed (pip install llama-cpp-python) |")
            for name, code, run_args, env in runs:
                rates = [measure(code, run_args, env, load) for load in args.loads]
                cells = " | ".join(f"{rate:.1f}" for rate in rates)
                print(f"| {model} | {name} | {cells} | {rates[-1] / rates[0]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
