"""Adapters in the module names of a family's published checkpoints.

A family whose checkpoints are published in another library's layout (the decoder family: HF's
``model.layers.N.self_attn.q_proj``) declares ``adapter_modules``: our module paths -> theirs.
Its adapters are then saved under the published names (tensors and ``target_modules``), so that
``PeftModel.from_pretrained`` loads them on the published model, and adapters PEFT trained on that
model load into ours. Families that declare nothing keep our names (CPM-Ant's adapters load in
PEFT on our own model classes).
"""

from __future__ import annotations

import re
from typing import Union

from torch import Tensor

from cpmlive.errors import CpmliveError

# The tensors a LoRA or norm delta adds under a tuned module (PEFT's names).
DELTA_PARTS = ("lora_A.weight", "lora_B.weight", "ln_tuning_layers.weight")
Targets = Union[list[str], str]


def _suffix_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _translate_targets(targets: Targets, mapping: dict[str, str]) -> Targets:
    """``targets`` (PEFT's rules: a list of names or suffixes, or one regex) over ``mapping``'s
    keys, as targets that select the same modules among its values: each list entry as the same
    number of trailing components of the other side's names where that selects exactly those
    modules, else their full names. An entry that selects nothing stays as it is (attaching then
    refuses it)."""
    if isinstance(targets, str):
        try:
            chosen = [mapping[name] for name in mapping if re.fullmatch(targets, name)]
        except re.error:
            return targets
        return sorted(chosen) if chosen else targets
    translated: list[str] = []
    for entry in targets:
        chosen = {mapping[name] for name in mapping if _suffix_matches(name, entry)}
        depth = entry.count(".") + 1
        shortened = {".".join(name.split(".")[-depth:]) for name in chosen}
        if len(shortened) == 1:
            short = shortened.pop()
            if {name for name in mapping.values() if _suffix_matches(name, short)} == chosen:
                chosen = {short}
        for name in sorted(chosen) or [entry]:
            if name not in translated:
                translated.append(name)
    return translated


class AdapterNames:
    """Our module paths <-> the published ones, for the modules one model has."""

    def __init__(self, published: dict[str, str], family_name: str) -> None:
        self.published, self.family_name = published, family_name
        self.ours = {theirs: ours for ours, theirs in published.items()}

    def check_targets(self, paths: list[str]) -> None:
        """Refuse a module the published layout has no name for (an adapter on it could not be saved)."""
        for path in paths:
            if path not in self.published:
                raise CpmliveError(f"target_modules: {path!r} has no module of its own in the published layout "
                                   f"of {self.family_name} checkpoints, where its adapters are saved")

    def targets_to_published(self, targets: Targets) -> Targets:
        return _translate_targets(targets, self.published)

    def targets_from_published(self, targets: Targets | None) -> Targets | None:
        return None if targets is None else _translate_targets(targets, self.ours)

    def key_to_published(self, key: str) -> str:
        """``layers.0.attn.project_q.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj.lora_A.weight``."""
        return self._rename(key, self.published)

    def tensors_from_published(self, tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """A saved adapter's tensors (keys under ``prefix``) in our names; keys of modules we do
        not know stay as they are (loading then names them as unexpected)."""
        return {prefix + self._rename(key.removeprefix(prefix), self.ours) if key.startswith(prefix) else key: tensor
                for key, tensor in tensors.items()}

    @staticmethod
    def _rename(key: str, mapping: dict[str, str]) -> str:
        for part in DELTA_PARTS:
            module = key.removesuffix("." + part)
            if module != key and module in mapping:
                return f"{mapping[module]}.{part}"
        return key


__all__ = ["AdapterNames", "DELTA_PARTS"]
