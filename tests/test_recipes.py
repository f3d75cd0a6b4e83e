"""The recipes shipped in recipes/: each parses into its config, and each describes what we ship."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cpmlive.align.recipes import AlignConfig
from cpmlive.compress.pipeline import CompressRecipe
from cpmlive.tune.delta import DeltaConfig
from cpmlive.tune.finetune import FinetuneConfig
from cpmlive.train.pretrain import PretrainConfig, new_model_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ASSETS = ROOT / "src" / "cpmlive" / "assets"


def test_there_are_recipes_for_every_shipped_artefact() -> None:
    names = {path.stem for path in RECIPES}
    assert {"demo", "demo-continue", "demo-continue2", "headline", "sentiment"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_into_its_config(path: Path) -> None:
    data = yaml.safe_load(path.read_text("utf-8"))
    if "steps" in data:
        config = CompressRecipe.from_file(path)
    elif "method" in data:
        config = AlignConfig.from_file(path)
    elif "task" in data:
        config = FinetuneConfig.from_file(path)
        DeltaConfig.from_dict(config.delta)
    else:
        config = PretrainConfig.from_file(path)
    assert config.to_dict().items() >= {k: v for k, v in data.items() if k != "delta"}.items()


def test_demo_recipe_builds_the_shipped_architecture() -> None:
    config = PretrainConfig.from_file(ROOT / "recipes" / "demo.yaml")
    built = new_model_config(config)
    shipped = json.loads((ASSETS / "demo" / "config.json").read_text("utf-8"))
    assert {**built.to_dict(), "half": True} == shipped


@pytest.mark.parametrize("name", ["headline", "sentiment"])
def test_adapter_recipes_match_the_shipped_adapters(name: str) -> None:
    config = FinetuneConfig.from_file(ROOT / "recipes" / f"{name}.yaml")
    sidecar = json.loads((ASSETS / "adapters" / name / "cpmlive_adapter.json").read_text("utf-8"))
    task = json.loads((ASSETS / "adapters" / name / "task.json").read_text("utf-8"))
    assert config.model == "demo"
    shipped = DeltaConfig.from_dict(sidecar["delta"])
    recipe = DeltaConfig.from_dict(config.delta)
    assert ((recipe.method, recipe.r, recipe.alpha, recipe.targets)
            == (shipped.method, shipped.r, shipped.alpha, shipped.targets))
    assert task["task"] == config.task
    assert (task["max_input_tokens"], task["max_output_tokens"]) == (config.max_input_tokens, config.max_output_tokens)
