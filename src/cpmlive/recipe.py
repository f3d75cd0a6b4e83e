"""Recipe configs (pretraining, fine-tuning): dataclasses read from YAML plus ``key=value``
overrides, strict about unknown keys, written back as YAML beside each run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cpmlive.errors import CpmliveError

R = TypeVar("R", bound="Recipe")

# Choices shared by the pretraining and fine-tuning recipes.
SCHEDULES = ("cosine", "noam", "constant")
PRECISIONS = ("bf16", "fp32")


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise CpmliveError(f"{path}: no such recipe") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid YAML recipe ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` (YAML-parsed value); ``section.key=value`` sets one key of a mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CpmliveError(f"override {item!r} is not key=value")
        target, *rest = key.split(".")
        parsed = yaml.safe_load(value)
        if rest:
            section = data.setdefault(target, {})
            if not isinstance(section, dict):
                raise CpmliveError(f"override {item!r}: {target} is not a mapping")
            section[rest[0]] = parsed
        else:
            data[target] = parsed
    return data


class Recipe:
    """Mixin for recipe dataclasses."""

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                raise CpmliveError(f"config: unknown key {key!r}")
        return cls(**data)

    @classmethod
    def from_file(cls: type[R], path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> R:
        data = read_recipe_file(path) if path is not None else {}
        return cls.from_dict(apply_overrides(data, overrides))

    def check_choices(self, choices: dict[str, tuple[str, ...]]) -> None:
        """Refuse a field whose value is not among its allowed ones, naming both."""
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CpmliveError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


__all__ = ["PRECISIONS", "Recipe", "SCHEDULES", "apply_overrides", "read_recipe_file"]
