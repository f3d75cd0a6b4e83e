"""Training runs refuse bad input in one line, resume past a corrupt checkpoint, save on Ctrl-C
and never write into another run's directory (pretrain and finetune alike)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cpmlive import cli
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import read_weights
from cpmlive.recipe import Recipe
from cpmlive.train.launch import pretrain
from cpmlive.train.pretrain import PretrainConfig, Trainer
from cpmlive.tune.finetune import FinetuneConfig, Finetuner
from test_finetune import base_dir, generation_data, train_losses, tune_config  # noqa: F401  (fixtures)
from test_pretrain import data_dir, losses, run_cli, tiny_overrides  # noqa: F401  (data_dir is a fixture)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def pretrain_config(data_dir: Path, out: Path, **extra) -> PretrainConfig:  # noqa: F811
    return PretrainConfig.from_file(None, tiny_overrides(data_dir, out, **extra))


# ---- typed, validated recipe configs ------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("max_steps=abc", "config: max_steps must be an integer, got 'abc'"),
    ("max_steps=1.5", "config: max_steps must be an integer, got 1.5"),
    ("max_steps=true", "config: max_steps must be an integer, got True"),
    ("lr=abc", "config: lr must be a number, got 'abc'"),
    ("lr=-1", "config: lr must be > 0, got -1"),
    ("lr=.nan", "config: lr must be a finite number"),
    ("min_lr=-0.1", "config: min_lr must be >= 0"),
    ("warmup_steps=-1", "config: warmup_steps must be >= 0"),
    ("beta1=1", "config: beta1 must be in [0, 1)"),
    ("beta2=-0.5", "config: beta2 must be in [0, 1)"),
    ("weight_decay=-1", "config: weight_decay must be >= 0"),
    ("grad_clip=0", "config: grad_clip must be > 0"),
    ("eval_every=0", "config: eval_every must be >= 1"),
    ("eval_batches=0", "config: eval_batches must be >= 1"),
    ("save_every=0", "config: save_every must be >= 1"),
    ("keep_checkpoints=0", "config: keep_checkpoints must be >= 1"),
    ("progress=maybe", "config: progress must be true or false, got 'maybe'"),
    ("model_overrides=3", "config: model_overrides must be a mapping, got 3"),
    ("device_watts=-5", "config: device_watts must be >= 0"),
])
def test_pretrain_config_values_are_checked_where_they_enter(override, message):
    with pytest.raises(CpmliveError, match=re.escape(message)):
        PretrainConfig.from_file(None, ["data=/x", override])


@pytest.mark.parametrize("override,message", [
    ("max_steps=abc", "config: max_steps must be an integer, got 'abc'"),
    ("epochs=abc", "config: epochs must be a number, got 'abc'"),
    ("lr=-1", "config: lr must be > 0, got -1"),
    ("beta1=1.5", "config: beta1 must be in [0, 1)"),
    ("max_input_tokens=0", "config: max_input_tokens must be >= 1"),
    ("keep_checkpoints=0", "config: keep_checkpoints must be >= 1"),
    ("delta.dropout=1.5", "dropout must be in [0, 1)"),
])
def test_finetune_config_values_are_checked_where_they_enter(override, message):
    with pytest.raises(CpmliveError, match=re.escape(message)):
        FinetuneConfig.from_file(None, ["data=/x", override])


def test_numbers_and_text_keep_their_field_types():
    config = PretrainConfig.from_file(None, ["data=/x", "lr=1", "out=2024"])
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.out == "2024"
    assert FinetuneConfig.from_file(None, ["data=/x", "template={input}"]).template == "{input}"
    with pytest.raises(CpmliveError, match="max_steps must be an integer"):
        PretrainConfig(data="x", max_steps="5")  # a plain constructor call is checked too


def test_a_new_recipe_gets_the_checks_by_inheriting():
    from cpmlive.recipe import POSITIVE, Bound

    @dataclass
    class DistillConfig(Recipe):
        temperature: float = 2.0
        steps: int = 10
        RANGES = {"temperature": POSITIVE, "steps": Bound(1)}

    with pytest.raises(CpmliveError, match=re.escape("config: steps must be an integer, got 'abc'")):
        DistillConfig.from_file(None, ["steps=abc"])
    with pytest.raises(CpmliveError, match=re.escape("config: temperature must be > 0, got 0")):
        DistillConfig.from_file(None, ["temperature=0"])
    with pytest.raises(TypeError, match="check()"):
        @dataclass
        class Unchecked(Recipe):
            steps: int = 1

            def __post_init__(self) -> None:
                pass


def test_cli_config_errors_are_one_line(capsys):
    assert cli.main(["pretrain", "data=/x", "max_steps=abc"]) == 2
    assert capsys.readouterr().err == "cpmlive: error: config: max_steps must be an integer, got 'abc'\n"
    assert cli.main(["finetune", "--data", "/x", "lr=-1"]) == 2
    assert capsys.readouterr().err == "cpmlive: error: config: lr must be > 0, got -1.0\n"


def test_lengths_beyond_the_model_are_refused_at_startup(data_dir, base_dir, generation_data, tmp_path):  # noqa: F811
    with pytest.raises(CpmliveError, match="seq_length 5000 is beyond the model's 1024 positions"):
        Trainer(pretrain_config(data_dir, tmp_path / "a", seq_length=5000))
    with pytest.raises(CpmliveError, match="seq_length 300 is beyond the model's 256 positions"):
        Trainer(pretrain_config(data_dir, tmp_path / "b", seq_length=300, **{"model_overrides.max_length": 256}))
    with pytest.raises(CpmliveError, match=r"max_input_tokens \+ max_output_tokens is 200 \+ 48; .* at most 223"):
        Finetuner(tune_config(base_dir, generation_data, tmp_path / "c", max_input_tokens=200, max_output_tokens=48))
    assert not any((tmp_path / name).exists() for name in "abc")


# ---- resume: a corrupt newest checkpoint falls back ---------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A finished 4-step pretraining run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("four-steps") / "run"
    pretrain(pretrain_config(data_dir, run, max_steps=4, save_every=2))
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-0000002", "step-0000004"]
    return run


def truncate(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * fraction)])


CORRUPTIONS = {
    "truncated trainer.pt": lambda step: truncate(step / "trainer.pt"),
    "garbage weights": lambda step: (step / "model" / "model.safetensors").write_bytes(b"\x00garbage" * 64),
    "truncated weights": lambda step: truncate(step / "model" / "model.safetensors", 0.6),
    "missing model": lambda step: shutil.rmtree(step / "model"),
    "latest names a missing dir": lambda step: shutil.rmtree(step),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(four_steps, data_dir, tmp_path, capsys,  # noqa: F811
                                                              corruption):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    CORRUPTIONS[corruption](step_dir(run, 4))
    trainer = Trainer(pretrain_config(data_dir, run, max_steps=4, save_every=2), resume="auto")
    trainer.log.close()
    assert trainer.state.step == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"cpmlive: warning: {step_dir(run, 4)} is unreadable (")
    assert err[0].endswith("; resuming from step-0000002")
    saved = read_weights(step_dir(run, 2) / "model")
    assert all(trainer.model.state_dict()[name].equal(tensor) for name, tensor in saved.items())


def test_no_readable_checkpoint_is_an_error_and_so_is_a_corrupt_named_one(four_steps, data_dir, tmp_path,  # noqa: F811
                                                                         capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    truncate(step_dir(run, 4) / "trainer.pt")
    overrides = tiny_overrides(data_dir, run, max_steps=4, save_every=2)
    assert cli.main(["pretrain", *overrides, "--resume", str(step_dir(run, 4))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cpmlive: error: {step_dir(run, 4)}/trainer.pt: unreadable (") and err.count("\n") == 1
    truncate(step_dir(run, 2) / "model" / "model.safetensors")
    assert cli.main(["pretrain", *overrides, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpmlive: error: no readable checkpoint to resume from: ") and err.count("\n") == 1
    assert "step-0000004 is unreadable" in err and "step-0000002 is unreadable" in err


def test_finetune_resume_falls_back_too(base_dir, generation_data, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    Finetuner(tune_config(base_dir, generation_data, run, max_steps=4, save_every=2, eval_every=4)).run()
    truncate(step_dir(run, 4) / "trainer.pt")
    resumed = Finetuner(tune_config(base_dir, generation_data, run, max_steps=4, save_every=2, eval_every=4),
                        resume="auto")
    resumed.log.close()
    assert resumed.position.step == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith("; resuming from step-0000002") and "is unreadable" in err[0]


# ---- Ctrl-C and SIGTERM save the current step ---------------------------------------------------------


def signalling_after(cls, step: int, signum: int, monkeypatch) -> None:
    """Make ``cls.train_step`` send this process ``signum`` once it has finished ``step``."""
    original = cls.train_step

    def train_step(self):
        record = original(self)
        if record["step"] == step:
            os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(cls, "train_step", train_step)


@pytest.fixture
def sigterm_guard():
    """SIGTERM raises (instead of killing pytest) where training does not handle it."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM was not handled by the training loop")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_pretraining_saves_its_step_and_resumes_exactly(data_dir, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                                    sigterm_guard, signum):
    steps = {"max_steps": 6, "save_every": 100, "eval_every": 100}
    pretrain(pretrain_config(data_dir, tmp_path / "straight", **steps))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        signalling_after(Trainer, 3, signum, patch)
        with pytest.raises(KeyboardInterrupt):
            pretrain(pretrain_config(data_dir, run, **steps))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert (step_dir(run, 3) / "trainer.pt").is_file()
    assert "stopped at step 3" in capsys.readouterr().err
    pretrain(pretrain_config(data_dir, run, **steps), resume="auto")
    assert losses(run) == losses(tmp_path / "straight")
    final, straight = (read_weights(step_dir(run, 6) / "model"),
                       read_weights(step_dir(tmp_path / "straight", 6) / "model"))
    assert all(final[name].equal(tensor) for name, tensor in straight.items())


