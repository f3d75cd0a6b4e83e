"""The GPU paths in one prepared run (under 8 minutes on one GPU), printing one table.

    PYTHONPATH=src python3 benchmarks/gpu_check.py            # on a machine with CUDA
    PYTHONPATH=src python3 benchmarks/gpu_check.py --cpu      # the same stages, tiny, on the CPU

Stages (each is timed and reported, a failing one says why in one line and the rest go on):

* ``environment``: the device, its memory, torch, bf16;
* ``peak``: measured bf16 matmul FLOP/s (the MFU denominator);
* ``pretrain``: ``torchrun -m cpmlive pretrain`` in bf16 over NCCL (gloo on the CPU), world size 1
  and, with several GPUs, all of them: tokens/s and the loss falling;
* ``mfu``: bf16 training steps of a ~0.5B CPM-Ant shape: tokens/s, model FLOP utilisation
  (6 x parameters x tokens/s over the measured peak);
* ``finetune`` / ``align``: LoRA fine-tuning of the shipped demo model and ``align sft`` + ``dpo``
  of bee-demo on the shipped examples, ``device=cuda precision=bf16``: the loss falls;
* ``prefill`` / ``decode``: a CPM-Ant ~1B shape in bf16 on the device: prompt tokens/s, decoded
  tokens/s at batch 1 and 16;
* ``budget``: a CPM-Ant 10B-shape int8 model under a 6 GB device budget (``runtime.offload``:
  pinned host blocks copied one block ahead): peak device memory and decoded tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float]] = []

    def stage(self, name: str, run) -> None:
        started = time.perf_counter()
        try:
            status, figures = "ok", run()
        except Exception as exc:  # noqa: BLE001  (one stage's failure is reported; the others still run)
            lines = [line for line in traceback.format_exception_only(type(exc), exc)[-1].splitlines() if line]
            status, figures = "FAILED", lines[-1][:200] if lines else type(exc).__name__
        self.rows.append((name, status, figures, time.perf_counter() - started))
        print(f"[{name}] {status}: {figures}", file=sys.stderr, flush=True)

    def table(self) -> str:
        lines = ["| stage | status | figures | seconds |", "|---|---|---|---|"]
        lines += [f"| {name} | {status} | {figures} | {seconds:.0f} |" for name, status, figures, seconds in self.rows]
        return "\n".join(lines)


def cli(*args: str, env: dict | None = None, timeout: int = 300, torchrun: int = 0) -> str:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
                if torchrun else [sys.executable])
    command = launcher + ["-m", "cpmlive", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        said = [line for line in lines if line.startswith("cpmlive")] or lines[-1:]
        raise RuntimeError(f"{' '.join(args[:2])}: {said[0] if said else 'failed'}")
    return result.stdout


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "train"]


def falling(records: list[dict], check: bool = True) -> str:
    """The loss from the first step to the last; with ``check``, it must have fallen."""
    first, last = records[0]["loss"], records[-1]["loss"]
    if check and not last < first:
        raise RuntimeError(f"the loss did not fall ({first:.3f} -> {last:.3f})")
    return f"loss {first:.3f} -> {last:.3f}"


# ---- stages ---------------------------------------------------------------------------------


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name}, {props.total_memory / GiB:.0f} GiB, sm_{props.major}{props.minor}, "
                f"{torch.cuda.device_count()} GPU(s), torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    return f"CPU fallback, torch {torch.__version__}"


def peak_flops(device: torch.device, quick: bool) -> float:
    size = 512 if quick else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 3 if quick else 50
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_store(root: Path) -> Path:
    """A small token store from generated lines over the demo model's vocabulary."""
    from cpmlive.data.store import prepare
    from cpmlive.resources import model_path

    vocab = model_path("demo") / "vocab.txt"
    words = ["模型", "训练", "数据", "中文", "语言", "生成", "文本", "大", "的", "了", "在", "是"]
    lines = ["".join(words[(i * k) % len(words)] for k in range(1, 30)) + f"第{i}段。" for i in range(2000)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "store"
    prepare([str(corpus)], vocab, out, val_fraction=0.05, progress=False, workers=1)
    (out / "vocab.txt").write_bytes(vocab.read_bytes())
    return out


def pretrain(root: Path, device: torch.device, quick: bool) -> str:
    store = token_store(root)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    figures = []
    for world in sorted({1, gpus}):
        run = root / f"pretrain-{world}"
        steps = 8 if quick else 40
        shape = (["model_overrides.num_layers=2"] if quick else
                 ["model_overrides.dim_model=1024", "model_overrides.dim_ff=2816", "model_overrides.num_layers=8",
                  "model_overrides.num_heads=16", "model_overrides.dim_head=64"])
        vocab = len((store / "vocab.txt").read_text(encoding="utf-8").splitlines())
        cli("pretrain", f"data={store}", f"out={run}", "model=tiny", f"model_overrides.vocab_size={vocab}", *shape,
            "seq_length=256" if quick else "seq_length=1024", f"batch_size={2 * world if quick else 8 * world}",
            f"max_steps={steps}", "warmup_steps=2", f"eval_every={steps}", f"save_every={steps}", "progress=false",
            "precision=bf16", torchrun=world, timeout=600)
        records = train_records(run)
        speed = sum(r["tokens_per_s"] for r in records[len(records) // 2:]) / len(records[len(records) // 2:])
        figures.append(f"{world} rank(s): {speed:,.0f} tok/s, {falling(records, check=not quick)}")
    return "; ".join(figures)


def ant_ids(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Rows as CPM-Ant reads them: its 32 prompt positions, then text ids."""
    ids = torch.randint(1, 30000, (batch, seq), device=device)
    ids[:, :32] = torch.arange(32, device=device)
    return ids


def mfu(device: torch.device, peak: float, quick: bool) -> str:
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model
    from cpmlive.train.core import autocast

    dims = (256, 4, 4, 64, 256, 2) if quick else (2048, 10, 32, 64, 2048, 8)
    dim, layers, heads, dim_head, seq, batch = dims
    config = AntConfig(vocab_size=30720, dim_model=dim, dim_ff=dim * 11 // 4, num_layers=layers, num_heads=heads,
                       dim_head=dim_head, half=False, max_length=seq)
    model = build_model(config, device=device, seed=0).train()
    model.gradient_checkpointing = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = ant_ids(batch, seq, device)
    zeros = torch.zeros(batch, seq, dtype=torch.int32, device=device)
    ones = torch.ones(batch, seq, dtype=torch.bool, device=device)

    def step() -> None:
        with autocast("bf16", device):
            hidden = model(ids, zeros, ones, zeros, ones)
            loss = torch.nn.functional.cross_entropy((hidden @ model.input_embedding.weight.T).flatten(0, 1).float(),
                                                     ids.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    steps = 2 if quick else 10
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    tokens_s = batch * seq * steps / (time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    if quick:  # a tiny matmul on two shared cores is no peak to divide by
        return f"{params / 1e6:.0f}M params, {tokens_s:,.0f} tok/s (MFU is measured on a GPU only)"
    # 6 N per token, plus the recomputed forward (2 N) of activation checkpointing, as hardware FLOPs
    used = 8 * params * tokens_s
    return (f"{params / 1e6:.0f}M params, {tokens_s:,.0f} tok/s, MFU {6 * params * tokens_s / peak:.1%} "
            f"(HFU {used / peak:.1%}) of the measured {peak / 1e12:.0f} TFLOP/s")


def finetune(root: Path, device: torch.device, quick: bool) -> str:
    data = root / "sentiment.jsonl"
    good, bad = ["很好", "喜欢", "满意", "推荐"], ["很差", "失望", "糟糕", "退货"]
    rows = [{"input": f"这个东西{(good if i % 2 else bad)[i % 4]}，第{i}次。", "label": "正面" if i % 2 else "负面"}
            for i in range(64)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    run = root / "finetune"
    cli("finetune", "model=demo", f"data={data}", "task=classify", f"out={run}", f"max_steps={6 if quick else 30}",
        "batch_size=8", "lr=5e-3", "warmup_steps=2", "eval_every=1000", "save_every=1000", "progress=false",
        f"device={device}", "precision=bf16", "classify_loss=labels", timeout=600)
    return falling(train_records(run), check=not quick)


def align(root: Path, device: torch.device, quick: bool) -> str:
    figures = []
    for method, data in (("sft", "bee-sft.jsonl"), ("dpo", "bee-dpo.jsonl")):
        run = root / f"align-{method}"
        cli("align", method, "model=bee-demo", f"data={ROOT / 'recipes' / 'data' / data}", f"out={run}",
            f"max_steps={4 if quick else 20}", "batch_size=4", "lr=1e-3", "warmup_steps=1", "eval_every=1000",
            "save_every=1000", "progress=false", f"device={device}", "precision=bf16", timeout=600)
        figures.append(f"{method} {falling(train_records(run), check=not quick)}")
    return "; ".join(figures)


def decoding(device: torch.device, quick: bool) -> str:
    from cpmlive.infer.generate import GenerationConfig, generate_ids
    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model

    dim, layers, heads = (128, 2, 4) if quick else (2048, 24, 32)
    config = AntConfig(vocab_size=30720, dim_model=dim, dim_ff=dim * 5 // 2, num_layers=layers, num_heads=heads,
                       dim_head=dim // heads, half=False, max_length=4096)
    model = build_model(config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                        seed=0).eval()
    prompt = 64 if quick else 2048
    ids = ant_ids(1, prompt, device)
    zeros = torch.zeros(1, prompt, dtype=torch.int32, device=device)
    ones = torch.ones(1, prompt, dtype=torch.bool, device=device)
    with torch.no_grad():
        model(ids, zeros, ones, zeros, ones)
        sync(device)
        started = time.perf_counter()
        model(ids, zeros, ones, zeros, ones)
        sync(device)
    prefill = prompt / (time.perf_counter() - started)
    figures = [f"{model.num_parameters() / 1e9:.2f}B bf16, prefill {prefill:,.0f} tok/s"]
    new = 8 if quick else 128
    for batch in (1, 16):
        rows = [list(range(5, 37))] * batch
        generation = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
        generate_ids(model, rows, GenerationConfig(max_new_tokens=2), stop_ids=-1)
        sync(device)
        started = time.perf_counter()
        out = generate_ids(model, rows, generation, stop_ids=-1)
        sync(device)
        figures.append(f"decode batch {batch}: {sum(map(len, out)) / (time.perf_counter() - started):,.0f} tok/s")
    return ", ".join(figures)


def budget(device: torch.device, quick: bool) -> str:
    """A 10B-shape int8 model (codes left as the allocator gives them: memory and speed are the
    point, not the text) decoding under a 6 GB device budget."""
    from cpmlive.config import QuantConfig
    from cpmlive.infer.generate import GenerationConfig, generate_ids
    from cpmlive.model.checkpoint import empty_model
    from cpmlive.model.registry import preset
    from cpmlive.model.runtime.offload import offload_to_device

    config = preset("ant-tiny" if quick else "ant-10b")
    config.quantization = QuantConfig(bits=8)
    config.num_layers = 6 if quick else config.num_layers
    model = empty_model(config).to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02) if "scale" not in name else tensor.fill_(1e-3)
            else:
                tensor.random_(-8, 8)
    block = sum(t.numel() * t.element_size() for t in model.layers[0].state_dict().values())
    everything = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = 6 * GiB if not quick else everything - len(model.layers) * block + 5 * block // 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the stream's plan leaves room for what runs beside it: one layer's dequantized weights, the head's
    # (vocab x dim) float copy, activations and the KV cache
    headroom = GiB if not quick else 0
    stream = offload_to_device(model, limit - headroom, device)
    new = 4 if quick else 16
    with torch.no_grad():
        started = time.perf_counter()
        out = generate_ids(model, [list(range(5, 37))], GenerationConfig(max_new_tokens=new, min_new_tokens=new),
                           stop_ids=-1)
        sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else stream.peak_bytes
    if peak > limit:
        raise RuntimeError(f"peak device memory {peak / GiB:.2f} GiB is over the {limit / GiB:.2f} GiB budget")
    return (f"{stream.describe()}; peak {peak / GiB:.2f} GiB of {limit / GiB:.2f}; "
            f"{len(out[0]) / seconds:.2f} tok/s at batch 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback: every stage, tiny shapes")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages")
    args = parser.parse_args(argv)
    quick = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    report = Report()
    peak = [1.0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stages = {
            "environment": lambda: environment(device),
            "peak": lambda: f"{peak.__setitem__(0, peak_flops(device, quick)) or peak[0] / 1e12:.1f} TFLOP/s bf16",
            "pretrain": lambda: pretrain(root, device, quick),
            "mfu": lambda: mfu(device, peak[0], quick),
            "finetune": lambda: finetune(root, device, quick),
            "align": lambda: align(root, device, quick),
            "decode": lambda: decoding(device, quick),
            "budget": lambda: budget(device, quick),
        }
        for name, run in stages.items():
            if args.only is None or name in args.only or name == "environment":
                report.stage(name, run)
    print(report.table())
    return 1 if any(status != "ok" for _, status, _, _ in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
