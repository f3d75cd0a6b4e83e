"""Our own matrix-vector products (``csrc/gemv.c``) for decoding steps on CPU.

A decoding step multiplies one row (or a few) by every weight matrix, so it runs at the speed
weights stream from memory; PyTorch's CPU products reach about half of that for one row
(``benchmarks/quant_kernels.py`` and ``benchmarks/decode.py`` measure both). The C file is
compiled with the machine's C compiler on first use, for this CPU (``-march=native``), into a
cache directory keyed by the source, the compiler and the CPU, and loaded with ``ctypes`` (which
releases the GIL during each call). Without a compiler, or with ``CPMLIVE_NATIVE=0``, every
product stays on PyTorch's path: :func:`available` says which.

The functions here take and return ordinary tensors and compute the same values as the plain
PyTorch expressions named in each docstring (in a different summation order).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gemv.c", "decode.c", "pool.c")]
HEADERS = [Path(__file__).with_name("csrc") / "gemv.h"]
# Products of at most this many rows use these loops; more rows go to PyTorch, whose blocked
# matrix products reuse each weight across rows better (benchmarks/quant_kernels.py).
MAX_ROWS = 4
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11"]
FLOAT_WEIGHTS = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_KINDS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.float16: "gemv_f16"}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("CPMLIVE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cpmlive" / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str, flags: list[str] = FLAGS) -> Path | None:
    """The library compiled with ``flags`` (now, unless an identical build is cached), or ``None``."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, version, " ".join(flags), _cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"], capture_output=True)
        if done.returncode != 0:
            return None
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def load(path: Path) -> ctypes.CDLL:
    """A built library with its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in _FLOAT_KINDS.values():
        getattr(lib, name).argtypes = [p, p, p, i64, i64, i64, c_int]
    for name in ("gemv_i8", "gemv_w8a8"):
        getattr(lib, name).argtypes = [p, p, p, p, i64, i64, i64, c_int]
    lib.gemv_i4.argtypes = [p, p, p, p, p, i64, i64, i64, i64, c_int]
    lib.decode_blocks.argtypes = [p, i64, p, p, p, p, p]
    for name in (*_FLOAT_KINDS.values(), "gemv_i8", "gemv_w8a8", "gemv_i4", "decode_blocks"):
        getattr(lib, name).restype = None
    return lib


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CPMLIVE_NATIVE", "1") == "0":
        return None
    cc = compiler()
    try:
        path = build(cc) if cc else None
        return None if path is None else load(path)
    except OSError:  # an unwritable cache, a library the loader refuses: PyTorch's path
        return None


def decoder():
    """``decode_blocks`` of ``csrc/decode.c`` (see :mod:`cpmlive.model.runtime.native_decode`), or ``None``."""
    lib = _library()
    return None if lib is None else lib.decode_blocks


_switched_off = False


@contextmanager
def switched_off() -> Iterator[None]:
    """Every product on PyTorch's path meanwhile (benchmarks compare the two in one process)."""
    global _switched_off
    previous, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = previous


def available() -> bool:
    """Whether the compiled products are in use in this process."""
    return not _switched_off and _library() is not None


def applies(x: Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether a product of ``x`` (floats on the CPU, outside autograd, at most ``max_rows``
    rows) goes here."""
    return (x.dtype in FLOAT_WEIGHTS and x.device.type == "cpu" and not torch.is_grad_enabled()
            and 0 < x.numel() <= max_rows * x.size(-1) and available())


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.size(-1)).float().contiguous()


def _out(x: Tensor, rows: Tensor, features: int) -> tuple[Tensor, tuple[int, ...]]:
    return rows.new_empty(rows.size(0), features), (*x.shape[:-1], features)


def matvec(x: Tensor, weight: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """``F.linear(x.float(), weight.float())`` for a contiguous float32 / bfloat16 / float16 weight
    (float32 out). ``lib``: another build than this process's (tests use a portable one)."""
    rows = _rows(x)
    out, shape = _out(x, rows, weight.size(0))
    getattr(lib or _library(), _FLOAT_KINDS[weight.dtype])(weight.data_ptr(), rows.data_ptr(), out.data_ptr(),
                                                          weight.size(0), weight.size(1), rows.size(0),
                                                          torch.get_num_threads())
    return out.view(shape)


def matvec_int8(x: Tensor, codes: Tensor, scale: Tensor, int8_inputs: bool, lib: ctypes.CDLL | None = None) -> Tensor:
    """``x @ (codes * scale[:, None]).T``; with ``int8_inputs`` each row of ``x`` is first
    quantized to int8 (absmax / 127), as :func:`cpmlive.model.runtime.quant.int8_matmul_per_token` does."""
    rows = _rows(x)
    out, shape = _out(x, rows, codes.size(0))
    lib = lib or _library()
    product = lib.gemv_w8a8 if int8_inputs else lib.gemv_i8
    product(codes.data_ptr(), scale.data_ptr(), rows.data_ptr(), out.data_ptr(), codes.size(0), codes.size(1),
            rows.size(0), torch.get_num_threads())
    return out.view(shape)


def int4_supported(group_size: int) -> bool:
    return group_size % 16 == 0


def matvec_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                lib: ctypes.CDLL | None = None) -> Tensor:
    """``x @ dequantize_int4(packed, scale, zero, group_size).T`` (group size a multiple of 16)."""
    rows = _rows(x)
    features = 2 * packed.size(1)
    out, shape = _out(x, rows, packed.size(0))
    (lib or _library()).gemv_i4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), rows.data_ptr(), out.data_ptr(),
                       packed.size(0), features, group_size, rows.size(0), torch.get_num_threads())
    return out.view(shape)


__all__ = ["FLOAT_WEIGHTS", "MAX_ROWS", "applies", "available", "build", "decoder", "load", "switched_off",
           "int4_supported", "matvec", "matvec_int4", "matvec_int8"]