def test_interrupted_finetuning_saves_its_step_and_resumes_exactly(base_dir, generation_data, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    def config(out: Path) -> FinetuneConfig:
        return tune_config(base_dir, generation_data, out, max_steps=4, save_every=2, eval_every=2)

    Finetuner(config(tmp_path / "straight")).run()
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        signalling_after(Finetuner, 3, signal.SIGINT, patch)
        with pytest.raises(KeyboardInterrupt):
            Finetuner(config(run)).run()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    Finetuner(config(run), resume="auto").run()
    assert train_losses(run) == train_losses(tmp_path / "straight")


@pytest.mark.slow
def test_ctrl_c_on_the_cli_saves_and_resume_auto_finishes_the_same_run(data_dir, tmp_path):  # noqa: F811
    steps = ["max_steps=40", "save_every=1000", "eval_every=1000", "inspect_every=1000"]
    straight = run_cli(tiny_overrides(data_dir, tmp_path / "straight") + steps)
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()
    run = tmp_path / "run"
    proc = run_cli(tiny_overrides(data_dir, run) + steps)
    deadline = time.time() + 300
    while time.time() < deadline and max(losses(run), default=0) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    err = proc.stderr.read().decode()
    assert err.endswith("cpmlive: interrupted\n") and "Traceback" not in err
    stopped = max(losses(run))
    assert stopped < 40, "the run finished before it could be interrupted"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"
    resumed = run_cli(tiny_overrides(data_dir, run) + steps, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert losses(run) == losses(tmp_path / "straight")
    final, want = read_weights(step_dir(run, 40) / "model"), read_weights(step_dir(tmp_path / "straight", 40) / "model")
    assert all(final[name].equal(tensor) for name, tensor in want.items())


# ---- a fresh run never writes into another run -------------------------------------------------------


def test_fresh_pretraining_refuses_a_directory_that_holds_a_run(four_steps, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    overrides = tiny_overrides(data_dir, run, max_steps=4, save_every=2)
    assert cli.main(["pretrain", *overrides]) == 2
    assert capsys.readouterr().err == (f"cpmlive: error: {run} already holds a run (checkpoints up to step 4); "
                                       "resume it with --resume auto or choose another out\n")
    assert cli.main(["pretrain", *overrides, "--resume", str(step_dir(four_steps, 2))]) == 2  # another run's
    assert "already holds a run" in capsys.readouterr().err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    Trainer(pretrain_config(data_dir, run, max_steps=4), resume="auto").log.close()  # continuing it is fine
    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"type": "start", "step": 0}\n', encoding="utf-8")
    with pytest.raises(CpmliveError, match=re.escape("already holds a run (metrics.jsonl, no checkpoint yet)")):
        Trainer(pretrain_config(data_dir, started))


def test_fresh_finetuning_refuses_a_directory_that_holds_a_run(base_dir, generation_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    Finetuner(tune_config(base_dir, generation_data, run, max_steps=2, save_every=2, eval_every=2)).run()
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CpmliveError, match=re.escape(f"{run} already holds a run (checkpoints up to step 2)")):
        Finetuner(tune_config(base_dir, generation_data, run, max_steps=2))
    assert (run / "metrics.jsonl").read_bytes() == metrics and (step_dir(run, 2) / "trainer.pt").is_file()
