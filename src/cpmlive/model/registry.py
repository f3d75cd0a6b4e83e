"""The model families, keyed by the ``model_type`` of their config. ``cpmlive.load``, the
verbs, the recipes and the server look a family up here and ask it what it can do instead of
naming one, so a new family is its folder, its tokenizer and one name in :data:`FAMILY_PACKAGES`
(see ``docs/adding-a-family.md``).

Presets and :func:`check_model` read only the families' configs (no torch): the CLI refuses a bad
model name before it imports anything heavy. :data:`FAMILIES` imports the models on first use.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cpmlive.errors import CpmliveError
from cpmlive.resources import VOCAB_NAME, model_path

# What a family may be asked to do, and how a refusal names it; each family lists its own, and
# ``cpmlive.LM``, the server's routes and the CLI's verbs ask ``Family.require`` before any work.
ABILITIES = {
    "generate": "generate text (generate, /v1/completions)",
    "chat": "chat (chat, /v1/chat/completions)",
    "fill": "fill <mask> blanks (fill, /v1/fill)",
    "title": "suggest titles (the headline app: title, /v1/title)",
    "classify": "classify text (/v1/classify)",
    "embed": "embed text (embed, /v1/embeddings)",
    "bee": "answer JSON tasks (bee, /v1/bee)",
    "align": "be aligned (align sft/rm/dpo/ppo/grpo)",
    "calibrate": "be quantized with calibration (quantize --method gptq|awq)",
    "prune": "be pruned (compress: prune)",
    "moefy": "be MoEfied (compress: moefy)",
    "retrain": "be trained on a token store (compress: distill, sparse24, qat)",
    "prompt": "take a soft prompt (finetune's delta method prompt; lora and norm deltas tune every family)",
}


class Presets(Mapping):
    """A family's presets (name -> a function making its config). ``aliases`` are old names that
    are still found (``"tiny"`` for ``"ant-tiny"``); listings show only the names."""

    def __init__(self, makers: Mapping[str, Callable[[], Any]], aliases: Mapping[str, str] | None = None) -> None:
        self.makers, self.aliases = dict(makers), dict(aliases or {})

    def __getitem__(self, name: str) -> Callable[[], Any]:
        return self.makers[self.aliases.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return name in self.makers or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.makers)

    def __len__(self) -> int:
        return len(self.makers)


def family_presets(package: str) -> Presets:
    """The presets of ``cpmlive.model.<package>.config`` (``PRESETS``, old names in ``PRESET_ALIASES``)."""
    config = importlib.import_module(f"cpmlive.model.{package}.config")
    return Presets(config.PRESETS, getattr(config, "PRESET_ALIASES", None))


@dataclass(frozen=True)
class Family:
    """One model family, what it can do (``abilities``, keys of :data:`ABILITIES`) and the
    functions that read, write and describe its checkpoints.

    ``tokenizer`` is a class with ``for_model(vocab_file, vocab_size, hf_compat=False)``: the
    tokenizer of a checkpoint's vocabulary file, refusing in one line a file of another family,
    a vocabulary that does not fit the embedding, or ``hf_compat`` where the family has no HF mode.
    """

    model_type: str
    name: str  # as people write it: "CPM-Ant"
    abilities: frozenset[str]
    config: type
    model: type
    tokenizer: type
    presets: Mapping[str, Callable[[], Any]]
    build: Callable[..., Any]  # (config, device, dtype, seed) -> a model with fresh weights
    load: Callable[..., tuple[Any, Path]]  # (path, dtype, device) -> (model, directory of its vocabulary)
    convert: Callable[..., Path]
    info: Callable[..., dict]
    # (path) -> where a checkpoint's files are, without reading its weights; refuses a path holding none
    resolve: Callable[..., Any]
    aliases: tuple[str, ...] = ()  # other model_type spellings (HF's) of the same family
    vocab_name: str = VOCAB_NAME  # the vocabulary file a checkpoint directory holds
    vocab_example: str = ""  # how a refusal names a vocabulary that fits its presets; ``vocab_name`` when empty
    demo: str = ""  # a small checkpoint shipped in cpmlive.resources (its tokenizer is tested on it), if any
    hint: str = ""  # what the family does instead, said after a refusal
    # A checkpoint that names no model_type (OpenBMB's, Megatron's) is this family's when ``claims`` says so.
    claims: Callable[[Path], bool] | None = None
    # State-dict keys only this family's weights have (ours and the published layouts), to name
    # the family of weights given under another family's config.
    signature_keys: tuple[str, ...] = ()
    weights_name: str = ""  # how an error names this family's weights; ``name`` when empty
    pretrain_objective: str | None = None  # the objective of cpmlive.data.stream it pretrains with, if any
    packs_head: bool = False  # batched CPU decoding reads a oneDNN-blocked copy of its tied head (infer/packing.py)
    # (config) -> our module paths -> their names in the layout the family's checkpoints are published in
    # (HF's), where its adapters are saved under those names so that PEFT loads them on the published
    # model (cpmlive.tune.published); None: adapters keep our module names.
    adapter_modules: Callable[[Any], dict[str, str]] | None = None

    def can(self, ability: str) -> bool:
        if ability not in ABILITIES:
            raise ValueError(f"unknown ability {ability!r}")  # a programming error, not the user's
        return ability in self.abilities

    def require(self, ability: str) -> None:
        """Refuse ``ability`` in one line when this family cannot do it."""
        if not self.can(ability):
            hint = f"; {self.hint}" if self.hint else ""
            raise CpmliveError(f"{self.name} cannot {ABILITIES[ability]}: that needs a {owners(ability)} "
                               f"checkpoint{hint}")


# The registry: each name is a folder of cpmlive.model holding config.py (PRESETS) and family.py (FAMILY).
FAMILY_PACKAGES = ("ant", "bee", "cpm1", "decoder", "t5", "cpm2", "bert")
DEFAULT_PACKAGE = "ant"  # OpenBMB checkpoints and bare vocabularies carry no model_type
CONFIG_NAME = "config.json"


def _all_presets() -> Presets:
    each = [family_presets(package) for package in FAMILY_PACKAGES]
    return Presets({name: make for presets in each for name, make in presets.makers.items()},
                   {old: name for presets in each for old, name in presets.aliases.items()})


ALL_PRESETS = _all_presets()


@cache
def families() -> dict[str, Family]:
    entries = (importlib.import_module(f"cpmlive.model.{package}.family").FAMILY for package in FAMILY_PACKAGES)
    return {entry.model_type: entry for entry in entries}


def owners(ability: str) -> str:
    """The names of the families that can do ``ability``, as a refusal says them: "CPM-Ant, CPM-1 or Llama-family"."""
    names = [entry.name for entry in families().values() if ability in entry.abilities]
    return " or ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} or {names[-1]}"


def default_family() -> Family:
    """The family of a checkpoint or vocabulary that names none (OpenBMB's CPM-Ant)."""
    return importlib.import_module(f"cpmlive.model.{DEFAULT_PACKAGE}.family").FAMILY


def __getattr__(name: str) -> Any:
    """``FAMILIES`` and ``DEFAULT`` import every family's model: only when asked for."""
    if name == "FAMILIES":
        return families()
    if name == "DEFAULT":
        return default_family()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family(model_type: str) -> Family:
    for entry in families().values():
        if model_type == entry.model_type or model_type in entry.aliases:
            return entry
    known = sorted({name for entry in families().values() for name in (entry.model_type, *entry.aliases)})
    raise CpmliveError(f"model_type {model_type!r} is not supported (supported: {', '.join(known)})")


def family_of(path: str | os.PathLike) -> Family:
    """The family of a checkpoint (directory or weights file, ``"demo"`` too): the family that
    claims it (OpenBMB's and Megatron's layouts name none), else the ``model_type`` of its
    ``config.json``, else CPM-Ant's."""
    directory = model_path(path)
    for entry in families().values():
        if entry.claims is not None and directory.exists() and entry.claims(directory):
            return entry
    config = directory / CONFIG_NAME if directory.is_dir() else directory.parent / CONFIG_NAME
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return default_family() if model_type is None else family(str(model_type))


def preset_family(name: str) -> Family | None:
    """The family whose preset ``name`` is, if any."""
    return next((entry for entry in families().values() if name in entry.presets), None)


def preset(name: str) -> Any:
    if name not in ALL_PRESETS:
        raise CpmliveError(f"unknown preset {name!r} (known: {', '.join(sorted(ALL_PRESETS))})")
    return ALL_PRESETS[name]()


def check_model(name_or_path: str | os.PathLike) -> Path:
    """The path a model name stands for (:func:`cpmlive.resources.model_path`), refusing a name
    that is neither a path nor a preset. Light (no torch): the CLI calls it before it imports
    anything that loads models."""
    path = model_path(name_or_path)
    if not path.exists() and str(name_or_path) not in ALL_PRESETS:
        raise CpmliveError(f"{name_or_path}: no such checkpoint or preset (presets: {', '.join(sorted(ALL_PRESETS))})")
    return path


__all__ = ["ABILITIES", "ALL_PRESETS", "DEFAULT_PACKAGE", "FAMILY_PACKAGES", "Family", "Presets", "check_model",
           "families", "family", "family_of", "family_presets", "owners", "preset", "preset_family"]
