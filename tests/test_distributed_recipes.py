"""finetune and align under torchrun (2 processes, gloo): the ranks keep replicas, split each
global batch and average the adapter's gradients; the losses and the adapter they end with are
one process's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmlive.model.checkpoint import read_safetensors
from cpmlive.train.metrics import latest_by_step, read_records
from test_align import world  # noqa: F401  (fixtures)
from test_finetune import base_dir, classify_data, generation_data  # noqa: F401

RTOL = 1e-4


def launch(verb: list[str], overrides: dict, nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        args = [sys.executable, "-m", "cpmlive", *verb]
    else:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "cpmlive", *verb]
    args += [f"{key}={value}" for key, value in overrides.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in latest_by_step(list(read_records(run)), "train")}


def same_run(one: Path, two: Path, adapter: bool = True) -> float:
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) and a
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst < RTOL, (a, b)
    name = "adapter_model.safetensors" if adapter else "model.safetensors"
    weights = [read_safetensors(run / "best" / name) for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    # Adam divides by the gradient's own size: an element whose gradient is ~0 can take a step of
    # either sign on float noise in the reduction, so tensors are compared as a whole
    for key in weights[0]:
        a, b = weights[0][key].double(), weights[1][key].double()
        assert (a - b).norm() <= 1e-3 * a.norm() + 1e-7, key
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("task", ["generate", "classify"])
def test_finetune_on_two_ranks_is_one_process(base_dir, generation_data, classify_data, tmp_path, task):  # noqa: F811
    data = generation_data if task == "generate" else classify_data
    common = {"model": base_dir, "data": data[0], "eval": data[1], "task": task, "batch_size": 8, "max_steps": 6,
              "lr": 0.01, "warmup_steps": 2, "eval_every": 3, "save_every": 3, "precision": "fp32",
              "progress": "false", "max_input_tokens": 32, "max_output_tokens": 8}
    if task == "classify":
        common["classify_loss"] = "labels"
    launch(["finetune"], {**common, "out": tmp_path / "one"}, 1)
    launch(["finetune"], {**common, "out": tmp_path / "two"}, 2)
    worst = same_run(tmp_path / "one", tmp_path / "two")
    evals = [[r for r in read_records(tmp_path / name) if r["type"] == "eval"] for name in ("one", "two")]
    assert [e["val_loss"] for e in evals[1]] == pytest.approx([e["val_loss"] for e in evals[0]], rel=RTOL)
    assert not (tmp_path / "two" / "metrics.jsonl").read_text().count('"type": "start"') > 1
    print(f"finetune {task}: 2 ranks vs 1 process, max relative loss difference {worst:.1e}")


@pytest.mark.slow
@pytest.mark.parametrize("method,tuning", [("sft", "lora"), ("rm", "lora"), ("dpo", "lora"), ("dpo", "full")])
def test_align_on_two_ranks_is_one_process(world, tmp_path, method, tuning):  # noqa: F811
    """With full tuning DPO's frozen reference copy is sharded over the ranks (FSDP2), which then
    all evaluate; the run is still one process's."""
    data = "sft" if method == "sft" else "pairs"
    common = {"model": world["base"], "data": world[data], "eval": world[data + "_dev"], "max_steps": 4,
              "eval_every": 2, "save_every": 2, "batch_size": 8, "progress": "false", "max_input_tokens": 40,
              "max_output_tokens": 12, "lr": 3e-3 if tuning == "lora" else 1e-3, "precision": "fp32",
              "tuning": tuning}
    launch(["align", method], {**common, "out": tmp_path / "one"}, 1)
    launch(["align", method], {**common, "out": tmp_path / "two"}, 2)
    worst = same_run(tmp_path / "one", tmp_path / "two", adapter=tuning == "lora")
    evals = [[r["val_loss"] for r in read_records(tmp_path / name) if r["type"] == "eval"] for name in ("one", "two")]
    assert evals[1] == pytest.approx(evals[0], rel=RTOL) and evals[0]
    print(f"align {method} ({tuning}): 2 ranks vs 1 process, max relative loss difference {worst:.1e}")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rollout_recipes_train_on_two_ranks(world, tmp_path, method):  # noqa: F811
    """Rollouts are sampled per rank (their random streams differ from one process's), so the
    trajectory is not one process's; the replicas still end with one adapter, which rank 0 saved."""
    common = {"model": world["base"], "data": world["sft"], "max_steps": 2, "eval_every": 2, "save_every": 2,
              "batch_size": 4, "reward": "rouge", "progress": "false", "max_input_tokens": 40,
              "max_output_tokens": 8, "precision": "fp32", **({"num_samples": 2} if method == "grpo" else {})}
    result = launch(["align", method], {**common, "out": tmp_path / method}, 2)
    records = [r for r in read_records(tmp_path / method) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2], result.stderr[-2000:]
    assert json.loads((tmp_path / method / "best" / "adapter_config.json").read_text())


@pytest.mark.slow
def test_bee_finetune_on_two_ranks_is_one_process(tmp_path):
    """CPM-Bee's fine-tuning (filled JSON tasks, its own packing) split over 2 ranks, across an
    epoch's end."""
    from pathlib import Path as P

    data = P(__file__).resolve().parent.parent / "recipes" / "data" / "bee-sft.jsonl"
    common = {"model": "bee-demo", "data": data, "batch_size": 4, "max_steps": 3, "lr": 1e-3, "warmup_steps": 1,
              "eval_every": 3, "save_every": 3, "precision": "fp32", "progress": "false"}
    launch(["finetune"], {**common, "out": tmp_path / "one"}, 1)
    launch(["finetune"], {**common, "out": tmp_path / "two"}, 2)
    # 10 tasks in batches of 4: steps 1-2 are one process's; step 3 ends the epoch, where one process
    # takes the 2 tasks left and the ranks fill their batch up from the next epoch (each needs rows)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert max(abs(one[s] - two[s]) / one[s] for s in (1, 2)) < RTOL


@pytest.mark.slow
def test_compress_prune_and_distill_on_two_ranks_is_one_process(tmp_path):
    """Pruning (gates and multipliers, distilled from the original) then distillation, split
    over 2 ranks: each step's losses and the pruned, distilled weights are one process's."""
    import yaml

    from cpmlive.model.checkpoint import read_weights
    from tiny_store import make_model_and_store

    (tmp_path / "setup").mkdir()
    model_dir, data = make_model_and_store(tmp_path / "setup")
    recipe = {"data": str(data), "seq_length": 96, "batch_size": 4, "save_every": 3, "progress": False,
              "calibration_rows": 4,
              "steps": [{"prune": {"target": 0.5, "steps": 6, "target_warmup_steps": 3, "mask_lr": 0.3,
                                   "lagrangian_lr": 0.5, "distill": {"temperature": 2.0, "alpha": 0.5}}},
                        {"distill": {"steps": 3, "lr": 1e-3}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    for name, nproc in (("one", 1), ("two", 2)):
        launch(["compress", str(model_dir), str(tmp_path / name), "--recipe", str(path)], {}, nproc)
    for step in ("step-1-prune", "step-2-distill"):
        a, b = (losses(tmp_path / f"{name}.run" / step) for name in ("one", "two"))
        assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) / abs(a[s]) for s in a) < RTOL, (step, a, b)
    ours, alone = read_weights(tmp_path / "two"), read_weights(tmp_path / "one")
    assert ours.keys() == alone.keys()
    for key in alone:
        torch.testing.assert_close(ours[key], alone[key], rtol=1e-4, atol=1e-5)
