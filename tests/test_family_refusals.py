"""What a family cannot do is refused in one line before any work, by asking the registry
(compress steps, alignment, soft prompts, calibration), and the shared verbs, recipes and
descriptions take their family-specific parts from the registry (issue 29 review)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cpmlive.cli import build_parser, main
from cpmlive.errors import CpmliveError
from cpmlive.model import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cpmlive"
FAMILY_NAMES = [kind.name for kind in registry.families().values()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- compress ------------------------------------------------------------------------------------

MOEFY = [{"moefy": {"experts": 4, "top_k": 2}}]
PRUNE = [{"prune": {"target": 0.5, "steps": 2}}]
DISTILL = [{"distill": {"steps": 2}}]
SPARSE24 = [{"sparse24": {"steps": 0}}]
QAT = [{"qat": {"steps": 2}}, {"quantize": {"bits": 8}}]
GPTQ = [{"quantize": {"bits": 4, "group_size": 64, "method": "gptq"}}]


@pytest.mark.parametrize("model, steps, refusal", [
    ("cpm1-demo", MOEFY, "CPM-1 cannot be MoEfied (compress: moefy): that needs a CPM-Ant checkpoint"),
    ("bee-demo", MOEFY, "CPM-Bee cannot be MoEfied"),
    ("cpm1-demo", PRUNE, "CPM-1 cannot be pruned (compress: prune): that needs a CPM-Ant or Llama-family checkpoint"),
    ("bee-demo", PRUNE, "CPM-Bee cannot be pruned"),
    ("bee-demo", DISTILL, "CPM-Bee cannot be trained on a token store (compress: distill, sparse24, qat): "
                          "that needs a CPM-Ant, CPM-1 or Llama-family checkpoint"),
    ("bee-demo", SPARSE24, "CPM-Bee cannot be trained on a token store"),
    ("bee-demo", QAT, "CPM-Bee cannot be trained on a token store"),
    ("cpm1-demo", GPTQ, "CPM-1 cannot be quantized with calibration"),
    ("bee-demo", GPTQ, "CPM-Bee cannot be trained on a token store"),  # (quantize --calibration FILE does it)
])
def test_a_compress_step_the_family_cannot_do_is_one_line_exit_2(model, steps, refusal, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": str(tmp_path / "store"), "steps": steps, "progress": False}))
    out = tmp_path / "out"
    assert main(["compress", model, str(out), "--recipe", str(recipe)]) == 2
    assert error_line(capsys).startswith(f"cpmlive: error: {refusal}")
    assert not out.exists() and not (tmp_path / "out.run").exists()


def test_compress_trains_a_cpm1_model_with_its_own_objective(tmp_path, monkeypatch):
    """CPM-1 is trained left to right (its pretraining objective), not on CPM-Ant's infilling."""
    from cpmlive.compress import pipeline
    from tiny_store import make_model_and_store, recipe

    objectives = []

    class Recorded(pipeline.PretrainStream):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            objectives.append(self.objective)

    monkeypatch.setattr(pipeline, "PretrainStream", Recorded)
    _, data = make_model_and_store(tmp_path)
    pipeline.compress("cpm1-demo", tmp_path / "out", recipe(data, steps=[{"distill": {"steps": 1}}]))
    assert objectives == ["causal"]


def test_every_family_that_retrains_has_a_pretraining_objective():
    for kind in registry.families().values():
        assert not kind.can("retrain") or kind.pretrain_objective is not None, kind.name


# ---- align, finetune, quantize -------------------------------------------------------------------


def test_align_refuses_a_family_that_cannot_be_aligned_before_making_its_run(tmp_path):
    from cpmlive.align.recipes import TRAINERS, AlignConfig

    config = AlignConfig(method="sft", model="cpm1-demo", data=str(tmp_path / "sft.jsonl"), out=str(tmp_path / "run"),
                         progress=False)
    with pytest.raises(CpmliveError, match=r"^CPM-1 cannot be aligned \(align sft/rm/dpo/ppo/grpo\): that needs a "
                                           r"CPM-Ant, CPM-Bee or Llama-family checkpoint"):
        TRAINERS["sft"](config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, name", [("cpm1-demo", "CPM-1"), ("bee-demo", "CPM-Bee")])
def test_a_soft_prompt_is_refused_for_a_family_without_a_prompt_table(model, name, tmp_path):
    from cpmlive.tune.finetune import FinetuneConfig, finetune

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"input": "今天", "output": "好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    config = FinetuneConfig.from_dict({"model": model, "data": str(data), "out": str(tmp_path / "run"),
                                       "progress": False, "max_input_tokens": 16, "max_output_tokens": 4,
                                       "delta": {"method": "prompt"}})
    with pytest.raises(CpmliveError, match=rf"^{name} cannot take a soft prompt .*: that needs a CPM-Ant checkpoint"):
        finetune(config)
    assert not (tmp_path / "run").exists()


