"""Model families, keyed by the ``model_type`` of their config: everything a verb needs to know
about one family (its config, model and tokenizer classes, its input layout, and the checkpoint
formats it reads and writes).

``cpmlive.load``, ``convert``, ``info`` and ``tokenize`` look the family up here instead of
naming CPM-Ant, so a new family (CPM-Bee, CPM-1) is a config, a model file, a tokenizer and one
entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from cpmlive.config import BEE_PRESETS, CPM1_PRESETS, PRESETS, AntConfig, BeeConfig, Cpm1Config
from cpmlive.data import bee as bee_layout
from cpmlive.data import layout as ant_layout
from cpmlive.errors import CpmliveError
from cpmlive.model import convert as ant_convert
from cpmlive.model import bee_convert, cpm1_convert
from cpmlive.model.ant import CpmAnt, build_model
from cpmlive.model.bee import CpmBee, build_bee
from cpmlive.model.cpm1 import Cpm1, build_cpm1
from cpmlive.model.checkpoint import CONFIG_NAME, VOCAB_NAME
from cpmlive.resources import model_path
from cpmlive.tokenizer import AntTokenizer
from cpmlive.tokenizer.bee import BeeTokenizer
from cpmlive.tokenizer.cpm1 import Cpm1Tokenizer

# What a family may be asked to do, and how a refusal names it; each family lists its own, and
# ``cpmlive.LM``, the server's routes and the CLI's verbs ask ``Family.require`` before any work.
ABILITIES = {
    "generate": "generate text (generate, /v1/completions)",
    "chat": "chat (chat, /v1/chat/completions)",
    "fill": "fill <mask> blanks (fill, /v1/fill)",
    "title": "suggest titles (the headline app: title, /v1/title)",
    "classify": "classify text (/v1/classify)",
    "bee": "answer JSON tasks (bee, /v1/bee)",
    "align": "be aligned (align sft/rm/dpo/ppo/grpo)",
    "calibrate": "be quantized with calibration (quantize --method gptq|awq)",
}


@dataclass(frozen=True)
class Family:
    """One model family, what it can do (``abilities``, keys of :data:`ABILITIES`) and the
    functions that read, write and describe its checkpoints."""

    model_type: str
    name: str  # as people write it: "CPM-Ant"
    abilities: frozenset[str]
    config: type
    model: type
    tokenizer: type
    layout: ModuleType
    formats: tuple[str, ...]
    presets: dict[str, Callable[[], Any]]
    build: Callable[..., Any]  # (config, device, dtype, seed) -> a model with fresh weights
    load: Callable[..., tuple[Any, Path]]  # (path, dtype, device) -> (model, directory of its vocabulary)
    convert: Callable[..., Path]
    info: Callable[..., dict]
    aliases: tuple[str, ...] = ()  # other model_type spellings (HF's) of the same family
    vocab_name: str = VOCAB_NAME  # the vocabulary file a checkpoint directory holds
    hint: str = ""  # what the family does instead, said after a refusal

    def can(self, ability: str) -> bool:
        if ability not in ABILITIES:
            raise ValueError(f"unknown ability {ability!r}")  # a programming error, not the user's
        return ability in self.abilities

    def require(self, ability: str) -> None:
        """Refuse ``ability`` in one line when this family cannot do it."""
        if not self.can(ability):
            owners = " or ".join(entry.name for entry in FAMILIES.values() if ability in entry.abilities)
            hint = f"; {self.hint}" if self.hint else ""
            raise CpmliveError(f"{self.name} cannot {ABILITIES[ability]}: that needs a {owners} checkpoint{hint}")


ANT = Family(
    model_type="cpm-ant", name="CPM-Ant",
    abilities=frozenset({"generate", "chat", "fill", "title", "classify", "align", "calibrate"}),
    config=AntConfig, model=CpmAnt, tokenizer=AntTokenizer, layout=ant_layout,
    formats=ant_convert.FORMATS, presets=PRESETS, build=build_model, load=ant_convert.load_pretrained, convert=ant_convert.convert,
    info=ant_convert.checkpoint_info, aliases=("cpmant",),
)

BEE = Family(
    model_type="cpm-bee", name="CPM-Bee", abilities=frozenset({"bee"}),
    hint="a CPM-Bee model answers JSON tasks: use lm.bee(task) (or `cpmlive bee`, /v1/bee)", config=BeeConfig, model=CpmBee, tokenizer=BeeTokenizer, layout=bee_layout,
    formats=bee_convert.FORMATS, presets=BEE_PRESETS, build=build_bee, load=bee_convert.load_pretrained,
    convert=bee_convert.convert, info=bee_convert.checkpoint_info,
)

CPM1 = Family(
    model_type="cpm1", name="CPM-1", abilities=frozenset({"generate", "chat", "title", "classify"}),
    hint="CPM-1 is a left-to-right model: use generate", config=Cpm1Config, model=Cpm1, tokenizer=Cpm1Tokenizer, layout=ant_layout,
    formats=cpm1_convert.FORMATS, presets=CPM1_PRESETS, build=build_cpm1, load=cpm1_convert.load_pretrained,
    convert=cpm1_convert.convert, info=cpm1_convert.checkpoint_info, aliases=("gpt2",),
    vocab_name=Cpm1Tokenizer.vocab_file,
)

FAMILIES: dict[str, Family] = {ANT.model_type: ANT, BEE.model_type: BEE, CPM1.model_type: CPM1}
DEFAULT = ANT  # OpenBMB checkpoints and bare vocabularies carry no model_type


def family(model_type: str) -> Family:
    for entry in FAMILIES.values():
        if model_type == entry.model_type or model_type in entry.aliases:
            return entry
    raise CpmliveError(f"model_type {model_type!r} is not a known model family "
                       f"(known: {', '.join(sorted(FAMILIES))})")


def family_of(path: str | os.PathLike) -> Family:
    """The family of a checkpoint (directory or weights file, ``"demo"`` too), by the
    ``model_type`` of its ``config.json``; an OpenBMB checkpoint without one is CPM-Bee's when
    its config json has CPM-Bee's keys, else CPM-Ant's."""
    directory = model_path(path)
    if directory.exists() and bee_convert.is_bee_checkpoint(directory):
        return BEE
    if cpm1_convert.is_cpm1_checkpoint(directory):
        return CPM1
    config = directory / CONFIG_NAME if directory.is_dir() else directory.parent / CONFIG_NAME
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return DEFAULT if model_type is None else family(str(model_type))


def preset_family(name: str) -> Family | None:
    """The family whose preset ``name`` is, if any."""
    return next((entry for entry in FAMILIES.values() if name in entry.presets), None)


__all__ = ["ABILITIES", "ANT", "BEE", "CPM1", "DEFAULT", "FAMILIES", "Family", "family", "family_of", "preset_family"]
