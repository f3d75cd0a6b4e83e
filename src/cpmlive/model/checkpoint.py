"""Checkpoints in our directory format, for every family (spec section 2); each family's
published layouts are in its folder.

Our format is a directory with ``config.json``, ``model.safetensors`` (sharded with
``model.safetensors.index.json`` above ``shard_bytes``) and the family's vocabulary file
(``Family.vocab_name``: ``vocab.txt``, ``spiece.model``). Weights carry the 1/sqrt(fan-in) factors
folded in (as HF does); OpenBMB keeps them unit-scaled.

Loading maps the safetensors files copy-on-write and builds the model on the meta device, so a
checkpoint loads in about its own size of memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save, save_file
from torch import Tensor

from cpmlive.config import StackConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.runtime.quant import install_quantized_layers
from cpmlive.resources import VOCAB_NAME
from cpmlive.utils import default_mode, install_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# The files a checkpoint directory is made of, in our layout and HF's, besides the families'
# vocabulary files (:func:`vocab_names`): a write into an existing directory replaces these (an
# older write's other shards included) and keeps every other file.
CHECKPOINT_FILE = re.compile(r"config\.json|tokenizer_config\.json|generation_config\.json"
                             r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                             r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json")


def vocab_names() -> tuple[str, ...]:
    """The vocabulary files a checkpoint directory may hold: every registered family's
    ``vocab_name`` (``vocab.txt``, CPM-1's ``spiece.model``), in the registry's order."""
    from cpmlive.model.registry import families

    return tuple(dict.fromkeys(kind.vocab_name for kind in families().values()))


def is_checkpoint_file(name: str) -> bool:
    return name in vocab_names() or CHECKPOINT_FILE.fullmatch(name) is not None

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# ---- reading safetensors without copying ----------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors backed by a private (copy-on-write) map of the file: nothing is read up front."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise CpmliveError(f"{path}: not a safetensors file (too short)")
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len > size - 8:
                raise CpmliveError(f"{path}: corrupt safetensors header (length {header_len} > file)")
            header = json.loads(handle.read(header_len))
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else None
    except FileNotFoundError:
        raise CpmliveError(f"{path}: weights file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CpmliveError(f"{path}: corrupt safetensors header") from None
    except OSError as exc:
        raise CpmliveError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise CpmliveError(f"{path}: corrupt safetensors header")
    base = 8 + header_len
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _header_entry(path, name, info)
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or base + end > size:
            raise CpmliveError(f"{path}: tensor {name!r} is truncated or corrupt")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin)
        tensors[name] = flat.view(shape)
    return tensors


def _header_entry(path: Path, name: str, info: object) -> tuple[torch.dtype, list[int], int, int]:
    """Validate one header entry: dtype, non-negative integer shape and offsets."""
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
    except (KeyError, TypeError, ValueError):
        raise CpmliveError(f"{path}: corrupt safetensors entry {name!r}") from None
    numbers = [begin, end, *shape]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise CpmliveError(f"{path}: corrupt safetensors entry {name!r}")
    return dtype, shape, begin, end


def read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise CpmliveError(f"{index}: corrupt shard index") from None
        tensors: dict[str, Tensor] = {}
        for name in files:
            tensors.update(read_safetensors(directory / name))
        return tensors
    return read_safetensors(directory / WEIGHTS_NAME)


# ---- our layout <-> model ---------------------------------------------------------------------


def model_class(config: StackConfig) -> type[torch.nn.Module]:
    from cpmlive.model.registry import family

    return family(config.model_type).model


def empty_model(config: StackConfig) -> torch.nn.Module:
    """The model on the meta device, with quantized layers where the config says so."""
    with torch.device("meta"):
        model = model_class(config)(config)
        if config.quantization is not None:
            install_quantized_layers(model, config.quantization)
    return model


def expected_shapes(config: StackConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in empty_model(config).state_dict().items()}


def expected_dtypes(config: StackConfig) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in empty_model(config).state_dict().items()}


LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(names: Iterable[str], config: StackConfig, source: str) -> None:
    """Compare the config's depth with the weights' before building anything of that depth: a
    config that claims 100,000 layers is refused at once, not after minutes of building."""
    names = list(names)
    check_family(names, config, source)
    found = 1 + max((int(m.group(1)) for name in names if (m := LAYER_KEY.search(name))), default=-1)
    empty_tail = all(config.mask_modules is not None and all(config.mask_modules[i])
                     for i in range(found, config.num_layers))
    if config.num_layers < found or not empty_tail:
        raise CpmliveError(f"{source}: the config has {config.num_layers} layers, the weights {found}")




def check_family(names: Iterable[str], config: StackConfig, source: str) -> None:
    """Refuse weights of another family than the config's, naming both."""
    from cpmlive.model.registry import families, family

    names = set(names)
    ours = family(config.model_type)
    for other in families().values():
        if other is not ours and any(key in names for key in other.signature_keys):
            raise CpmliveError(f"{source}: the config says {ours.weights_name or ours.name}, but the weights are "
                               f"a {other.weights_name or other.name} checkpoint's")


def check_state_dict(state: dict[str, Tensor], config: StackConfig, source: str) -> None:
    """Name the first missing, unexpected or mis-shaped key."""
    check_layer_count(state, config, source)
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise CpmliveError(f"{source}: missing weight {name!r} (expected shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise CpmliveError(f"{source}: weight {name!r} has shape {list(state[name].shape)}, "
                               f"config expects {list(shape)}")
    if config.quantization is not None:
        for name, dtype in expected_dtypes(config).items():
            if not dtype.is_floating_point and state[name].dtype != dtype:
                raise CpmliveError(f"{source}: weight {name!r} is {state[name].dtype}, the config's "
                                   f"{config.quantization.scheme} quantization stores {dtype}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CpmliveError(f"{source}: unexpected weight {extra[0]!r} for this config")


def model_from_state_dict(config: StackConfig, state: dict[str, Tensor], dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", source: str = "checkpoint",
                          keep_matrices: bool = False) -> torch.nn.Module:
    """Build on the meta device, then adopt the given tensors (no second copy).

    ``keep_matrices``: the weight matrices (every ``Linear`` and the tied embedding) keep the
    dtype they are stored in, still views of the file, and only the small tensors take ``dtype``:
    a float16 checkpoint then computes in float32 from its float16 weights (the products convert
    them exactly), with half the memory and nothing copied (what ``--memory-limit`` streams)."""
    check_state_dict(state, config, source)
    model = empty_model(config)
    kept = matrix_names(model) if keep_matrices else set()
    if dtype is not None or str(device) != "cpu":
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in kept else None)
                 for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def matrix_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the weight matrices: every float ``Linear``'s and the embedding's."""
    names = {f"{name}.weight" for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    return names | {"input_embedding.weight"}


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a checkpoint directory in our format."""
    directory = Path(path)
    if not directory.exists():
        raise CpmliveError(f"{directory}: no such checkpoint")
    if not directory.is_dir():
        raise CpmliveError(f"{directory}: a checkpoint is a directory (use `cpmlive convert` for other formats)")
    from cpmlive.model.registry import family_of

    config = family_of(directory).config.load(directory / CONFIG_NAME)
    if not (directory / WEIGHTS_NAME).is_file() and not (directory / INDEX_NAME).is_file():
        raise CpmliveError(f"{directory}: no {WEIGHTS_NAME} in the checkpoint")
    return model_from_state_dict(config, read_weights(directory), dtype, device, source=str(directory))


def _shards(state: dict[str, Tensor], shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file`` with the permissions a plain ``open`` gives (it makes
    private 0600 files, which other users of a shared checkpoint folder could not read)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, default_mode())


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with a header that is the same for the same input: the writer
    keeps ``__metadata__`` in a hash map, so with several keys their order (and so the file's
    bytes) changed from one run to the next. The keys are sorted here, the tensors kept in the
    order of their data."""
    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    found = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(found.items()))} if found else {}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def write_weights(state: dict[str, Tensor], directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shards(state, shard_bytes)
    if len(shards) == 1:
        save_safetensors(shards[0], directory / WEIGHTS_NAME)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, directory / name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")


def replace_directory(build: Path, target: Path) -> None:
    """Swap a fully written directory into place: readers never see a half-written one. Only for
    directories the writer owns whole (a run's checkpoints); user-named ones go through
    :func:`install_checkpoint`."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(build, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build, target)


def new_build_directory(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(build, default_mode(directory=True))
    return build


def install_checkpoint(build: Path, target: Path) -> None:
    """Put a fully written checkpoint at ``target``; other files already there are kept."""
    install_directory(build, target, owned=is_checkpoint_file)


def save_checkpoint(model_or_state: torch.nn.Module | dict[str, Tensor], config: StackConfig, path: str | os.PathLike,
                    vocab: str | os.PathLike | Iterable[str] | None = None, dtype: torch.dtype | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``config.json``, the weights and the vocabulary (:func:`vocab_file_name`) atomically
    (temp dir + rename). Into an existing directory, as HF's ``save_pretrained``: the checkpoint's
    files are replaced (stale shards removed), anything else there is kept."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    target = Path(path)
    build = new_build_directory(target)
    try:
        config.save(build / CONFIG_NAME)
        write_weights(state, build, shard_bytes)
        if vocab is not None:
            write_vocab(vocab, build / vocab_file_name(vocab))
        install_checkpoint(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target


def vocab_file_name(vocab: str | os.PathLike | Iterable[str]) -> str:
    """The name a vocabulary takes in a checkpoint: the family ``vocab_name`` of the same suffix
    (``spiece.model`` for a SentencePiece model), else ``vocab.txt`` (a token list too)."""
    if not isinstance(vocab, (str, os.PathLike)):
        return VOCAB_NAME
    suffix = Path(vocab).suffix
    return next((name for name in vocab_names() if Path(name).suffix == suffix), VOCAB_NAME)


def checkpoint_vocab(directory: Path) -> Path | None:
    """A checkpoint directory's vocabulary file (the first of :func:`vocab_names` it holds), if any."""
    return next((directory / name for name in vocab_names() if (directory / name).is_file()), None)


# Files an HF tokenizer's vocabulary (``tokenizer.json``) needs beside it: its special tokens,
# chat template and generation defaults go wherever the vocabulary goes.
VOCAB_COMPANIONS = {"tokenizer.json": ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                                      "chat_template.jinja")}


def write_vocab(vocab: str | os.PathLike | Iterable[str], path: Path) -> None:
    """Copy a vocabulary file (and its companions, :data:`VOCAB_COMPANIONS`) to ``path``, or write a token list."""
    if isinstance(vocab, (str, os.PathLike)):
        try:
            shutil.copyfile(vocab, path)
            for name in VOCAB_COMPANIONS.get(Path(vocab).name, ()):
                if (Path(vocab).parent / name).is_file() and not (path.parent / name).exists():
                    shutil.copyfile(Path(vocab).parent / name, path.parent / name)
        except OSError as exc:
            raise CpmliveError(f"{vocab}: cannot copy the vocabulary ({exc.strerror or exc})") from None
    else:
        path.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")


__all__ = [
    "CONFIG_NAME", "INDEX_NAME", "VOCAB_NAME", "WEIGHTS_NAME", "check_state_dict", "load_model",
    "model_from_state_dict", "read_safetensors", "read_weights", "safetensors_bytes", "save_checkpoint",
]
