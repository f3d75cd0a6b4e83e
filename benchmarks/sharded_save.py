"""Peak memory per rank while a training checkpoint is written: sharded (DCP, ours) against the
full-state gather to rank 0 that cpmlive did before (and that FSDP users write by hand).

Under ``torchrun`` (gloo on CPU, as many ranks as asked), every rank builds the same CPM-Ant
shaped model, shards it with FSDP2 (``train.distributed.shard_model``), takes one AdamW step so
the optimizer holds its two moments, then saves twice, measuring each rank's RSS before and its
peak (VmHWM, reset first) during the save:

* ``sharded``: ``train.sharded.save_sharded`` (each rank writes its own shards);
* ``gathered``: ``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True`` and ``torch.save`` on rank 0.

The figures compared: the growth of each rank's peak over its resident size, against the rank's
share of the state (model + optimizer / world) and one transformer block's state (its weights
and both Adam moments): the claim is that a sharded save adds at most one block per rank.

    python benchmarks/sharded_save.py                 # 2 ranks, ~40M parameters
    python benchmarks/sharded_save.py --ranks 4 --layers 12
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from load_memory import peak_bytes, reset_peak, status_bytes

MiB = 1024 * 1024


def measured(action) -> tuple[int, int]:
    """(RSS before, peak growth during) ``action``."""
    gc.collect()
    before = status_bytes("VmRSS")
    reset_ok = reset_peak()
    action()
    return before, peak_bytes(reset_ok) - before


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from cpmlive.model.ant.config import AntConfig
    from cpmlive.model.ant.model import build_model
    from cpmlive.train.distributed import init_distributed, shard_model
    from cpmlive.train.sharded import save_sharded

    env = init_distributed()
    config = AntConfig(vocab_size=30720, dim_model=args.dim, dim_ff=args.dim * 11 // 4, num_layers=args.layers,
                       num_heads=args.dim // 64, dim_head=64)
    model = build_model(config, seed=0)
    block_bytes = 3 * sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    total_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    model = shard_model(model, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = Path(args.out)

    def sharded() -> None:
        save_sharded(out / "sharded", model, optimizer)

    def gathered() -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if env.is_main:
            torch.save({"model": model_state, "optimizer": optimizer_state}, out / "gathered.pt")
        del model_state, optimizer_state

    rows = {}
    for name, action in (("sharded", sharded), ("gathered", gathered)):
        dist.barrier()
        rows[name] = measured(action)
        dist.barrier()
    everything = [None] * env.world_size
    dist.all_gather_object(everything, {"rank": env.rank, **rows})
    if env.is_main:
        print(json.dumps({"ranks": everything, "block_bytes": block_bytes, "total_bytes": total_bytes,
                          "parameters": total_bytes // 12}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                   __file__, "--worker", "--out", tmp, "--dim", str(args.dim), "--layers", str(args.layers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    block, total, ranks = report["block_bytes"], report["total_bytes"], args.ranks
    share = total / ranks
    print(f"{report['parameters'] / 1e6:.1f}M parameters, {ranks} ranks (gloo, CPU); model + AdamW state "
          f"{total / MiB:.0f} MiB, a rank's share {share / MiB:.0f} MiB, one block {block / MiB:.1f} MiB")
    print("| rank | resident before | sharded save: peak growth | gathered save: peak growth | gathered / sharded |")
    print("|---|---|---|---|---|")
    for row in report["ranks"]:
        (base, dcp), (_, full) = row["sharded"], row["gathered"]
        print(f"| {row['rank']} | {base / MiB:.0f} MiB | {dcp / MiB:.1f} MiB ({dcp / block:.2f} blocks) | "
              f"{full / MiB:.1f} MiB ({full / block:.2f} blocks) | {full / max(dcp, 1):.1f}x |")
    worst = max(row["sharded"][1] for row in report["ranks"])
    print(f"sharded save: the largest growth is {worst / block:.2f} of one block "
          f"({'within' if worst <= block else 'ABOVE'} the share-plus-one-block bound)")


if __name__ == "__main__":
    main()