def test_the_calibration_refusal_names_every_family_that_calibrates(tmp_path, monkeypatch):
    from cpmlive.compress.quantize import quantize_checkpoint
    from cpmlive.config import QuantConfig

    changed = {"CPM-1": lambda abilities: abilities | {"calibrate"},
               "CPM-Bee": lambda abilities: abilities - {"calibrate"}}
    entries = {model_type: dataclasses.replace(kind, abilities=changed[kind.name](kind.abilities))
               if kind.name in changed else kind for model_type, kind in registry.families().items()}
    monkeypatch.setattr(registry, "families", lambda: entries)
    config = QuantConfig(bits=4, group_size=64, method="gptq")
    refusal = r"GPTQ/AWQ calibration is CPM-Ant, CPM-1 or Llama-family's \(CPM-Bee: use --method rtn\)"
    with pytest.raises(CpmliveError, match=refusal):
        quantize_checkpoint("bee-demo", tmp_path / "q", config, calibration=tmp_path / "text.txt")


# ---- the CLI -------------------------------------------------------------------------------------


def convert_target(argv: list[str]) -> str:
    return build_parser().parse_args(["convert", "src", "dst", *argv]).to


def test_convert_targets_are_the_registered_families_formats(monkeypatch, capsys):
    import importlib

    formats = [name for package in registry.FAMILY_PACKAGES
               for name in importlib.import_module(f"cpmlive.model.{package}").FORMATS]
    assert list(dict.fromkeys(formats)) == ["ours", "hf", "openbmb", "gguf", "modelcenter"]
    assert convert_target([]) == "ours" and [convert_target(["--to", name]) for name in formats] == formats
    with pytest.raises(SystemExit):
        convert_target(["--to", "megatron"])
    assert "invalid choice: 'megatron' (choose from 'ours', 'hf', 'openbmb', 'gguf', 'modelcenter')" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    assert "[--to {ours,hf,openbmb,gguf,modelcenter}]" in capsys.readouterr().out
    cpm1 = importlib.import_module("cpmlive.model.cpm1")
    monkeypatch.setattr(cpm1, "FORMATS", (*cpm1.FORMATS, "megatron"))
    assert convert_target(["--to", "megatron"]) == "megatron"  # a family's new format needs no CLI edit


def test_building_the_parser_imports_no_model_code():
    code = "import sys; from cpmlive.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_tokenize_hf_asks_the_familys_tokenizer(monkeypatch, capsys):
    """A family whose tokenizer has an HF mode takes --hf without a CLI edit."""
    from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

    monkeypatch.setattr(Cpm1Tokenizer, "for_model", classmethod(lambda cls, vocab, size, hf_compat=False: cls(vocab)))
    assert main(["tokenize", "cpm1-demo", "今天", "--hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"]


def descriptions() -> dict[str, str]:
    import cpmlive

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    verbs = build_parser()._subparsers._group_actions[0]
    pretrain = next(action.help for action in verbs._choices_actions if action.dest == "pretrain")
    return {"cpmlive --help": build_parser().description, "pyproject.toml": pyproject["project"]["description"],
            "cpmlive.__doc__": cpmlive.__doc__, "pretrain --help": pretrain}


@pytest.mark.parametrize("where", ["cpmlive --help", "pyproject.toml", "cpmlive.__doc__", "pretrain --help"])
def test_descriptions_of_the_whole_package_name_no_single_family(where):
    text = descriptions()[where]
    assert "CPM" in text or where == "pretrain --help"
    assert not [name for name in FAMILY_NAMES if name in text], text


# ---- the shared modules --------------------------------------------------------------------------

SHARED = ["infer/generate.py", "infer/score.py", "infer/engine.py", "align/evaluate.py", "align/onpolicy.py",
          "align/policy.py", "align/recipes.py", "tune/task.py", "tune/finetune.py", "compress/distill.py",
          "compress/qat.py", "compress/quantize.py", "compress/sparsity.py", "compress/pipeline.py",
          "train/pretrain.py", "demo.py"]
FAMILY_FOLDERS = tuple(f"cpmlive.{layer}.{package}" for layer in ("model", "tokenizer")
                       for package in registry.FAMILY_PACKAGES)


@pytest.mark.parametrize("module", SHARED)
def test_a_shared_module_imports_no_familys_own_code(module):
    """Models, configs and tokenizers of any family are typed as the shared stack's
    (``model.stack.Transformer``, ``config.StackConfig``, a tokenizer protocol)."""
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    named = [f"{node.module}: {', '.join(alias.name for alias in node.names)}" for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(FAMILY_FOLDERS)]
    # a model's vocabulary is read by its family's tokenizer (text_tokenizer guesses one from a data store's file)
    forbidden = {"AntTokenizer", "Cpm1Tokenizer"}
    if module.startswith(("tune", "compress")):
        forbidden.add("text_tokenizer")
    named += [f"cpmlive.tokenizer: {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "cpmlive.tokenizer" for alias in node.names if alias.name in forbidden]
    assert not named, named
