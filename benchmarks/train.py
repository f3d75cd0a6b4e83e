"""Training speed: one optimizer step of ours (the step ``cpmlive pretrain`` runs) against HF
``CpmAntForCausalLM``'s training step, same shape, same weights, same token ids.

Every step is forward + loss + backward + gradient clipping (max norm 1.0) + AdamW step:

* HF: ``CpmAntForCausalLM(input_ids=..., labels=..., use_cache=False)`` in fp32, its default.
  It gets ``<s>`` plus the document's tokens (``seq - 32`` ids) and prepends its own 32 prompt
  positions, so ``seq`` positions go through the stack. Its loss is cross-entropy over every
  text position (labels = the next id) through its separate, untied ``lm_head``.
* ours: ``Trainer.train_step`` of ``cpmlive.train.pretrain`` itself (schedule, ``forward_backward``
  with ``masked_lm_loss`` under bf16 autocast or in fp32, ``clip_gradients``, ``make_optimizer``'s
  AdamW), fed the ``PretrainStream`` batch of the same documents: rows of ``seq`` positions (32
  prompt positions, ``<s>``, the first ``seq - 35`` tokens, ``</s>``, one padding position: the
  stream never fills a row exactly), one of the two CPM-Ant objectives per row.

Tokens/s = batch x seq / the median seconds of the timed steps (warm-up steps excluded). Each
case builds its own model and optimizer and frees them before the next, so only one is in
memory at a time.

    python benchmarks/train.py                                   # ~80M and ~450M, 4 x 512
    python benchmarks/train.py --shape 80m --steps 3
    python benchmarks/train.py --shape demo --seq 128 --batch 2 --steps 2 --warmup 1
    python benchmarks/train.py --shape 450m --modes hf,bf16 --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from decode import BOS, EOS, count, hf_config, millions, quiet_transformers, shape_config, table
from load_memory import peak_bytes, reset_peak

from cpmlive.model.ant.config import AntConfig
from cpmlive.data.objectives import IGNORE_INDEX, Batch
from cpmlive.data.stream import PretrainStream
from cpmlive.model.ant.model import CpmAnt, build_model
from cpmlive.model.ant.keys import ours_to_hf
from cpmlive.train.pretrain import PretrainConfig, RunState, Trainer, make_optimizer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "src" / "cpmlive" / "assets" / "demo" / "config.json"
MODES = ("hf", "bf16", "fp32")
MODE_LABELS = {"bf16": "ours, bf16 autocast", "fp32": "ours, fp32"}
FIRST_TOKEN_ID = 10  # ids below are special tokens
GiB = 1024**3


# ---- shapes, weights and data ------------------------------------------------------------------


def config_for(shape: str) -> AntConfig:
    """The benchmarks' ~80M / ~450M shapes, or the shipped demo model's (in fp32)."""
    if shape == "demo":
        return dataclasses.replace(AntConfig.load(DEMO_CONFIG), half=False)
    return shape_config(shape)


def random_model(config: AntConfig, seed: int = 0) -> CpmAnt:
    """Random weights as ``decode.build_ours`` makes them (a non-zero position bias), for any
    config; the same seed gives the same weights every time."""
    model = build_model(config, seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        model.position_bias.weight.copy_(torch.randn(model.position_bias.weight.shape, generator=generator))
    return model


def random_documents(config: AntConfig, batch: int, seq: int, seed: int) -> list[np.ndarray]:
    """``batch`` documents ``<s> ... </s>`` with ``seq - 33`` random non-special ids each."""
    generator = np.random.default_rng(seed)
    text = generator.integers(FIRST_TOKEN_ID, config.vocab_size, size=(batch, seq - config.prompt_length - 1))
    return [np.concatenate([[BOS], row, [EOS]]).astype(np.int64) for row in text]


class MemoryStore:
    """The parts of ``TokenStore`` that ``PretrainStream`` reads, over documents in memory."""

    def __init__(self, documents: list[np.ndarray]) -> None:
        self.documents = documents
        self.offsets = np.cumsum([0] + [len(d) for d in documents])
        self.meta = {"bos_id": BOS, "eos_id": EOS}
        self.directory, self.split = "(in memory)", "train"

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def document(self, index: int) -> np.ndarray:
        return self.documents[index]


def ours_batch(config: AntConfig, documents: list[np.ndarray], seq: int, batch: int) -> Batch:
    """The batch ``PretrainStream`` (as ``Trainer`` sets it up) makes of these documents."""
    stream = PretrainStream(MemoryStore(documents), seq, batch, seed=0, prompt_length=config.prompt_length,
                            vocab_size=config.vocab_size)
    out = stream.next_batch()
    if tuple(out.input_ids.shape) != (batch, seq):
        raise RuntimeError(f"expected a {batch} x {seq} batch, the stream made {tuple(out.input_ids.shape)}")
    return out


def hf_inputs(documents: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ids (each document without its ``</s>``) and its labels: the next id, none at the end."""
    ids = torch.from_numpy(np.stack([d[:-1] for d in documents]))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


