"""The pretraining recipe: configs, exact resume after kill -9, metrics, checkpoint failures."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpmlive.data.store import prepare
from cpmlive.errors import CpmliveError
from cpmlive.tokenizer.vocab import build_vocab, save_vocab
from cpmlive.train import pretrain as recipe
from cpmlive.train.checkpoints import latest_checkpoint
from cpmlive.train.core import Schedule, learning_rate
from cpmlive.train.launch import pretrain
from cpmlive.train.metrics import MetricsLog, latest_by_step, read_records
from cpmlive.train.pretrain import PretrainConfig, Trainer

SENTENCES = [
    "今天天气很好，我们一起去公园散步，看见很多人在湖边钓鱼。",
    "北京是中国的首都，也是全国的政治和文化中心。",
    "春天来了，小草从地下探出头来，柳树抽出了嫩绿的枝条。",
    "人工智能是研究和开发用于模拟人的智能的理论和方法的一门科学。",
    "新华社记者报道，国务院总理今天会见了来访的外国客人。",
    "宝玉和黛玉在园子里读书，说起了许多有趣的故事。",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    lines = [f"{SENTENCES[i % 6]}{SENTENCES[(i * 5 + 1) % 6]}第{i}段。" for i in range(240)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = root / "vocab.txt"
    save_vocab(build_vocab(lines, 300), vocab)
    out = root / "data"
    prepare([str(corpus)], vocab, out, val_fraction=0.05, progress=False, workers=1)
    (out / "vocab.txt").write_bytes(vocab.read_bytes())
    return out


def tiny_overrides(data_dir: Path, out: Path, **extra) -> list[str]:
    vocab_size = len((data_dir / "vocab.txt").read_text("utf-8").splitlines())
    values = {"data": data_dir, "out": out, "model": "tiny", "model_overrides.vocab_size": vocab_size,
              "model_overrides.num_layers": 2, "seq_length": 128, "batch_size": 2, "max_steps": 8,
              "warmup_steps": 2, "eval_every": 4, "eval_batches": 2, "save_every": 2, "inspect_every": 4,
              "progress": False, "precision": "fp32", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in latest_by_step(list(read_records(run_dir)), "train")}


def test_config_yaml_round_trip_and_overrides(tmp_path):
    config = PretrainConfig.from_file(None, ["data=/x", "lr=0.01", "model_overrides.dim_model=96"])
    path = tmp_path / "recipe.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    again = PretrainConfig.from_file(path)
    assert again == config and again.lr == 0.01 and again.model_overrides == {"dim_model": 96}


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: /x\nlearning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match="unknown key 'learning_rate'"):
        PretrainConfig.from_file(path)
    with pytest.raises(CpmliveError, match="schedule"):
        PretrainConfig.from_file(None, ["data=/x", "schedule=linear"])


def test_schedules():
    cosine = Schedule.of(PretrainConfig(data="x", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert learning_rate(cosine, 5) == pytest.approx(0.5)
    assert learning_rate(cosine, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 60) == pytest.approx(0.55)
    assert learning_rate(cosine, 110) == pytest.approx(0.1)
    noam = Schedule("noam", lr=1.0, warmup_steps=4)
    assert learning_rate(noam, 2) == pytest.approx(2 / 8)
    assert learning_rate(noam, 16) == pytest.approx(0.25)


def test_training_reduces_loss_and_logs_every_figure(data_dir, tmp_path):
    config = PretrainConfig.from_file(None, tiny_overrides(data_dir, tmp_path / "run", max_steps=12, lr=0.01))
    pretrain(config)
    records = list(read_records(tmp_path / "run"))
    train = latest_by_step(records, "train")
    assert len(train) == 12 and train[-1]["loss"] < train[0]["loss"]
    for key in ("loss", "loss_infill", "loss_generate", "lr", "tokens", "tokens_per_s", "grad_norm",
                "memory_mb", "elapsed_s", "cost", "co2_kg"):
        assert key in train[-1]
    assert latest_by_step(records, "eval") and latest_by_step(records, "params")
    assert "layers.0.attn.project_q.weight" in latest_by_step(records, "params")[0]["stats"]


def run_cli(overrides: list[str], resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "cpmlive", "pretrain", *overrides] + (["--resume", "auto"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_trajectory(data_dir, tmp_path):
    steps = ["max_steps=10", "save_every=3"]
    uninterrupted = run_cli(tiny_overrides(data_dir, tmp_path / "straight") + steps)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()

    crashed = tmp_path / "crashed"
    proc = run_cli(tiny_overrides(data_dir, crashed) + steps)
    deadline = time.time() + 300
    while time.time() < deadline and max(losses(crashed), default=0) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(crashed)) < 10, "the run finished before it could be killed"
    resumed = run_cli(tiny_overrides(data_dir, crashed) + steps, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert losses(crashed) == losses(tmp_path / "straight")


def test_torn_metrics_line_is_skipped_and_repaired(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"type": "train", "step": 1, "loss": 3.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"type": "train", "step": 2, "lo')
    assert [r["step"] for r in read_records(tmp_path)] == [1]
    log = MetricsLog(tmp_path)
    log.write({"type": "train", "step": 2, "loss": 2.0})
    log.close()
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    config = PretrainConfig.from_file(None, tiny_overrides(data_dir, tmp_path / "run", max_steps=4))
    trainer = Trainer(config)
    for _ in range(2):
        trainer.train_step()
    first = recipe.save_training_checkpoint(trainer.run_dir, trainer.model, trainer.optimizer, trainer.stream,
                                            trainer.state, config, trainer.vocab_path)
    trainer.train_step()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recipe.torch, "save", disk_full)
    with pytest.raises(CpmliveError, match="previous checkpoint is intact"):
        recipe.save_training_checkpoint(trainer.run_dir, trainer.model, trainer.optimizer, trainer.stream,
                                        trainer.state, config, trainer.vocab_path)
    assert latest_checkpoint(trainer.run_dir) == first
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == sorted([first.name, "latest"])
    trainer.log.close()


def test_vocab_mismatch_is_a_clear_error(data_dir, tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    for name in ("meta.json", "train.bin", "train.idx.npy", "train.source.npy", "val.bin", "val.idx.npy",
                 "val.source.npy"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    vocab = (data_dir / "vocab.txt").read_text("utf-8").splitlines()
    (other / "vocab.txt").write_text("\n".join(vocab[:-1] + ["新词"]) + "\n", encoding="utf-8")
    with pytest.raises(CpmliveError, match="vocab/model mismatch"):
        Trainer(PretrainConfig.from_file(None, tiny_overrides(other, tmp_path / "run")))


def test_cli_pretrain_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cpmlive", "pretrain", "data=/nonexistent", "bogus=1"],
                            capture_output=True)
    assert result.returncode == 2 and "unknown key 'bogus'" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_tensorboard_option_writes_events_or_says_what_is_missing(data_dir, tmp_path):
    config = PretrainConfig.from_file(None, tiny_overrides(data_dir, tmp_path / "run", max_steps=2,
                                                          tensorboard=True))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(CpmliveError, match="tensorboard package"):
            pretrain(config)
        return
    pretrain(config)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_bf16():
    import torch

    from cpmlive.train.core import autocast, native_bf16

    with autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") == native_bf16("cpu")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert PretrainConfig(data="x").precision == "auto"
