"""Task files for ``cpmlive finetune``: JSON Lines, one example per line.

Generation (``--task generate``)::

    {"input": "新华社北京1月5日电…", "output": "李鹏会见美国客人"}

Classification (``--task classify``)::

    {"input": "房间很干净，服务也好。", "label": "正面"}

* The file is UTF-8 (a BOM is allowed); blank lines are skipped.
* ``input`` and ``output``/``label`` are required, must be JSON strings and
  must not be empty or only whitespace. Labels are compared as written, so
  ``"1"`` and ``"1 "`` are two labels; numbers must be quoted.
* Any other field is allowed and kept in ``Example.extra`` (``cpmlive data
  headlines`` writes ``strict``, ``line``…).
* The label set of a classification task is the set of labels in its
  training file; an evaluation file may only use those (``check_labels``).

Every problem is a ``CpmliveError`` naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cpmlive.errors import CpmliveError
from cpmlive.utils import atomic_write_text, check_output

TARGET_FIELDS = {"generate": "output", "classify": "label"}
_OTHER_TASK = {"generate": "classify", "classify": "generate"}


@dataclass(frozen=True)
class Example:
    """One example: the text to read, the text (or label) to produce, any other fields,
    and its 1-based line number in the file it came from (0 when built in code)."""

    input: str
    target: str
    extra: dict = field(default_factory=dict)
    line: int = 0


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CpmliveError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CpmliveError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as exc:
        raise CpmliveError(f"{path}: cannot read: {exc.strerror}") from None


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise CpmliveError(f"{path}:{number}: not UTF-8 text (bad byte at column {exc.start + 1})") from None


def _json_kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _text_field(record: dict, name: str, where: str, task: str) -> str:
    if name not in record:
        other = _OTHER_TASK[task]
        found = name != "input" and TARGET_FIELDS[other] in record
        hint = f' (it has "{TARGET_FIELDS[other]}": is it a {other} file?)' if found else ""
        raise CpmliveError(f'{where}: missing field "{name}"{hint}')
    value = record[name]
    if not isinstance(value, str):
        raise CpmliveError(f'{where}: field "{name}" must be a string, not {_json_kind(value)}')
    if not value.strip():
        raise CpmliveError(f'{where}: field "{name}" is empty')
    return value


def parse_example(text: str, task: str, where: str) -> Example:
    """One JSONL line as an Example; ``where`` (``file:line``) prefixes any error."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CpmliveError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise CpmliveError(f"{where}: expected a JSON object, got {_json_kind(record)}")
    target_field = TARGET_FIELDS[task]
    source = _text_field(record, "input", where, task)
    target = _text_field(record, target_field, where, task)
    extra = {key: value for key, value in record.items() if key not in ("input", target_field)}
    return Example(source, target, extra)


def _check_task(task: str) -> None:
    if task not in TARGET_FIELDS:
        raise CpmliveError(f"unknown task {task!r} (expected one of: {', '.join(TARGET_FIELDS)})")


def read_examples(path: str | os.PathLike[str], task: str) -> list[Example]:
    """Every example of a task file, in file order (see the module docstring)."""
    _check_task(task)
    path = Path(path)
    examples = []
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        text = _decode(raw, path, number)
        if not text.strip():
            continue
        example = parse_example(text, task, f"{path}:{number}")
        examples.append(Example(example.input, example.target, example.extra, number))
    if not examples:
        raise CpmliveError(f"{path}: empty file, no examples")
    return examples


def check_labels(examples: Iterable[Example], labels: Collection[str], path: str | os.PathLike[str]) -> None:
    """CpmliveError at the first example whose label is not in ``labels`` (the training labels)."""
    for example in examples:
        if example.target not in labels:
            known = ", ".join(sorted(labels))
            raise CpmliveError(f"{path}:{example.line}: label {example.target!r} was not seen in training "
                               f"(training labels: {known})")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict]) -> None:
    """One JSON object a line (UTF-8, not ASCII-escaped), written atomically."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(path, text)


def output_dir(out: str | os.PathLike[str], writes: Iterable[str] = (), force: bool = False) -> Path:
    """``out``, created if needed (a CpmliveError if it cannot be). The files named in ``writes``
    must not exist there yet, unless ``force``; other files in ``out`` are never touched."""
    out = Path(out)
    for name in writes:
        check_output(out / name, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CpmliveError(f"cannot create output directory {out}: {exc.strerror}") from None
    return out


SPLIT_FILES = ("train.jsonl", "dev.jsonl", "test.jsonl")


def write_splits(out: str | os.PathLike[str], splits: dict[str, Iterable[dict]]) -> None:
    """Write ``<out>/<split>.jsonl`` for each split (creating ``out``), each file atomically."""
    out = output_dir(out)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
