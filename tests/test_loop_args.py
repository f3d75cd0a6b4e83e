"""The training recipes share one set of loop keys (``cpmlive.recipe.LoopArgs``), still flat in
their YAML; the verbs and recipes ask a model's family instead of naming it."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import yaml

from cpmlive.align.recipes import AlignConfig
from cpmlive.cli import build_parser, main
from cpmlive.cli import evaluate as evaluate_verb
from cpmlive.errors import CpmliveError
from cpmlive.recipe import LoopArgs
from cpmlive.resources import demo_dir
from cpmlive.train.pretrain import PretrainConfig, Trainer
from cpmlive.tune.finetune import FinetuneConfig

RECIPES = (PretrainConfig, FinetuneConfig, AlignConfig)
LOOP_KEYS = [f.name for f in dataclasses.fields(LoopArgs)]

# config.yaml as runs wrote it before the loop keys were shared: flat, in the old order
OLD_FINETUNE_YAML = """\
model: demo
task: classify
data: train.jsonl
eval: ''
out: runs/old
delta:
  method: lora
  r: 8
template: '{input}'
max_input_tokens: 128
max_output_tokens: 8
batch_size: 4
grad_accum: 2
epochs: 2.0
max_steps: 0
lr: 0.0005
min_lr: 0.0001
warmup_steps: 5
schedule: constant
weight_decay: 0.0
beta1: 0.9
beta2: 0.999
grad_clip: 1.0
precision: fp32
seed: 3
eval_every: 10
save_every: 10
keep_checkpoints: 1
best_metric: accuracy
classify_loss: labels
progress: false
"""


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.__name__)
def test_every_training_recipe_has_the_loop_keys_once(recipe):
    assert issubclass(recipe, LoopArgs)
    config = recipe(data="x")
    assert list(config.to_dict())[-len(LOOP_KEYS):] == LOOP_KEYS  # the recipe's own keys first
    with pytest.raises(CpmliveError, match="config: grad_accum must be >= 1, got 0"):
        recipe(data="x", grad_accum=0)
    with pytest.raises(CpmliveError, match="config: schedule must be one of cosine, noam, constant"):
        recipe(data="x", schedule="linear")


def test_each_recipe_keeps_its_own_loop_defaults():
    assert (PretrainConfig.max_steps, PretrainConfig.warmup_steps, PretrainConfig.beta2) == (1000, 100, 0.95)
    assert (FinetuneConfig.max_steps, FinetuneConfig.warmup_steps, FinetuneConfig.epochs) == (0, 20, 3.0)
    assert (AlignConfig.warmup_steps, AlignConfig.epochs, AlignConfig.max_input_tokens) == (10, 1.0, 160)
    with pytest.raises(CpmliveError, match="config: max_steps must be >= 1"):
        PretrainConfig(data="x", max_steps=0)  # pretraining runs for steps, not epochs
    with pytest.raises(CpmliveError, match=r"see `cpmlive align --help`"):
        AlignConfig()


def test_an_old_flat_config_yaml_still_loads_and_takes_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OLD_FINETUNE_YAML, encoding="utf-8")
    config = FinetuneConfig.from_file(path, ["lr=1e-4", "delta.r=16"])
    assert (config.lr, config.grad_accum, config.schedule, config.delta["r"]) == (1e-4, 2, "constant", 16)
    assert config.to_dict() == {**yaml.safe_load(OLD_FINETUNE_YAML), "lr": 1e-4, "delta": {"method": "lora", "r": 16},
                                "device": "auto"}  # a key added since: its default
    path.write_text(config.to_yaml(), encoding="utf-8")
    assert FinetuneConfig.from_file(path) == config


def test_a_number_in_exponent_form_is_a_number(tmp_path):
    """``lr=5e-4`` (the example of ``cpmlive finetune --help``) and ``lr: 5e-4`` in a recipe are
    numbers; PyYAML's YAML 1.1 read them as strings, and the recipe refused them."""
    path = tmp_path / "recipe.yaml"
    path.write_text("data: train.jsonl\nlr: 5e-4\nmin_lr: 1E-5\nout: 1e3\n", encoding="utf-8")
    config = FinetuneConfig.from_file(path, ["warmup_steps=2", "beta2=9.99e-1"])
    assert (config.lr, config.min_lr, config.beta2, config.out) == (5e-4, 1e-5, 0.999, "1e3")
    assert FinetuneConfig.from_file(None, ["data=x", "lr=5e-4"]).lr == 5e-4


def test_pretraining_a_family_without_an_objective_is_refused(tmp_path):
    """CPM-Bee has no pretraining objective in the stream: refused in one line before any data is
    read (the recipe used to fall back to CPM-Ant's objective and fail on the model)."""
    config = PretrainConfig(model="bee-tiny", data=str(tmp_path), out=str(tmp_path / "run"), progress=False)
    with pytest.raises(CpmliveError, match="CPM-Bee models are not pretrained by this recipe"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def evaluate_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["evaluate", *argv])


def test_evaluate_picks_one_evaluation_by_its_flags(tmp_path):
    bee = tmp_path / "bee"
    bee.mkdir()
    (bee / "config.json").write_text(json.dumps({"model_type": "cpm-bee"}), encoding="utf-8")
    chosen = {
        ("demo", "--pairs", "p.jsonl"): evaluate_verb.evaluate_pairs,
        ("demo", "--data", "d.jsonl"): evaluate_verb.evaluate_task,
        ("demo", "--data", "d.jsonl", "--text", "t.txt"): evaluate_verb.evaluate_task,
        ("demo", "--text", "t.txt"): evaluate_verb.evaluate_text,
        (str(bee), "--text", "t.txt"): evaluate_verb.evaluate_json_tasks,
        (str(bee), "--data", "d.jsonl"): evaluate_verb.evaluate_json_tasks,
    }
    for argv, evaluation in chosen.items():
        assert evaluate_verb.evaluation(evaluate_args(*argv)) is evaluation, argv
    with pytest.raises(CpmliveError, match="--pairs is evaluated on its own"):
        evaluate_verb.evaluation(evaluate_args("demo", "--pairs", "p.jsonl", "--text", "t.txt"))
    with pytest.raises(CpmliveError, match="give --text FILE"):
        evaluate_verb.evaluation(evaluate_args("demo"))


@pytest.mark.parametrize("name", ["bee-demo", "cpm1-demo"])
def test_tokenize_hf_mode_is_refused_for_a_family_without_one(name, capsys):
    assert main(["tokenize", name, "今天", "--hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpmlive: error: --hf is CPM-Ant's") and err.count("\n") == 1


def test_tokenize_reads_a_bare_sentencepiece_model_as_its_family_does(capsys):
    assert main(["tokenize", "cpm1-demo", "今天 天气", "--json"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert main(["tokenize", str(demo_dir("cpm1-demo") / "spiece.model"), "今天 天气", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_checkpoint


def test_device_is_resolved_and_a_missing_gpu_refused():
    from cpmlive.train.core import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CpmliveError, match="config: device 'cuda:1', but this machine has 0 CUDA devices"):
            resolve_device("cuda:1")
    with pytest.raises(CpmliveError, match="training runs on cpu or cuda"):
        resolve_device("meta")
    with pytest.raises(CpmliveError, match="is not a device"):
        resolve_device("gpu0")
