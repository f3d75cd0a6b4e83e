"""Draw docs/layers.png: the package's layers, lowest at the bottom, as tests/test_layers.py defines
them, with the folders of each part (the model families among them).

    .venv/bin/python docs/layers.py        # rewrites docs/layers.png

The picture carries its own description (the PNG's ``Description`` text); tests/test_layers.py
compares it with the code, so a layer or family added without redrawing fails the suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cpmlive"
PICTURE = ROOT / "docs" / "layers.png"


def layers() -> list[set[str]]:
    spec = importlib.util.spec_from_file_location("test_layers", ROOT / "tests" / "test_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LAYERS


def folders(part: str) -> list[str]:
    """The sub-packages of one part (for ``model``: the families and the runtime)."""
    directory = PACKAGE / part
    if not directory.is_dir():
        return []
    return sorted(child.name for child in directory.iterdir() if (child / "__init__.py").is_file())


def description() -> str:
    """One line per layer, lowest first: ``parts [sub-packages]``."""
    lines = []
    for parts in layers():
        named = []
        for part in sorted(parts):
            inner = folders(part)
            named.append(f"{part}({', '.join(inner)})" if inner else part)
        lines.append(" ".join(named))
    return "\n".join(lines)


def draw(path: Path = PICTURE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = description().splitlines()
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 0.8))
    for level, row in enumerate(rows):
        ax.add_patch(plt.Rectangle((0, level), 1, 0.86, facecolor=plt.cm.Blues(0.15 + 0.6 * level / len(rows)),
                                   edgecolor="white"))
        ax.text(0.02, level + 0.43, row, va="center", fontsize=9, family="monospace")
    ax.annotate("", xy=(1.04, len(rows) - 0.2), xytext=(1.04, 0.2),
                arrowprops={"arrowstyle": "->", "color": "0.3"})
    ax.text(1.06, len(rows) / 2, "imports only downward", rotation=90, va="center", fontsize=9, color="0.3")
    ax.set_xlim(0, 1.12)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    ax.set_title("cpmlive's layers (lowest first; a part imports only parts below it)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": description()})
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else PICTURE)
    print(f"wrote {PICTURE.relative_to(ROOT)}")
