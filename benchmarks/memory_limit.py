"""``--memory-limit`` side by side with the whole model resident, each in its own process.

Writes a random-weight checkpoint (float32 at the ~450M shape, or the 10B shape in int8, built
one layer at a time so the float model never exists), then decodes the same prompt greedily in a
fresh process without a limit and with ``--memory-limit`` (``--ratio``: the model's size divided
by it, or ``--limit``), and prints per run: decode tokens/s (after the prefill, timed apart),
peak RSS (``VmHWM``), and whether the
ids equal the unlimited run's. The first pass reads the file from disk; the timed pass after it
streams from the page cache.

    python benchmarks/memory_limit.py                              # ~450M fp32, budget 1/5 of it
    python benchmarks/memory_limit.py --shape 10b-int8 --limit 4GB --skip-unlimited
    python benchmarks/memory_limit.py --keep /tmp/ckpt-450m        # reuse a checkpoint written before

Run it by hand (it is not a test).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {"450m": dict(dim_model=1280, num_heads=20, dim_head=64, dim_ff=3200, num_layers=22)}
PROMPT_IDS = [6, 1271, 2064, 9, 4417, 33, 1036, 25, 12, 1650, 300, 88]


def write_float(shape: str, target: Path) -> None:
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.checkpoint import save_checkpoint

    config = AntConfig(vocab_size=30720, half=False, **SHAPES[shape])
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.input_embedding.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    save_checkpoint(model, config, target)


def write_int8_10b(target: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quantize_10b import random_int8_model

    from cpmlive.model.checkpoint import save_checkpoint

    model = random_int8_model("ant-10b", "none")
    save_checkpoint(model, model.config, target)


def peak_rss() -> int:
    """This process's peak resident bytes (``VmHWM``: unlike ``ru_maxrss``, it does not inherit
    the parent's peak across fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(path: str, limit: int | None, new_tokens: int) -> None:
    from cpmlive.infer.generate import GenerationConfig, decode_steps, generate_ids
    from cpmlive.model.checkpoint import load_model
    from cpmlive.model.runtime.streaming import stream_weights

    model = load_model(path)
    note = ""
    if limit is not None:
        note = stream_weights(model, limit).describe()
    options = GenerationConfig(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1)
    with torch.no_grad():
        generate_ids(model, [PROMPT_IDS], GenerationConfig(max_new_tokens=2, min_new_tokens=2), 7)  # first pass
        start = time.perf_counter()
        steps = decode_steps(model, [PROMPT_IDS], options, stop_ids=7)
        ids = [next(steps)[0]]  # the prefill's token
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        ids += [emitted[0] for emitted in steps]
        seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps({"ids": ids, "tokens_per_s": new_tokens / seconds, "prefill_s": prefill, "peak_rss": peak,
                      "note": note}))


def run(path: Path, limit: int | None, new_tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", str(path), "--new-tokens", str(new_tokens)]
    if limit is not None:
        command += ["--limit-bytes", str(limit)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "child failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="450m", choices=[*SHAPES, "10b-int8"])
    parser.add_argument("--ratio", type=float, default=5.0, help="model size / memory limit")
    parser.add_argument("--limit", help="the memory limit (e.g. 4GB) instead of --ratio")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--keep", help="checkpoint directory to write once and reuse")
    parser.add_argument("--skip-unlimited", action="store_true", help="do not run without a limit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.limit_bytes, args.new_tokens)

    from cpmlive.model.runtime.streaming import parse_size

    path = Path(args.keep or f"/tmp/cpmlive-memory-{args.shape}")
    if not (path / "config.json").is_file():
        print(f"writing {path} ...", flush=True)
        write_int8_10b(path) if args.shape == "10b-int8" else write_float(args.shape, path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    limit = parse_size(args.limit) if args.limit else int(size / args.ratio)
    print(f"checkpoint {path}: {size / 1e9:.2f} GB of weights; memory limit {limit / 1e9:.2f} GB "
          f"({size / limit:.1f}x smaller)")
    rows = []
    if not args.skip_unlimited:
        rows.append(("no limit", run(path, None, args.new_tokens)))
    rows.append((f"--memory-limit {limit / 1e9:.2f} GB", run(path, limit, args.new_tokens)))
    print("| run | decode tokens/s | prefill of 12 tokens | peak RSS | peak RSS - limit | same ids |")
    print("|---|---|---|---|---|---|")
    for name, result in rows:
        same = "yes" if result["ids"] == rows[0][1]["ids"] else "NO"
        over = (result["peak_rss"] - limit) / 1e9 if "limit" in name else float("nan")
        print(f"| {name} | {result['tokens_per_s']:.2f} | {result['prefill_s']:.2f} s | "
              f"{result['peak_rss'] / 1e9:.2f} GB | {over:+.2f} GB | {same} |")
    if rows[-1][1]["note"]:
        print(rows[-1][1]["note"])


if __name__ == "__main__":
    main()