# ---- the two training steps ----------------------------------------------------------------------


class FixedStream:
    """Stands in for ``PretrainStream``: the same batch at every step."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def next_batch(self) -> Batch:
        return self.batch


class BenchTrainer(Trainer):
    """``Trainer`` without the data directory, vocabulary and logs that ``__init__`` sets up:
    ``train_step`` and the hooks it calls are inherited unchanged."""

    def __init__(self, config: PretrainConfig, model: CpmAnt, batch: Batch) -> None:
        self.config = config
        self.model = self.prepare_model(model.train())
        self.stream = FixedStream(batch)
        self.optimizer = make_optimizer(self.model, config)
        self.state = RunState()


def pretrain_config(args: argparse.Namespace, precision: str) -> PretrainConfig:
    return PretrainConfig(data="(benchmark: one fixed batch)", seq_length=args.seq, batch_size=args.batch,
                          precision=precision, max_steps=args.warmup + args.steps)


def ours_step(config: AntConfig, documents: list[np.ndarray], args: argparse.Namespace,
              precision: str) -> Callable[[], float | None]:
    trainer = BenchTrainer(pretrain_config(args, precision), random_model(config),
                           ours_batch(config, documents, args.seq, args.batch))
    return lambda: trainer.train_step()["loss"]


def hf_model(config: AntConfig) -> torch.nn.Module:
    """HF ``CpmAntForCausalLM`` holding its own copy of the same random weights."""
    transformers = quiet_transformers()
    ours = random_model(config)
    state = {name: tensor.clone() for name, tensor in ours_to_hf(ours.state_dict(), config).items()}
    del ours
    with torch.device("meta"):
        hf = transformers.CpmAntForCausalLM(hf_config(config))
    hf.load_state_dict(state, assign=True)
    return hf.train()


def hf_optimizer(hf: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Our AdamW (``make_optimizer``) by default; with ``--hf-fused-adamw`` the fused one that
    HF's ``Trainer`` picks by default (``adamw_torch_fused`` with torch >= 2.8)."""
    config = pretrain_config(args, "fp32")
    if not args.hf_fused_adamw:
        return make_optimizer(hf, config)
    return torch.optim.AdamW(hf.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                             weight_decay=config.weight_decay, fused=True)


def hf_step(config: AntConfig, documents: list[np.ndarray], args: argparse.Namespace) -> Callable[[], float | None]:
    hf = hf_model(config)
    optimizer = hf_optimizer(hf, args)
    clip = pretrain_config(args, "fp32").grad_clip
    ids, labels = hf_inputs(documents)

    def step() -> float:
        loss = hf(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step: Callable[[], float | None], warmup: int, steps: int) -> tuple[list[float], float | None]:
    """Seconds of each timed step and the last loss."""
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    seconds = []
    for _ in range(steps):
        gc.collect()
        start = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - start)
    return seconds, loss


def run_case(config: AntConfig, documents: list[np.ndarray], args: argparse.Namespace, mode: str) -> dict:
    """Build the mode's model and optimizer, time its steps, free them; the peak RSS is the
    process's during this case (VmHWM reset first), weights and optimizer state included."""
    gc.collect()
    reset_ok = reset_peak()
    step = hf_step(config, documents, args) if mode == "hf" else ours_step(config, documents, args, mode)
    seconds, loss = time_steps(step, args.warmup, args.steps)
    peak = peak_bytes(reset_ok)
    del step
    gc.collect()
    median = statistics.median(seconds)
    return {"mode": mode, "seconds": seconds, "median_s": median, "tokens_per_s": args.batch * args.seq / median,
            "last_loss": loss, "peak_rss_gib": peak / GiB}


