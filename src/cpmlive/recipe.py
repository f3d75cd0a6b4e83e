"""Recipe configs (pretraining, fine-tuning, alignment, compression): dataclasses read from YAML
plus ``key=value`` overrides, strict about unknown keys, written back as YAML beside each run;
the training loop's keys, which three of them share, are :class:`LoopArgs`.

Every field is checked against its annotation when the dataclass is built (however it is
built: ``from_file``, ``from_dict`` or a plain constructor call), and every numeric field
named in the class's ``RANGES`` table against its range, so a bad value is one line naming
the key, never a traceback later in the run. A new recipe gets both by inheriting
:class:`Recipe`; its own cross-field rules go in :meth:`Recipe.check`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from cpmlive.errors import CpmliveError
from cpmlive.utils import check_field_types

R = TypeVar("R", bound="Recipe")

# Choices of the training loop (LoopArgs).
SCHEDULES = ("cosine", "noam", "constant")
# "auto": bf16 where the device multiplies bf16 natively, else fp32 (see train.core.native_bf16)
PRECISIONS = ("auto", "bf16", "fp32")


# A number in exponent form without a dot (``5e-4``), which PyYAML (YAML 1.1) reads as a string.
EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class Bound:
    """A numeric range, for the ``RANGES`` table of a recipe."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)
