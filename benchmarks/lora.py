"""LoRA (r=8 on attention q and v) against full fine-tuning of the same model on the same batch.

For each of {full, LoRA} x {fp32, bf16 autocast} a fresh subprocess builds the model (random
weights of the chosen shape, fp32 master weights), runs warm-up steps and then timed steps of
forward + backward + AdamW step on a next-token loss, and reports the median step time and
its peak RSS (``ru_maxrss``; the whole process, so each mode gets its own) together with its
RSS after imports. The parent then writes the LoRA adapter and the full checkpoint (fp32) and
compares their sizes on disk.

    python benchmarks/lora.py                          # the shipped demo model's shape
    python benchmarks/lora.py --shape tiny --steps 2   # a smoke run
    python benchmarks/lora.py --shape path/to/config.json --batch 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
MODES = [("full", "fp32"), ("lora", "fp32"), ("full", "bf16"), ("lora", "bf16")]


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def shape_config(shape: str):
    """``demo`` (the shipped model's config), a preset name, or a ``config.json`` path; fp32."""
    from cpmlive.resources import ASSETS
    from cpmlive.model.ant.config import PRESETS, AntConfig
    from cpmlive.model.registry import preset

    if shape == "demo":
        config = AntConfig.load(ASSETS / "demo" / "config.json")
    elif shape in PRESETS:
        config = preset(shape)
    else:
        config = AntConfig.load(shape)
    return AntConfig.from_dict({**config.to_dict(), "half": False})


def make_batch(config, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Generation-task rows: the task-2 prompt (context), then random text (left to right)."""
    import torch

    prompt = config.prompt_length
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, config.vocab_size, (batch, seq_len), generator=generator)
    ids[:, :prompt] = torch.arange(prompt) + 2 * prompt
    context = torch.zeros(batch, seq_len, dtype=torch.bool)
    context[:, :prompt] = True
    segment = torch.full((batch, seq_len), 2, dtype=torch.int32)
    segment[:, :prompt] = 0
    return {"input_ids": ids, "segment": segment, "context": context,
            "span": torch.zeros(batch, seq_len, dtype=torch.int32),
            "valid": torch.ones(batch, seq_len, dtype=torch.bool)}


def next_token_loss(model, batch: dict):
    """Cross-entropy of each text token given the positions before it."""
    import torch.nn.functional as F

    prompt = model.config.prompt_length
    logits = model.logits(model(**batch))[:, prompt - 1:-1]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["input_ids"][:, prompt:].flatten())


def child(mode: str, precision: str, args: argparse.Namespace) -> None:
    import torch

    from cpmlive.model.ant.model import build_model
    from cpmlive.train.core import autocast
    from cpmlive.tune.delta import DeltaConfig, attach, trainable_parameters

    baseline = rss_bytes()
    config = shape_config(args.shape)
    model = build_model(config, seed=0)
    if mode == "lora":
        attach(model, DeltaConfig(r=8, alpha=16))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(config, args.batch, args.seq_len)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast(precision):
            loss = next_token_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable, total = trainable_parameters(model)
    print(json.dumps({"step_s": statistics.median(times), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      * 1024, "baseline": baseline, "trainable": trainable, "total": total, "loss": loss.item()}))


def run_child(mode: str, precision: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, precision, "--shape", args.shape, "--batch",
               str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup",
               str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{mode}/{precision} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_sizes(shape: str) -> tuple[int, int]:
    """Bytes of the r=8 LoRA adapter and of the full fp32 checkpoint."""
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.checkpoint import save_checkpoint
    from cpmlive.tune.delta import DeltaConfig, adapter_size, attach, save_adapter

    config = shape_config(shape)
    model = build_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, config, Path(tmp) / "full")
        save_adapter(attach(model, DeltaConfig(r=8, alpha=16)), Path(tmp) / "lora")
        return adapter_size(Path(tmp) / "lora"), adapter_size(Path(tmp) / "full")


def print_tables(results: dict, sizes: tuple[int, int], args: argparse.Namespace) -> None:
    import torch

    tokens = args.batch * args.seq_len
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {args.shape}, batch {args.batch} x "
          f"{args.seq_len} tokens, median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| mode | precision | trainable / all params | step s | tokens/s | peak RSS MiB "
          "| peak - RSS after imports MiB |")
    print("|---|---|---|---|---|---|---|")
    for (mode, precision), r in results.items():
        print(f"| {mode} | {precision} | {r['trainable']:,d} / {r['total']:,d} | {r['step_s']:.3f} | "
              f"{tokens / r['step_s']:.0f} | {r['peak'] / MiB:.0f} | {(r['peak'] - r['baseline']) / MiB:.0f} |")
    print("\n| precision | step time full / LoRA | peak RSS full / LoRA | peak growth full / LoRA |")
    print("|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        full, lora = results[("full", precision)], results[("lora", precision)]
        growth = (full["peak"] - full["baseline"]) / max(1, lora["peak"] - lora["baseline"])
        print(f"| {precision} | {full['step_s'] / lora['step_s']:.2f}x | {full['peak'] / lora['peak']:.2f}x "
              f"| {growth:.2f}x |")
    adapter, checkpoint = sizes
    print("\n| on disk | bytes | MiB |\n|---|---|---|")
    print(f"| LoRA adapter (r=8, q+v, fp32) | {adapter:,d} | {adapter / MiB:.2f} |")
    print(f"| full checkpoint (fp32) | {checkpoint:,d} | {checkpoint / MiB:.2f} |")
    print(f"| ratio full / adapter | {checkpoint / adapter:.0f}x | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="demo", help="demo | a preset name | a config.json path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row, the 32 prompt tokens included")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    results = {(mode, precision): run_child(mode, precision, args) for mode, precision in MODES}
    print_tables(results, disk_sizes(args.shape), args)


if __name__ == "__main__":
    main()
