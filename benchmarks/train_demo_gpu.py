"""Train a demo model on one CUDA GPU within a fixed wall-clock budget, and write its weights.

Prepared on the CPU, run once on the device: it takes a token store (``cpmlive data prepare``,
small enough to carry), measures the step rate of the chosen size with a short calibration run,
sets ``max_steps`` so that the real run (bf16 via ``precision: auto``, cosine schedule over the
whole run) ends inside the budget, trains, and converts the last checkpoint to float16 shards in
``--out``. The size defaults to one larger than the CPU demo: a GPU buys far more compute in ten
minutes than the CPU does in an hour, and the compute-optimal size grows with compute.

    python benchmarks/train_demo_gpu.py --data data/demo-mix --minutes 10 --out $OUT/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZE = {"dim_model": 768, "dim_ff": 2048, "num_layers": 12, "num_heads": 12, "dim_head": 64, "max_length": 512}
MIXTURE = {"people-daily-1998": 2, "chinese-poetry": 0.1}


def pretrain(config: dict, work: Path, name: str) -> Path:
    config_path = work / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    # torchrun even for one process: the distributed trainer is the one that trains on CUDA
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    "-m", "cpmlive", "pretrain", "--config", str(config_path), "--resume", "auto"], check=True)
    return Path(config["out"])


def steady_rate(run_dir: Path) -> float:
    """Steps per second over the calibration run's second half (compilation and warm-up excluded)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") == "train"]
    half = steps[len(steps) // 2:]
    return (half[-1]["step"] - half[0]["step"]) / max(half[-1]["elapsed_s"] - half[0]["elapsed_s"], 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", required=True, help="where the float16 weights go")
    parser.add_argument("--work", default="runs/gpu-demo")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vocab_size = len((Path(args.data) / "vocab.txt").read_text("utf-8").splitlines())
    base = {"model": "tiny", "model_overrides": {**SIZE, "vocab_size": vocab_size}, "data": args.data,
            "mixture": MIXTURE, "seq_length": 512, "batch_size": args.batch_size, "lr": 1e-3, "min_lr": 1e-4,
            "schedule": "cosine", "weight_decay": 0.05, "grad_clip": 1.0, "precision": "auto", "seed": 0,
            "eval_batches": 16, "inspect_every": 1000, "keep_checkpoints": 1, "progress": False}
    started = time.monotonic()
    calibration = pretrain({**base, "out": str(work / "calibration"), "max_steps": 40, "warmup_steps": 5,
                            "eval_every": 1000, "save_every": 1000}, work, "calibration")
    remaining = args.minutes * 60 - (time.monotonic() - started)
    steps = max(10, int(0.9 * remaining * steady_rate(calibration)))
    print(f"calibrated: {steady_rate(calibration):.2f} steps/s; training {steps} steps", flush=True)
    run_dir = pretrain({**base, "out": str(work / "run"), "max_steps": steps, "warmup_steps": max(10, steps // 50),
                        "eval_every": max(50, steps // 10), "save_every": max(50, steps // 5)}, work, "run")
    final = sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "model"
    subprocess.run([sys.executable, "-m", "cpmlive", "convert", str(final), args.out, "--dtype", "float16"],
                   check=True)
    print(f"{steps} steps in {(time.monotonic() - started) / 60:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()