FRACTION = Bound(0, 1, high_open=True)  # betas, dropout-like probabilities


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise CpmliveError(f"{path}: no such recipe") from None
    except IsADirectoryError:
        raise CpmliveError(f"{path}: is a directory, not a recipe") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CpmliveError(f"{path}: not a valid YAML recipe ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    text_keys: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """``key=value`` (YAML-parsed value); a dotted key reaches into mappings and lists:
    ``model_overrides.dim_model=96``, ``steps.0.prune.steps=20`` (or ``steps[0].prune.steps=20``).

    A missing mapping on the way is made. A list item that is a one-key mapping of settings (a
    compress step, ``{prune: {...}}``) lets them be named directly: ``steps.0.steps=20``. For
    ``text_keys`` (the string fields) a value YAML does not read as a string is kept as typed:
    ``out=2024`` is the directory ``"2024"`` and ``template={input}`` the template ``"{input}"``,
    not a number and a mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CpmliveError(f"override {item!r} is not key=value")
        path = override_path(key, item)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if len(path) == 1 and path[0] in text_keys and not isinstance(parsed, str):
            parsed = value
        _assign(data, path, parsed, item)
    return data


def override_path(key: str, item: str) -> list[str | int]:
    """``steps.0.prune.steps`` or ``steps[0].prune.steps``: the mapping keys and list indices in order."""
    parts: list[str | int] = []
    for piece in key.replace("[", ".[").split("."):
        bracketed = piece.startswith("[") and piece.endswith("]")
        name = piece[1:-1] if bracketed else piece
        if not name or "[" in name or "]" in name or (bracketed and not _is_index(name)):
            raise CpmliveError(f"override {item!r}: {key!r} is not a dotted key such as steps.0.prune.steps")
        parts.append(int(name) if _is_index(name) else name)
    return parts


def _is_index(name: str) -> bool:
    return name.removeprefix("-").isdigit()


def _assign(data: dict[str, Any], path: list[str | int], value: Any, item: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        where = _dotted(path[:depth + 1])
        if isinstance(node, list):
            node = node[_index(node, part, _dotted(path[:depth]), item)]
            if not isinstance(node, (dict, list)):
                raise CpmliveError(f"override {item!r}: {where} is {node!r}, not a mapping or list")
            node = _settings_of_step(node, path[depth + 1])
            continue
        if isinstance(part, int):
            raise CpmliveError(f"override {item!r}: {_dotted(path[:depth]) or 'the recipe'} is a mapping, "
                               f"not a list (no index {part})")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise CpmliveError(f"override {item!r}: {where} is {node!r}, not a mapping or list")
    last = path[-1]
    if isinstance(node, list):
        node[_index(node, last, _dotted(path[:-1]), item)] = value
    elif isinstance(last, int):
        raise CpmliveError(f"override {item!r}: {_dotted(path[:-1]) or 'the recipe'} is a mapping, "
                           f"not a list (no index {last})")
    else:
        node[last] = value


def _index(items: list, part: str | int, where: str, item: str) -> int:
    if not isinstance(part, int):
        raise CpmliveError(f"override {item!r}: {where} is a list: give an index (such as {where}.0), not {part!r}")
    if not -len(items) <= part < len(items):
        raise CpmliveError(f"override {item!r}: {where} has {len(items)} item{'s' * (len(items) != 1)}, "
                           f"no index {part}")
    return part


def _settings_of_step(node: dict | list, following: str | int) -> Any:
    """``{prune: {...}}`` reached through a list, with a next key that is not ``prune``: its settings."""
    if isinstance(node, dict) and len(node) == 1 and isinstance(following, str) and following not in node:
        (kind,) = node
        if node[kind] is None:
            node[kind] = {}
        if isinstance(node[kind], dict):
            return node[kind]
    return node


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(part) for part in path)


class Recipe:
    """Mixin for recipe dataclasses: typed, range-checked fields and YAML in and out.

    ``RANGES`` maps numeric field names to their :class:`Bound`; ``CHOICES`` maps string
    fields to their allowed values. Subclasses put other rules in :meth:`check`, not in
    ``__post_init__`` (which would skip these checks: defining one is refused)."""

    RANGES: ClassVar[dict[str, Bound]] = {}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: put validation in check(), not __post_init__ "
                            "(Recipe.__post_init__ runs the type and range checks)")

    def __post_init__(self) -> None:
        self.check_types()
        self.check_ranges(self.RANGES)
        self.check_choices(self.CHOICES)
        self.check()

    def check(self) -> None:
        """Rules of one recipe beyond types, ranges and choices (several fields together)."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def check_types(self) -> None:
        """Refuse a value that is not of its field's type; a float field's int becomes a float
        (so the YAML written beside the run reads back the same) and must be finite."""
        check_field_types(self, "config")
        for name, expected in self.field_types().items():
            if expected is float:
                value = float(getattr(self, name))
                if not math.isfinite(value):
                    raise CpmliveError(f"config: {name} must be a finite number, got {value!r}")
                setattr(self, name, value)

    def check_ranges(self, ranges: dict[str, Bound]) -> None:
        for name, bound in ranges.items():
            value = getattr(self, name)
            if not bound.admits(value):
                raise CpmliveError(f"config: {name} must be {bound.describe()}, got {value!r}")

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
        kinds = cls.field_types()
        data = apply_overrides(data, overrides, {name for name, kind in kinds.items() if kind is str})
        for name, value in data.items():  # ``lr: 5e-4``: a number key's number, as YAML 1.2 reads it
            if kinds.get(name) is float and isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value):
                data[name] = float(value)
        return cls.from_dict(data)

    def check_choices(self, choices: dict[str, tuple[str, ...]]) -> None:
        """Refuse a field whose value is not among its allowed ones, naming both."""
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CpmliveError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


@dataclass
class LoopArgs(Recipe):
    """The training loop's keys, which the pretraining, fine-tuning and alignment recipes share
    (``train.core`` reads them: the schedule, the optimizer, checkpoints). A recipe inherits them
    and redeclares one only to give it its own default (then its range too, if that differs);
    they stay flat keys of its YAML (``lr: 5e-4``) and overrides (``lr=5e-4``).

    ``max_steps`` 0 means as many steps as the recipe's ``epochs`` take."""

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    device: str = "auto"  # auto (a CUDA GPU when there is one), cpu, cuda or cuda:N

    RANGES: ClassVar[dict[str, Bound]] = {
        "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "max_steps": NON_NEGATIVE, "lr": POSITIVE,
        "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "beta1": FRACTION,
        "beta2": FRACTION, "grad_clip": POSITIVE, "seed": NON_NEGATIVE, "eval_every": AT_LEAST_ONE,
        "save_every": AT_LEAST_ONE, "keep_checkpoints": AT_LEAST_ONE,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"schedule": SCHEDULES, "precision": PRECISIONS}

    def to_dict(self) -> dict[str, Any]:
        """The recipe's own keys first, then the loop's (as ``config.yaml`` lists them)."""
        data = super().to_dict()
        loop = {f.name: data.pop(f.name) for f in dataclasses.fields(LoopArgs)}
        return {**data, **loop}


__all__ = ["AT_LEAST_ONE", "Bound", "FRACTION", "LoopArgs", "NON_NEGATIVE", "POSITIVE", "PRECISIONS", "Recipe",
           "SCHEDULES", "apply_overrides", "read_recipe_file"]
