"""Several processes (torchrun, FSDP2, gloo on CPU) train exactly like one, and share checkpoints."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmlive.data.objectives import Batch
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import read_weights
from cpmlive.train.distributed import optimizer_state_to_names, parameter_names, rows_of_rank
from cpmlive.train.metrics import latest_by_step, read_records
from cpmlive.train.sharded import saved_tensors
from cpmlive.train.pretrain import PretrainConfig, build_or_load_model, make_optimizer
from test_pretrain import data_dir, losses, tiny_overrides  # noqa: F401  (data_dir is a fixture)

RTOL = 1e-4
STEPS = ["max_steps=6", "save_every=3", "eval_every=3", "inspect_every=3"]


def launch(overrides: list[str], nproc: int, resume: Path | None = None) -> None:
    if nproc == 1:
        args = [sys.executable, "-m", "cpmlive", "pretrain"]
    else:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "cpmlive", "pretrain"]
    args += overrides + (["--resume", str(resume)] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(args, capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-4000:]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> float:
    """All losses within RTOL of each other; returns the largest relative difference."""
    assert sorted(got) == list(steps)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst < RTOL, f"relative loss difference {worst:.2e}: {got} vs {want}"
    return worst


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("distributed")
    launch(tiny_overrides(data_dir, root / "one") + STEPS, nproc=1)
    launch(tiny_overrides(data_dir, root / "two") + STEPS, nproc=2)
    return root


def test_rows_of_rank_and_optimizer_state_layouts(data_dir):  # noqa: F811
    rows = torch.arange(5)[:, None].expand(5, 3)
    batch = Batch(**{name: rows for name in Batch.__dataclass_fields__})
    assert rows_of_rank(batch, 1, 2).input_ids[:, 0].tolist() == [1, 3]

    config = PretrainConfig.from_file(None, tiny_overrides(data_dir, Path("unused")))
    model = build_or_load_model(config)
    optimizer = make_optimizer(model, config)
    model(torch.zeros(1, 40, dtype=torch.long), torch.zeros(1, 40, dtype=torch.int32),
          torch.ones(1, 40, dtype=torch.bool), torch.zeros(1, 40, dtype=torch.int32),
          torch.ones(1, 40, dtype=torch.bool)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    names = parameter_names(model, optimizer)
    by_name = optimizer_state_to_names(state, names)
    assert set(by_name["state"]) == set(names) and "layers.0.attn.project_q.weight" in by_name["state"]
    assert all(torch.equal(by_name["state"][names[i]]["exp_avg"], state["state"][i]["exp_avg"]) for i in state["state"])
    assert [group["params"] for group in by_name["param_groups"]] == \
        [[names[i] for i in group["params"]] for group in state["param_groups"]]


@pytest.mark.slow
def test_two_ranks_follow_the_single_process_trajectory(runs):
    one, two = losses(runs / "one"), losses(runs / "two")
    worst = assert_close(two, one, range(1, 7))
    print(f"max relative loss difference, 2 ranks vs 1 process: {worst:.2e}")
    records = {name: list(read_records(runs / name)) for name in ("one", "two")}
    evals = {name: [r["val_loss"] for r in latest_by_step(recs, "eval")] for name, recs in records.items()}
    assert evals["two"] == pytest.approx(evals["one"], rel=RTOL)
    train = {name: latest_by_step(recs, "train")[-1] for name, recs in records.items()}
    assert train["two"]["tokens"] == train["one"]["tokens"]
    assert train["two"]["grad_norm"] == pytest.approx(train["one"]["grad_norm"], rel=1e-3)
    stats = {name: latest_by_step(recs, "params")[-1]["stats"] for name, recs in records.items()}
    assert stats["two"].keys() == stats["one"].keys()
    # one process writes the model directory and trainer.pt; two ranks each write their own shards
    assert (step_dir(runs / "one", 6) / "model" / "config.json").is_file()
    sharded = step_dir(runs / "two", 6) / "sharded"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (sharded / ".metadata").is_file() and (sharded / "config.json").is_file()
    assert not (step_dir(runs / "two", 6) / "model").exists()
    saved = {name: torch.load(step_dir(runs / name, 6) / "trainer.pt", weights_only=False) for name in ("one", "two")}
    assert saved["two"]["stream"] == saved["one"]["stream"] and saved["two"]["world_size"] == 2
    assert "optimizer" not in saved["two"]  # it is in the shards


def test_sharded_checkpoint_consolidates_to_the_single_process_weights(runs, tmp_path):
    """`cpmlive convert RUN/step-N OUT` on two ranks' shards gives the weights one process saved
    at that step (the same trajectory), and the model directory every verb reads."""
    out = tmp_path / "consolidated"
    result = subprocess.run([sys.executable, "-m", "cpmlive", "convert", str(step_dir(runs / "two", 6)), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ours, one = read_weights(out), read_weights(step_dir(runs / "one", 6) / "model")
    assert ours.keys() == one.keys()
    worst = max(((ours[k] - one[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)).item() for k in one)
    assert worst < 1e-4
    assert (out / "vocab.txt").is_file()


@pytest.mark.slow
def test_checkpoints_move_between_world_sizes(runs, data_dir, tmp_path):  # noqa: F811
    one, two = losses(runs / "one"), losses(runs / "two")
    # sharded by 2 ranks, resumed by 1 process (DCP without a process group)
    launch(tiny_overrides(data_dir, tmp_path / "two-then-one") + STEPS, nproc=1, resume=step_dir(runs / "two", 3))
    worst_21 = assert_close(losses(tmp_path / "two-then-one"), two, range(4, 7))
    # written by 1 process, resumed by 2 ranks
    launch(tiny_overrides(data_dir, tmp_path / "one-then-two") + STEPS, nproc=2, resume=step_dir(runs / "one", 3))
    worst_12 = assert_close(losses(tmp_path / "one-then-two"), one, range(4, 7))
    # batch 4: 4 ranks from scratch follow one process; one process's checkpoint onto 4 ranks
    # (whose own step-6 shards are then 4 files); 4 ranks' shards onto 2
    alone, four = tmp_path / "alone-batch4", tmp_path / "four"
    launch(tiny_overrides(data_dir, alone, batch_size=4) + STEPS, nproc=1)
    launch(tiny_overrides(data_dir, four, batch_size=4) + STEPS, nproc=4)
    worst_4 = assert_close(losses(four), losses(alone), range(1, 7))
    launch(tiny_overrides(data_dir, tmp_path / "one-then-four", batch_size=4) + STEPS, nproc=4,
           resume=step_dir(alone, 3))
    worst_14 = assert_close(losses(tmp_path / "one-then-four"), losses(alone), range(4, 7))
    assert len(list((step_dir(tmp_path / "one-then-four", 6) / "sharded").glob("*.distcp"))) == 4
    launch(tiny_overrides(data_dir, tmp_path / "four-then-two", batch_size=4) + STEPS, nproc=2,
           resume=step_dir(four, 3))
    worst_42 = assert_close(losses(tmp_path / "four-then-two"), losses(alone), range(4, 7))
    print(f"max relative loss difference: 4 ranks {worst_4:.2e}; after resume: 2->1 {worst_21:.2e}, "
          f"1->2 {worst_12:.2e}, 1->4 {worst_14:.2e}, 4->2 {worst_42:.2e}")


@pytest.mark.slow
def test_cpu_offload_trains_and_resumes(runs, data_dir, tmp_path):  # noqa: F811
    run = tmp_path / "offload"
    shutil.copytree(runs / "two", run, ignore=shutil.ignore_patterns("step-0000006", "metrics.jsonl"))
    (run / "checkpoints" / "latest").write_text("step-0000003\n", encoding="utf-8")
    launch(tiny_overrides(data_dir, run, fsdp_cpu_offload=True) + STEPS, nproc=2, resume=Path("auto"))
    worst = assert_close(losses(run), losses(runs / "two"), range(4, 7))
    print(f"max relative loss difference with fsdp_cpu_offload: {worst:.2e}")


@pytest.mark.slow
def test_bf16_mixed_precision_trains_and_saves_float32(runs, data_dir, tmp_path):  # noqa: F811
    run = tmp_path / "bf16"
    launch(tiny_overrides(data_dir, run, fsdp_mixed_precision=True, max_steps=2, save_every=2), nproc=2)
    mixed, fp32 = losses(run), losses(runs / "one")
    assert sorted(mixed) == [1, 2] and all(mixed[s] == pytest.approx(fp32[s], rel=1e-2) for s in mixed)
    assert {dtype for _, dtype in saved_tensors(step_dir(run, 2)).values()} == {torch.float32}


def test_torn_shard_falls_back_and_a_changed_shape_is_refused(runs, data_dir, tmp_path):  # noqa: F811
    run = tmp_path / "torn"
    shutil.copytree(runs / "two", run)
    (step_dir(run, 6) / "sharded" / "__1_0.distcp").unlink()
    args = [sys.executable, "-m", "cpmlive", "pretrain", *tiny_overrides(data_dir, run), *STEPS, "--resume", "auto"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "__1_0.distcp is missing" in result.stderr and "resuming from step-0000003" in result.stderr
    assert_close(losses(run), losses(runs / "two"), range(1, 7))

    before = sorted(str(p.relative_to(runs)) for p in (runs / "two").rglob("*"))
    changed = tiny_overrides(data_dir, tmp_path / "wider", **{"model_overrides.dim_ff": 96}) + STEPS
    result = subprocess.run([sys.executable, "-m", "cpmlive", "pretrain", *changed,
                             "--resume", str(step_dir(runs / "two", 3))], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "step-0000003" in result.stderr
    assert sorted(str(p.relative_to(runs)) for p in (runs / "two").rglob("*")) == before


@pytest.mark.slow
def test_async_checkpoints_are_the_same_checkpoints(runs, data_dir, tmp_path):  # noqa: F811
    run = tmp_path / "async"
    launch(tiny_overrides(data_dir, run, async_checkpoint=True) + STEPS, nproc=2)
    assert_close(losses(run), losses(runs / "two"), range(1, 7))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    assert not list((run / "checkpoints").glob(".*tmp*"))
    launch(tiny_overrides(data_dir, tmp_path / "after-async") + STEPS, nproc=1, resume=step_dir(run, 3))
    assert_close(losses(tmp_path / "after-async"), losses(runs / "two"), range(4, 7))


@pytest.mark.slow
def test_cpm1_pretrains_on_two_ranks_as_one_process(data_dir, tmp_path):  # noqa: F811
    extra = {"model": "cpm1-tiny", "model_overrides.num_layers": 2, "model_overrides.max_length": 128}
    launch(tiny_overrides(data_dir, tmp_path / "one", **extra) + STEPS, nproc=1)
    launch(tiny_overrides(data_dir, tmp_path / "two", **extra) + STEPS, nproc=2)
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ant", "decoder"])
def test_tensor_x_data_parallel_follows_one_process(data_dir, tmp_path, family):  # noqa: F811
    """4 processes as 2 tensor-parallel x 2 data-parallel ranks train as one process does; their
    checkpoint (2-D DTensor shards) resumes on 2 data-parallel ranks and on one process."""
    extra = {"batch_size": 4}
    if family == "decoder":
        extra.update({"model": "decoder-tiny", "model_overrides.num_layers": 2})
    one, grid = tmp_path / "one", tmp_path / "tp2dp2"
    launch(tiny_overrides(data_dir, one, **extra) + STEPS, nproc=1)
    launch(tiny_overrides(data_dir, grid, tp_size=2, **extra) + STEPS, nproc=4)
    worst = assert_close(losses(grid), losses(one), range(1, 7))
    assert len(list((step_dir(grid, 6) / "sharded").glob("*.distcp"))) == 4
    # every weight as one process has it, the replicated ones too (the position bias, whose heads
    # the tensor-parallel ranks each see a part of)
    from cpmlive.train.sharded import consolidate

    weights = read_weights(consolidate(step_dir(grid, 6), tmp_path / "grid-model"))
    alone = read_weights(step_dir(one, 6) / "model")
    assert weights.keys() == alone.keys()
    for key in alone:  # as tensors (Adam may step a ~0 gradient either way on reduction noise)
        difference = (weights[key].double() - alone[key].double()).norm() / alone[key].double().norm()
        assert difference < 1e-3, (key, difference.item())
    launch(tiny_overrides(data_dir, tmp_path / "dp2", **extra) + STEPS, nproc=2, resume=step_dir(grid, 3))
    launch(tiny_overrides(data_dir, tmp_path / "alone", **extra) + STEPS, nproc=1, resume=step_dir(grid, 3))
    moved = max(assert_close(losses(tmp_path / name), losses(one), range(4, 7)) for name in ("dp2", "alone"))
    print(f"{family}: 2 TP x 2 DP vs 1 process, max relative loss difference {worst:.2e}; "
          f"resumed on 2 DP ranks / 1 process {moved:.2e}")


def test_tensor_parallel_refusals(data_dir, tmp_path):  # noqa: F811
    from cpmlive.model.checkpoint import model_class
    from cpmlive.model.registry import preset
    from cpmlive.train.distributed import check_tensor_parallel

    config = preset("ant-tiny")
    model = model_class(config)(config)
    check_tensor_parallel(model, 2)
    with pytest.raises(CpmliveError, match="does not divide the model's 4 heads"):
        check_tensor_parallel(model, 3)
    cpm1 = preset("cpm1-tiny")
    with pytest.raises(CpmliveError, match="bias-free q/k/v/out projections"):
        check_tensor_parallel(model_class(cpm1)(cpm1), 2)
    run = tmp_path / "tp-alone"
    result = subprocess.run([sys.executable, "-m", "cpmlive", "pretrain", *tiny_overrides(data_dir, run, tp_size=2)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a torchrun job" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not run.exists()


def test_a_cut_short_shard_is_unreadable(runs, tmp_path):
    from cpmlive.train.sharded import check_readable

    run = tmp_path / "cut"
    shutil.copytree(step_dir(runs / "two", 6), run)
    check_readable(run)
    shard = run / "sharded" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CpmliveError, match="cut short"):
        check_readable(run)
