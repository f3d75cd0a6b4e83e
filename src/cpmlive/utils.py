"""Small helpers shared by every stage: atomic writes, safe output destinations, and the dtype
products run in.

torch is imported inside the functions that need it, never at the top: the CLI imports this
module to parse its arguments, and ``cpmlive --help`` or a usage error must not pay for torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
import dataclasses
import types
import typing
import re
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Collection

from cpmlive.errors import CpmliveError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}  # name -> attribute of torch


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype by any of its usual names (``None`` and ``"auto"``: keep the stored one)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise CpmliveError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[dtype])


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype products of ``x`` run in: autocast's when it is on, else ``x``'s own."""
    import torch

    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def replace_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root`` (``layers.0.attn.project_q``)."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"``, ``"300000000"`` -> bytes (decimal units, ``i`` binary)."""
    match = SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else ""
    if match is None or unit not in UNITS:
        raise CpmliveError(f"{text!r} is not a size (for example 4GB, 512MiB or 300000000)")
    return int(float(match.group(1)) * UNITS[unit])


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open``/``mkdir`` would give (temp files default to private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place, so
    readers see the old file or the new one, never half of either."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise named_error(exc, path) from None
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise named_error(exc, path) from None
        raise


def named_error(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path``: a failed write names the file meant, not its temporary twin (or nothing)."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path)) if exc.errno else OSError(f"{path}: {exc}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- output destinations ----------------------------------------------------------------------------
# Every writer a user points at a path (convert, merge, vocab build, data prepare, ...) goes through
# these two: nothing the user did not name is deleted or replaced.


def check_output(path: str | os.PathLike, force: bool = False, resumable: Collection[str] = ()) -> Path:
    """Refuse a destination that already holds something, unless ``force``.

    A directory may hold ``resumable`` entries (what an interrupted run of the same writer left,
    for it to resume). With ``force`` the writer replaces only the files it writes."""
    path = Path(path)
    ancestor = next((parent for parent in path.parents if parent.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise CpmliveError(f"{path}: cannot be written, {ancestor} is a file, not a directory")
    if force or not (path.exists() or path.is_symlink()):
        return path
    if not path.is_dir():
        raise CpmliveError(f"{path}: already exists; pass --force to replace it, or choose a new path")
    entries = sorted(entry.name for entry in path.iterdir() if entry.name not in resumable)
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise CpmliveError(f"{path}: directory is not empty ({shown}); pass --force to replace only what "
                           "this writes there, or choose a new path")
    return path


def install_directory(build: Path, target: Path, owned: Callable[[str], bool] = lambda name: False) -> None:
    """Put the files of a fully written ``build`` directory at ``target``.

    An absent or empty ``target`` is replaced by one rename, so readers never see half of it.
    Otherwise each file is renamed into place, and the files ``owned`` claims that this write
    did not produce (an older write's other shards, say) are removed: every other file stays."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(build, target)
        return
    if not target.is_dir():
        raise CpmliveError(f"{target}: exists and is not a directory")
    written = {entry.name for entry in build.iterdir()}
    for name in sorted(written):
        os.replace(build / name, target / name)
    for entry in target.iterdir():
        if entry.is_file() and entry.name not in written and owned(entry.name):
            entry.unlink()
    shutil.rmtree(build, ignore_errors=True)


# ---- typed dataclasses ------------------------------------------------------------------------------

UNION_TYPES = (typing.Union, types.UnionType)
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              dict: "a mapping", list: "a list", type(None): "null"}


def _arms(kind: Any) -> tuple[Any, ...]:
    return typing.get_args(kind) if typing.get_origin(kind) in UNION_TYPES else (kind,)


def _kind_ok(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the annotated ``kind``: bools are not integers, integers are numbers."""
    if kind is bool or kind is type(None):
        return value is None if kind is type(None) else isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, typing.get_origin(kind) or kind)


def dataclass_from_dict(cls: type, data: Any, where: str, not_object: str) -> Any:
    """``cls(**data)`` for a JSON object whose keys are all fields of ``cls``; otherwise a one-line
    error: ``not_object`` when ``data`` is not a dict, ``"{where}: unknown key ..."`` for a stray key."""
    if not isinstance(data, dict):
        raise CpmliveError(not_object)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise CpmliveError(f"{where}: unknown key {unknown[0]!r}")
    return cls(**data)


def check_field_types(instance: Any, where: str = "config") -> None:
    """Refuse a dataclass field whose value is not of its annotated type, naming the field:
    ``max_steps=abc`` in a recipe or ``max_new_tokens="5"`` from JSON is one clear line, not a
    traceback deep inside the run. Fields of other types (callables, tensors) are not checked."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        arms = _arms(hints.get(field.name, Any))
        if not all((typing.get_origin(arm) or arm) in KIND_NAMES for arm in arms):
            continue
        value = getattr(instance, field.name)
        if not any(_kind_ok(value, arm) for arm in arms):
            named = " or ".join(KIND_NAMES[typing.get_origin(arm) or arm] for arm in arms)
            raise CpmliveError(f"{where}: {field.name} must be {named}, got {value!r}")
