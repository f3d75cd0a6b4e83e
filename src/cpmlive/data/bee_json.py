"""CPM-Bee's JSON tasks as text and objects: parsing and the checks a task must pass, with no
torch, so the CLI refuses a bad task before it imports anything heavy."""

from __future__ import annotations

import json
from typing import Any

from cpmlive.errors import CpmliveError

MAX_DEPTH = 8  # what every CPM-Bee script passes
ANSWER_KEY = "<ans>"


def parse_task(text: str, where: str = "input") -> dict:
    """A JSON task object from text, with one-line errors for what is not one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CpmliveError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    return check_task(obj, where)


def _check_tree(value: Any, path: str, depth: int, where: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise CpmliveError(f"{where}: {path} is {kind}; every value must be a string or an object of strings")
    if depth > MAX_DEPTH:
        raise CpmliveError(f"{where}: {path} nests deeper than {MAX_DEPTH} levels")
    for key, child in value.items():
        if key == ANSWER_KEY and path:
            raise CpmliveError(f"{where}: {path}.<ans> is not at the top level; CPM-Bee predicts only the "
                               "<ans> field of the outer object (nest the answers inside it instead)")
        _check_tree(child, f"{path}.{key}" if path else key, depth + 1, where)


def check_task(obj: Any, where: str = "input") -> dict:
    """``obj`` if it is a task CPM-Bee can answer, else a one-line error saying why not."""
    if not isinstance(obj, dict):
        raise CpmliveError(f"{where}: a task is a JSON object, got {type(obj).__name__}")
    if ANSWER_KEY not in obj:
        raise CpmliveError(f"{where}: no \"<ans>\" field: say where the answer goes, e.g. \"<ans>\": \"\"")
    options = obj.get("options")
    if options is not None and not isinstance(options, dict):
        raise CpmliveError(f"{where}: options must be an object like {{\"<option_0>\": \"...\"}}, "
                           f"got {type(options).__name__}")
    _check_tree(obj, "", 1, where)
    return obj


def check_example(obj: Any, where: str = "example") -> dict:
    """An in-context example: a task whose ``<ans>`` leaves are filled (it shows its answer)."""
    check_task(obj, where)

    def leaves(value: Any) -> list[str]:
        return [leaf for child in value.values() for leaf in leaves(child)] if isinstance(value, dict) else [value]

    answers = leaves(obj[ANSWER_KEY])
    if not answers or not all(answer.strip() for answer in answers):
        raise CpmliveError(f"{where}: an in-context example shows its answer: fill every <ans> leaf")
    return obj


__all__ = ["ANSWER_KEY", "MAX_DEPTH", "check_example", "check_task", "parse_task"]
