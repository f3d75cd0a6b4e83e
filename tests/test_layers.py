"""The package's layers: data flows one way, and no module imports a higher layer, even inside a
function or under ``TYPE_CHECKING`` (every import statement counts)."""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cpmlive"

# Lowest first; a part may import only parts of a lower layer.
LAYERS = [
    {"errors"},
    {"utils", "resources"},
    {"config", "recipe", "tokenizer", "download"},  # download: fetching published checkpoints
    {"data"},
    {"model"},
    {"train"},
    {"tune", "compress"},
    {"align"},  # builds on delta tuning
    {"infer"},
    {"api"},
    {"__init__"},
    {"apps"},
    {"serve"},
    {"cli"},
    {"demo", "tour", "__main__"},  # tour: the README's commands, run through the CLI
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``cpmlive`` module an import statement anywhere in the file names."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "cpmlive" or name.startswith("cpmlive.")}


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    assert {part_of(module_name(path)) for path in sources()} <= set(RANK)


def test_no_part_imports_a_higher_or_equal_layer():
    upward = []
    for path in sources():
        here = part_of(module_name(path))
        for module in imported_modules(path):
            there = part_of(module)
            if there != here and there in RANK and RANK[there] >= RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    known = {module_name(path): path for path in sources()}
    graph = defaultdict(set)
    for module, path in known.items():
        graph[module] = {name for name in imported_modules(path) if name in known and name != module}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1 and not module.startswith(target + "."):
                cycle = trail[trail.index(target):] + [module, target] if target in trail else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_layers_picture_matches_the_code():
    """docs/layers.png (drawn by docs/layers.py) shows today's layers and model families."""
    from PIL import Image

    root = PACKAGE.parents[1]
    spec = importlib.util.spec_from_file_location("layers_picture", root / "docs" / "layers.py")
    picture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(picture)
    drawn = Image.open(root / "docs" / "layers.png").text["Description"]
    assert drawn == picture.description(), "redraw it: .venv/bin/python docs/layers.py"


def test_the_readme_design_names_what_the_code_has():
    """The README's design tree names every part and every model sub-package, and each file or
    folder it names exists."""
    import re

    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    tree = readme.split("## Design\n", 1)[1].split("```\n", 2)[1]
    words = set(re.findall(r"(?<![/\w.])[\w.]+/?", tree))
    parts = {part for part in RANK if part not in {"__init__", "__main__"}}
    missing = {part for part in parts if part not in words and f"{part}/" not in words and f"{part}.py" not in words}
    assert not missing, f"the README's design tree does not name {sorted(missing)}"
    model = PACKAGE / "model"
    families = {child.name for child in model.iterdir() if (child / "__init__.py").is_file()}
    assert {f"{name}/" for name in families} <= words
    named = [word for word in words if word.endswith((".py", "/")) and word != "src/"]
    present = {path.name for path in PACKAGE.rglob("*") if "__pycache__" not in path.parts}
    ghosts = [word for word in named if word.rstrip("/") not in present]
    assert not ghosts, f"the README's design tree names what is not there: {sorted(ghosts)}"
