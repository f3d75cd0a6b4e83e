"""The code outside ``model/`` asks the registry instead of naming families, and the modules keep
to their own names and layers (issue 29: the registry everywhere, and the defects it lists)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpmlive.model import registry
from test_layers import imported_modules

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cpmlive"
FAMILY_CLASSES = {cls.__name__ for kind in registry.families().values()
                  for cls in (kind.model, kind.tokenizer, kind.config)}


def sources(skip: set[str] = frozenset()) -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] not in skip]


def family_tests(path: Path) -> list[str]:
    """``x.model_type == "..."`` comparisons and ``isinstance`` checks against a family's classes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names_type = any(isinstance(side, ast.Attribute) and side.attr == "model_type" for side in sides)
            if names_type and any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in sides):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} tests model_type")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) == 2 else set()
            if named & FAMILY_CLASSES:
                classes = sorted(named & FAMILY_CLASSES)
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} isinstance of {classes}")
    return found


def test_no_code_outside_model_tests_a_family_by_name_or_class():
    offenders = [line for path in sources({"model"}) for line in family_tests(path)]
    assert not offenders, "\n".join(offenders)


def private_imports(path: Path) -> list[str]:
    """``from cpmlive.x import _name``: a module reaching into another's private names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {alias.name} from {node.module}"
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cpmlive")
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_another_modules_private_names():
    offenders = [line for path in sources() for line in private_imports(path)]
    assert not offenders, "\n".join(offenders)


def test_corpus_files_are_read_in_data_not_in_the_tokenizer():
    """The tokenizer is below data: it builds vocabularies from texts; reading files is data's."""
    from cpmlive.data import corpora
    from cpmlive.tokenizer import vocab

    assert corpora.read_corpus_texts.__module__ == "cpmlive.data.corpora"
    assert not hasattr(vocab, "read_corpus_texts") and not hasattr(vocab, "_corpus_files")
    imported = {node.module for node in ast.walk(ast.parse(Path(corpora.__file__).read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom)}
    assert not any((module or "").startswith("cpmlive.tokenizer") for module in imported)


def test_the_tiny_ant_preset_is_listed_as_ant_tiny_and_still_found_as_tiny(capsys):
    from cpmlive.errors import CpmliveError

    assert "ant-tiny" in list(registry.ALL_PRESETS) and "tiny" not in list(registry.ALL_PRESETS)
    assert "tiny" in registry.ALL_PRESETS and registry.preset("tiny") == registry.preset("ant-tiny")
    assert registry.preset_family("tiny") is registry.family("cpm-ant")
    assert registry.check_model("tiny") is not None
    with pytest.raises(CpmliveError) as refused:
        registry.check_model("no-such-model")
    assert "ant-tiny" in str(refused.value) and "tiny," not in str(refused.value).replace("-tiny,", "")


def test_the_python_api_documents_any_family():
    import cpmlive.api as api

    for text in (api.LM.__doc__, api.__doc__, api.load.__doc__):
        assert not any(f"{kind.name} model" in text for kind in registry.families().values()), text
    assert not hasattr(api.LM, "is_bee") and not hasattr(api.LM, "is_cpm1")


MODEL = PACKAGE / "model"


def family_folders_imported(path: Path) -> set[str]:
    return {package for package in registry.FAMILY_PACKAGES for module in imported_modules(path)
            if module == f"cpmlive.model.{package}" or module.startswith(f"cpmlive.model.{package}.")}


def test_no_family_folder_imports_another_familys_folder():
    """docs/adding-a-family.md: what two families share lives in the stack, not in one of them."""
    offenders = [f"{path.relative_to(PACKAGE)} imports cpmlive.model.{other}"
                 for package in registry.FAMILY_PACKAGES for path in sorted((MODEL / package).rglob("*.py"))
                 for other in sorted(family_folders_imported(path) - {package})]
    assert not offenders, "\n".join(offenders)


def test_no_shared_module_of_model_imports_a_family_folder():
    """The stack, the checkpoint machinery and the runtime serve every family: they read a family
    through the registry and the shared configs, never by importing its folder."""
    family_dirs = {MODEL / package for package in registry.FAMILY_PACKAGES}
    shared = [path for path in sorted(MODEL.rglob("*.py")) if not family_dirs & set(path.parents)]
    assert any(path.parent.name == "runtime" for path in shared)
    offenders = [f"{path.relative_to(PACKAGE)} imports cpmlive.model.{package}"
                 for path in shared for package in sorted(family_folders_imported(path))]
    assert not offenders, "\n".join(offenders)


def test_every_family_field_is_read_somewhere():
    """A trait nothing reads is a dead declaration (issue 29 removed ``Family.layout``/``formats``).
    Read means by the package, or by the family contract test (``demo`` is there for it)."""
    from dataclasses import fields

    readers = [*sources(), Path(__file__).with_name("test_family_contract.py")]
    read = {node.attr for path in readers for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)}
    unread = sorted(field.name for field in fields(registry.Family) if field.name not in read)
    assert not unread, f"Family fields nothing reads: {unread}"


def test_checkpoint_vocabulary_names_come_from_the_families(monkeypatch, tmp_path):
    """Our layout writes and finds each registered family's ``vocab_name``, not a fixed list."""
    from dataclasses import replace

    from cpmlive.model import checkpoint

    assert checkpoint.vocab_names() == ("vocab.txt", "spiece.model", "tokenizer.json")
    assert checkpoint.vocab_file_name("a/cpm1.model") == "spiece.model"
    assert checkpoint.vocab_file_name("a/vocab") == checkpoint.vocab_file_name(["x"]) == "vocab.txt"
    known = registry.families()
    newcomer = replace(known["cpm-ant"], model_type="newcomer", vocab_name="vocab.json")
    monkeypatch.setattr(registry, "families", lambda: {**known, "newcomer": newcomer})
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    assert checkpoint.checkpoint_vocab(tmp_path) == tmp_path / "vocab.json"
    assert checkpoint.vocab_file_name("its.bpe") == "vocab.txt"
    assert checkpoint.is_checkpoint_file("vocab.json") and checkpoint.is_checkpoint_file("spiece.model")
    assert not checkpoint.is_checkpoint_file("notes.txt")


def test_json_object_refusals_read_as_english(tmp_path):
    """One JSON-object reader serves configs, shard indexes and adapters: its refusals name what
    was expected with the right article, and a missing adapter still says where to look."""
    from cpmlive.config import read_json_object
    from cpmlive.errors import CpmliveError
    from cpmlive.model.ant.model import build_model
    from cpmlive.model.registry import preset
    from cpmlive.tune.delta import load_adapter

    listed = tmp_path / "list.json"
    listed.write_text("[1]", encoding="utf-8")
    with pytest.raises(CpmliveError, match="an adapter config must be a JSON object"):
        read_json_object(listed, "adapter config")
    with pytest.raises(CpmliveError, match="a config must be a JSON object"):
        read_json_object(listed)
    with pytest.raises(CpmliveError, match=r"not found \(not an adapter directory\?\)"):
        load_adapter(build_model(preset("ant-tiny"), seed=0), tmp_path)
