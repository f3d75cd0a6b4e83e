"""The memory planner against memory measured here: activations at shapes its law was not solved
on, the optimizer and gradient state of a real step, the KV cache a real forward fills."""

import json
import subprocess
import sys

import pytest
import torch

from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import model_class
from cpmlive.model.registry import preset
from cpmlive.train.plan import (PlanRequest, _proxy, activation_law, block_parameters, kv_cache_bytes,
                                measure_activations, parameter_count, parse_bytes, plan, tensor_shapes)


def test_sizes_read_as_gpus_are_sold():
    assert parse_bytes("80GB") == 80 * 2**30 and parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1000") == 1000
    for bad in ("eighty", "-3GB", "0"):
        with pytest.raises(CpmliveError):
            parse_bytes(bad)


@pytest.mark.parametrize("name", ["ant-tiny", "decoder-tiny", "bee-tiny", "cpm1-tiny"])
def test_parameter_counts_are_the_models(name):
    config = preset(name)
    model = model_class(config)(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert block_parameters(config) == sum(p.numel() for p in model.layers[0].parameters())


# (family preset, precision, a grouped key/value head count or None)
LAWS = [("ant-tiny", "fp32", None), ("bee-tiny", "fp32", None), ("decoder-tiny", "bf16", 2),
        ("cpm1-tiny", "bf16", None)]


@pytest.mark.parametrize("name,precision,kv", LAWS)
def test_activation_law_predicts_unseen_shapes(name, precision, kv):
    """Solved on dims 32-48 and 40-72 tokens; checked on wider, deeper, longer models."""
    config = preset(name)
    law = activation_law(config, precision)
    assert law.residual < 1e-9
    for h, f, a, d, layers, batch, seq in ((64, 96, 4, 16, 3, 3, 30), (80, 200, 8, 8, 4, 1, 100)):
        model = _proxy(config, h, f, a, d, kv or a, layers)
        for checkpointing in (False, True):
            measured = measure_activations(model, batch, seq, checkpointing, precision)
            predicted = law.bytes(model, batch, seq, checkpointing, precision=precision, recompute=False)
            assert predicted == measured, (h, f, a, d, layers, batch, seq, checkpointing)


def test_state_bytes_are_a_real_steps():
    """One process (N=1): the optimizer's moments and the gradients the planner counts are the
    bytes an AdamW step on the real model holds."""
    config = preset("ant-tiny")
    model = model_class(config)(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                  for key, t in state.items() if key != "step")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    (layout,) = plan(config, PlanRequest(gpus=1, seq=64, precision="fp32"))
    assert layout.per_device["optimizer_bytes"] == moments
    assert layout.per_device["gradients_bytes"] == grads + 4 * block_parameters(config)  # + one block in flight
    rest = parameter_count(config) - sum(p.numel() for p in model.layers.parameters())
    # + two blocks gathered at a time, and the root (embeddings, position bias, output norm) kept gathered
    assert layout.per_device["parameters_bytes"] == grads + 2 * 4 * block_parameters(config) + 4 * rest


@pytest.mark.parametrize("name", ["ant-tiny", "decoder-tiny"])
def test_kv_cache_bytes_are_a_filled_caches(name):
    config = preset(name)
    model = model_class(config)(config).eval()
    batch, seq = 2, 40
    cache = model.make_cache(batch, seq, "test")
    zeros = torch.zeros(batch, seq, dtype=torch.int32)
    with torch.no_grad():
        model(torch.zeros(batch, seq, dtype=torch.long), zeros, torch.ones(batch, seq, dtype=torch.bool), zeros,
              torch.ones(batch, seq, dtype=torch.bool), cache=cache)
    filled = sum(t[:, :, :seq].numel() * t.element_size() for t in (*cache.keys, *cache.values) if t is not None)
    assert kv_cache_bytes(config, batch, seq, 4) == filled


def test_layouts_shard_and_split_as_they_should():
    config = preset("ant-10b")
    layouts = {lay.tp: lay for lay in plan(config, PlanRequest(gpus=8, seq=1024))}
    assert sorted(layouts) == [1, 2, 4, 8]
    one, eight = layouts[1].per_device, layouts[8].per_device
    # blocks are split over all 8 devices either way; the rest (embeddings, position bias, norms) stays
    # whole on the tensor-parallel ranks, so FSDP splits it over dp only: 8 ways at tp=1, 1 way at tp=8
    rest = parameter_count(config) - sum(torch.Size(shape).numel() for name, shape in tensor_shapes(config).items()
                                         if name.startswith("layers."))
    assert eight["optimizer_bytes"] - one["optimizer_bytes"] == pytest.approx(8 * rest * (1 - 1 / 8), abs=2)
    assert eight["activations_bytes"] < one["activations_bytes"]
    assert eight["kv_cache_bytes"] * 8 == one["kv_cache_bytes"]
    assert one["activations_checkpointed_bytes"] < one["activations_bytes"]
    lora = plan(config, PlanRequest(gpus=4, gpu_memory=24 * 2**30, seq=512, adapter="lora"))
    assert [(lay.tp, lay.dp) for lay in lora] == [(1, 4)]  # replicas: the whole float32 model on each device
    assert lora[0].per_device["optimizer_bytes"] < 2**30
    assert lora[0].per_device["parameters_bytes"] > 4 * parameter_count(config)

    offload = plan(config, PlanRequest(gpus=1, seq=512, offload=True))[0]
    assert offload.per_device["optimizer_bytes"] == 0 and offload.host_bytes > 12 * parameter_count(config) * 0.99
    # only the layouts pretraining takes: CPM-1's biased projections are not split
    assert [lay.tp for lay in plan(preset("cpm1-tiny"), PlanRequest(gpus=2, seq=64))] == [1]
    with pytest.raises(CpmliveError, match="--offload and --tp apply to pretraining"):
        plan(config, PlanRequest(gpus=1, seq=512, offload=True, adapter="lora"))


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmlive", "plan", *args], capture_output=True, text=True, timeout=300)


def test_plan_cli_json_and_bad_input():
    result = run_plan("ant-tiny", "--gpus", "2", "--gpu-memory", "1GB", "--seq", "64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [lay["tp"] for lay in report["layouts"]] == [1, 2]
    keys = {"parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "kv_cache_bytes",
            "total_bytes"}
    assert keys <= set(report["layouts"][0]["per_device"])
    for args, says in ((("--gpus", "4", "--tp", "3"), "does not divide --gpus"),
                       (("--gpus", "3", "--tp", "3"), "does not divide the model's 4 heads"),
                       (("--gpu-memory", "1KB"), "smaller than one block"),
                       (("--seq", "99999"), "longer than the model's")):
        result = run_plan("ant-tiny", *args)
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1

