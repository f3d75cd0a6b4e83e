"""What ships inside the package, resolved in one place: the demo models (``"demo"``, CPM-Ant;
``"bee-demo"``, CPM-Bee; ``"cpm1-demo"``, CPM-1), the adapters trained on it (``"headline"``, ``"sentiment"``)
and vocabulary files.

Every verb and the Python API name these the same way; this module sits below every stage, so
each of them may resolve a name without importing a higher layer.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpmlive.errors import CpmliveError

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO = "demo"
BEE_DEMO = "bee-demo"  # the bilingual CPM-Bee demo
CPM1_DEMO = "cpm1-demo"  # a small CPM-1 (GPT-2) with its own SentencePiece vocabulary: recipes/cpm1-demo.yaml
DECODER_DEMO = "llama-demo"  # a small Llama with its own byte-level BPE tokenizer: recipes/llama-demo.yaml
T5_DEMO = "t5-demo"  # a small T5 v1.1 with its own Unigram tokenizer: recipes/t5-demo.yaml
CPM2_DEMO = "cpm2-demo"  # a tiny CPM-2 with a CPM-2-style vocabulary: python -m cpmlive.train.cpm2_demo
BERT_DEMO = "bert-demo"  # a small Chinese BERT with a WordPiece tokenizer: python -m cpmlive.train.bert_demo
SHIPPED_MODELS = (DEMO, BEE_DEMO, CPM1_DEMO, DECODER_DEMO, T5_DEMO, CPM2_DEMO, BERT_DEMO)
VOCAB_NAME = "vocab.txt"


def demo_dir(name: str = DEMO) -> Path:
    path = ASSETS / name
    if not path.is_dir():
        raise CpmliveError(f"the {name} model is not installed in this package")
    return path


def model_path(name_or_path: str | os.PathLike) -> Path:
    """``"demo"`` (CPM-Ant), ``"bee-demo"`` (CPM-Bee) and ``"cpm1-demo"`` (CPM-1) are the shipped
    models (unless a path of that name exists); anything else is a path."""
    path = Path(name_or_path)
    if str(name_or_path) in SHIPPED_MODELS and not path.exists():
        return demo_dir(str(name_or_path))
    return path


def shipped_adapters() -> list[str]:
    """Names of the adapters installed with the package (trained on the demo model)."""
    root = ASSETS / "adapters"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def adapter_path(name_or_path: str | os.PathLike) -> Path:
    """A directory, or the name of an adapter shipped under ``assets/adapters``."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = ASSETS / "adapters" / str(name_or_path)
    if shipped.is_dir():
        return shipped
    raise CpmliveError(f"{name_or_path}: no such adapter directory or shipped adapter "
                       f"(shipped: {', '.join(shipped_adapters()) or 'none'})")


def vocab_path(model_or_vocab: str | os.PathLike, name: str = VOCAB_NAME) -> Path:
    """A vocabulary file, or the ``vocab.txt`` (``name``) of a checkpoint directory (``"demo"`` included)."""
    path = model_path(model_or_vocab)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise CpmliveError(f"{model_or_vocab}: no vocabulary file found")
    return path


__all__ = ["ASSETS", "BEE_DEMO", "BERT_DEMO", "CPM1_DEMO", "CPM2_DEMO", "DECODER_DEMO", "DEMO", "T5_DEMO",
           "adapter_path", "demo_dir", "model_path", "shipped_adapters", "vocab_path"]