# ---- report --------------------------------------------------------------------------------------


def machine() -> dict:
    flags, model_name = set(), platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model_name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"cpu": model_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "amx": sorted(f for f in flags if f.startswith("amx")), "avx512_bf16": "avx512_bf16" in flags}


def describe_machine(info: dict) -> str:
    amx = ", ".join(info["amx"]) if info["amx"] else "no"
    return (f"CPU {info['cpu']}, torch threads {info['threads']}, torch {info['torch']}, "
            f"AMX: {amx}, avx512_bf16: {'yes' if info['avx512_bf16'] else 'no'}")


def cell(case: dict | None, key: str, spec: str) -> str:
    return format(case[key], spec) if case else "-"


def result_rows(results: list[dict]) -> list[list[str]]:
    """One row per ours mode (a single "HF only" row when only HF ran)."""
    rows = []
    for shape in results:
        by_mode = {case["mode"]: case for case in shape["cases"]}
        hf = by_mode.get("hf")
        label = f"{shape['shape']} ({shape['parameters']}), {shape['batch']} x {shape['seq']}"
        for mode in [m for m in ("bf16", "fp32") if m in by_mode] or [None]:
            ours = by_mode.get(mode)
            ratio = f"**{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x**" if hf and ours else "-"
            rows.append([f"{label}: {MODE_LABELS.get(mode, 'HF only')}", cell(hf, "tokens_per_s", ".1f"),
                         cell(ours, "tokens_per_s", ".1f"), ratio, cell(hf, "peak_rss_gib", ".1f"),
                         cell(ours, "peak_rss_gib", ".1f")])
    return rows


def write_json(report: dict, target: str) -> None:
    text = json.dumps(report, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


# ---- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=("80m", "450m", "demo"),
                        help="repeatable; default: 80m and 450m")
    parser.add_argument("--seq", type=int, default=512, help="positions per row, prompt included (default 512)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of hf,bf16,fp32 (default all three)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the random token ids")
    parser.add_argument("--hf-fused-adamw", action="store_true",
                        help="HF with fused AdamW (its Trainer's default) instead of our make_optimizer's")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="also write the results as JSON to PATH (no PATH: to stdout)")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= set(MODES) or not args.modes:
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.seq <= 64 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--seq must exceed 64; --batch and --steps >= 1; --warmup >= 0")
    return args


def run_shape(shape: str, args: argparse.Namespace) -> dict:
    config = config_for(shape)
    documents = random_documents(config, args.batch, args.seq, args.seed)
    cases = []
    for mode in args.modes:
        print(f"{shape}: {MODE_LABELS.get(mode, 'HF fp32')} ...", file=sys.stderr, flush=True)
        cases.append(run_case(config, documents, args, mode))
    with torch.device("meta"):
        parameters = millions(count(CpmAnt(config)))
    return {"shape": shape, "parameters": parameters, "batch": args.batch, "seq": args.seq, "cases": cases}


def main() -> None:
    args = parse_args()
    quiet_transformers()
    info = machine()
    shapes = args.shape or ["80m", "450m"]
    results = [run_shape(shape, args) for shape in shapes]
    print(describe_machine(info))
    hf_adamw = "fused AdamW" if args.hf_fused_adamw else "make_optimizer's AdamW, as ours"
    print(f"tokens/s = batch x seq / median step seconds; {args.steps} timed steps after {args.warmup} warm-up; "
          f"HF in fp32 with {hf_adamw}\n")
    print(table(["case", "HF tok/s", "ours tok/s", "ours / HF", "HF peak RSS GiB", "ours peak RSS GiB"],
                result_rows(results)))
    if args.json:
        write_json({"machine": info, "warmup": args.warmup, "steps": args.steps, "hf_optimizer": hf_adamw,
                    "results": results}, args.json)


if __name__ == "__main__":
    main()
