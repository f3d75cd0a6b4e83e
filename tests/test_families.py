"""The model-family registry: verbs find a checkpoint's family by its config's model_type."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.model import registry as families
from cpmlive.model.ant.convert import convert


def test_cpm_ant_checkpoints_in_every_format_are_cpm_ant(tmp_path):
    convert("demo", tmp_path / "hf", to="hf")
    convert("demo", tmp_path / "openbmb" / "demo.pt", to="openbmb")
    for source in ("demo", tmp_path / "hf", tmp_path / "openbmb" / "demo.pt"):
        assert families.family_of(source) is families.family("cpm-ant")
    assert families.preset_family("ant-10b") is families.family("cpm-ant") and families.preset_family("nope") is None
    cpm1 = families.family("cpm1")
    assert families.preset_family("cpm1-2.6b") is cpm1 and families.family("gpt2") is cpm1


def test_unknown_model_type_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt9"}), encoding="utf-8")
    with pytest.raises(CpmliveError, match="model_type 'gpt9' is not supported"):
        families.family_of(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err
    assert ("not supported (supported: bert, cpm-ant, cpm-bee, cpm1, cpm2, cpmant, cpmbee, decoder, eva, glm, gpt2, "
            "llama, minicpm, minicpm3, mistral, mt5, qwen2, qwen3, roberta, t5, umt5)") in error
    assert error.count("\n") == 1


def test_a_new_family_is_one_entry(tmp_path, capsys, monkeypatch):
    """The verbs dispatch on the registry: an entry is all a family needs to be described."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "toy"}), encoding="utf-8")
    toy = dataclasses.replace(families.family("cpm-ant"), model_type="toy", aliases=(),
                              info=lambda path: {"path": str(path), "format": "toy", "config": {"layers": 1}})
    monkeypatch.setitem(families.FAMILIES, "toy", toy)
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "format: toy" in out and "layers = 1" in out
