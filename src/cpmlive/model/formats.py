"""What every family's checkpoint formats share (spec section 2): where a checkpoint's pieces are
(:class:`Source`), reading weight files, OpenBMB's file layout (CPM-Ant's and CPM-Bee's), the
writes and checks around a conversion, and :class:`CheckpointFormats`, the three entry points a
family's ``convert.py`` fills in with what differs (how it finds, reads and writes its layouts):
``convert``, ``load_pretrained`` and ``checkpoint_info``.

Our own layout (a directory with ``config.json`` and safetensors) is :mod:`cpmlive.model.checkpoint`;
each family's published layouts are in its folder. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from cpmlive.config import read_json_object
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    check_family,
    check_layer_count,
    expected_shapes,
    install_checkpoint,
    model_class,
    model_from_state_dict,
    new_build_directory,
    read_safetensors,
    read_weights,
    save_checkpoint,
    save_safetensors,
    write_vocab,
    write_weights,
)
from cpmlive.model.openbmb import openbmb_to_ours, ours_to_openbmb
from cpmlive.model.runtime.quant import dequantize_state
from cpmlive.utils import atomic_write_text, check_output, default_mode, parse_dtype

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
HF_BIN_NAME = "pytorch_model.bin"
HF_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# The formats that are one file rather than a directory, and the suffixes their files take.
FILE_FORMATS = {"openbmb": (".pt", ".bin", ".safetensors"), "gguf": (".gguf",)}
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# (state dict in our layout, config, destination, vocabulary file or None) -> writes the checkpoint
Writer = Callable[[dict[str, Tensor], Any, Path, "Path | None"], None]


@dataclass
class Source:
    """Where a checkpoint's pieces are: its weight files, config and vocabulary."""

    path: Path
    format: str
    directory: Path
    weights: list[Path]
    config: Path | None

    @property
    def files(self) -> list[Path]:
        """The files that make up the checkpoint: an OpenBMB file's weights, config and vocabulary;
        else the directory's files and any weight file in a folder below it (Megatron's shards)."""
        if self.format == "openbmb":
            extra = [self.config, self.directory / VOCAB_NAME]
            return [*self.weights, *(p for p in extra if p is not None and p.is_file())]
        listed = sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        return listed + [p for p in self.weights if p not in listed and p.is_file()]


# ---- finding a checkpoint's pieces ---------------------------------------------------------------


def json_object_or_none(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` where there is none (for telling layouts apart)."""
    try:
        return read_json_object(path)
    except CpmliveError:
        return None


def torch_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF checkpoint directory: safetensors or ``pytorch_model.bin``, sharded or not."""
    for index_name in (INDEX_NAME, HF_BIN_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json_object(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CpmliveError(f"{index}: corrupt shard index (no weight_map)")
            return [directory / name for name in sorted(set(map(str, weight_map.values())))]
    for name in (WEIGHTS_NAME, HF_BIN_NAME):
        if (directory / name).is_file():
            return [directory / name]
    raise CpmliveError(f"{directory}: no {WEIGHTS_NAME} or {HF_BIN_NAME} in the checkpoint")


def ours_source(path: Path, config_path: str | os.PathLike | None) -> Source:
    """A checkpoint directory in our layout (refused when it holds no weights)."""
    if not (path / WEIGHTS_NAME).is_file() and not (path / INDEX_NAME).is_file():
        raise CpmliveError(f"{path}: no {WEIGHTS_NAME} in the checkpoint")
    return Source(path, "ours", path, [path / WEIGHTS_NAME], Path(config_path or path / CONFIG_NAME))


def hf_source(path: Path, config_path: str | os.PathLike | None) -> Source:
    return Source(path, "hf", path, hf_weight_files(path), Path(config_path or path / CONFIG_NAME))


def hf_family_source(path: Path, config_path: str | os.PathLike | None, model_type: str,
                     architectures: Iterable[str], name: str) -> Source:
    """A checkpoint directory of a family published as HF directories: ours (``model_type`` the
    family's, with our ``architecture`` key) or HF's (a ``model_type`` of ``architectures``)."""
    if not path.is_dir():
        raise CpmliveError(f"{path}: a {name} checkpoint is a directory (ours or HF's)")
    config = json_object_or_none(path / CONFIG_NAME) or {}
    kind = config.get("model_type")
    if kind == model_type and "architecture" in config:
        return ours_source(path, config_path)
    if kind in architectures:
        return hf_source(path, config_path)
    raise CpmliveError(f"{path}: model_type {kind!r} is not a {name} checkpoint's "
                       f"(supported: {', '.join(architectures)})")


def is_hf_family_directory(path: str | os.PathLike, architectures: Iterable[str]) -> bool:
    """A directory whose ``config.json`` names one of a family's HF ``model_type`` values."""
    path = Path(path)
    config = json_object_or_none(path / CONFIG_NAME) if path.is_dir() else None
    return config is not None and config.get("model_type") in architectures


def check_hf_tokenizer(vocab: Path, config: Any, source: str) -> None:
    """A ``tokenizer.json`` with no more tokens than the embedding has rows (a family published as
    HF directories: its ``CheckpointFormats.check_vocab``)."""
    from cpmlive.tokenizer.hf import HFTokenizer

    HFTokenizer.for_model(vocab, config.vocab_size)


def openbmb_config_file(weights: Path) -> Path | None:
    """An OpenBMB state file's config: ``<name>.json`` or ``config.json`` beside it."""
    for candidate in (weights.with_suffix(".json"), weights.parent / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def find_vocab(source: Source, vocab_path: str | os.PathLike | None = None,
               names: tuple[str, ...] = (VOCAB_NAME,)) -> Path | None:
    """``vocab_path`` if given, else the first of ``names`` next to the weights; ``None`` if there is none."""
    if vocab_path is not None:
        path = Path(vocab_path)
        if not path.is_file():
            raise CpmliveError(f"{path}: vocabulary file not found")
        return path
    return next((source.directory / name for name in names if (source.directory / name).is_file()), None)


# ---- reading -------------------------------------------------------------------------------------


def read_torch(path: Path) -> dict[str, Tensor]:
    """A ``torch.save``-d flat state dict, memory-mapped when the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except FileNotFoundError:
        raise CpmliveError(f"{path}: weights file not found") from None
    except Exception as exc:  # torch.load raises many types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CpmliveError(f"{path}: unreadable or corrupt torch checkpoint ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CpmliveError(f"{path}: not a flat state dict of tensors")
    return state


def read_files(files: list[Path]) -> dict[str, Tensor]:
    """The tensors of safetensors and ``torch.save`` files, mapped, not read."""
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else read_torch(file))
    return state


def read_raw(source: Source) -> dict[str, Tensor]:
    """The tensors as stored, with the file's own key names (nothing converted)."""
    if source.format == "ours":
        return read_weights(source.directory)
    return read_files(source.weights)


def read_layout(source: Source, config: Any, to_ours: Callable[[dict[str, Tensor], Any, str], dict[str, Tensor]],
                shapes: bool = False) -> dict[str, Tensor]:
    """The tensors of a checkpoint in ours or a published layout (``to_ours`` renames the
    latter), in our layout, refused when they are another family's; ``shapes``: meta tensors
    from the files' headers, no weight read. The caller checks the keys and shapes."""
    raw = shapes_only(read_raw(source)) if shapes else read_raw(source)
    check_family(raw, config, str(source.path))
    return raw if source.format == "ours" else to_ours(raw, config, str(source.path))


def shapes_only(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same names, shapes and dtypes on the meta device: converting these reads no weights."""
    return {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for name, tensor in state.items()}


def expected_state(config: Any, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The tensors ``config`` expects in our layout (meta), once its depth is checked against ``state``'s."""
    check_layer_count(state, config, source)
    return {name: torch.empty(shape, device="meta") for name, shape in expected_shapes(config).items()}


def check_layout(state: dict[str, Tensor], expected: dict[str, Tensor], source: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Name the first unknown, mis-shaped or missing key, in the file's own key names."""
    for name, tensor in state.items():
        if name not in expected:
            raise CpmliveError(f"{source}: unknown key {name!r}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CpmliveError(f"{source}: {name!r} has shape {list(tensor.shape)}, "
                               f"config expects {list(expected[name].shape)}")
    missing = [name for name in expected if name not in state and name not in optional]
    if missing:
        raise CpmliveError(f"{source}: missing key {missing[0]!r} (shape {list(expected[missing[0]].shape)})")


def from_openbmb(state: dict[str, Tensor], config: Any, source: str) -> dict[str, Tensor]:
    """An OpenBMB state dict in our layout, every key and shape checked in OpenBMB's names first."""
    check_layout(state, ours_to_openbmb(expected_state(config, state, source), config), source)
    return openbmb_to_ours(state, config)


# ---- writing -------------------------------------------------------------------------------------


def weights_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The floating-point dtype most of the weights' elements have."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_ours(state: dict[str, Tensor], config: Any, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def hf_config(config: Any, state: dict[str, Tensor]) -> dict:
    """The family's HF ``config.json`` with the dtype its weights are stored in."""
    return {**config.to_hf(), "dtype": dtype_name(weights_dtype(state))}


def write_hf_directory(dst: Path, config: dict, weights: dict[str, Tensor], files: dict[str, dict | Path]) -> None:
    """An HF checkpoint directory: ``config.json``, the weights (in HF's names) and ``files``, each
    a JSON object to write or a file to copy (the vocabulary), under its name."""
    build = new_build_directory(dst)
    try:
        atomic_write_text(build / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        for name, content in files.items():
            if isinstance(content, dict):
                atomic_write_text(build / name, json.dumps(content, indent=2) + "\n")
            else:
                write_vocab(content, build / name)
        write_weights(weights, build)
        install_checkpoint(build, dst)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def openbmb_config_dict(config: Any) -> dict:
    """The config with OpenBMB's keys (``mask_modules`` only for compressed models) and
    ``max_length``, which OpenBMB's loader ignores as an extra key and ours reads back."""
    data = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    if data["mask_modules"] is None:
        del data["mask_modules"]
    return data


def _atomic_state_save(state: dict[str, Tensor], path: Path) -> None:
    """``torch.save`` (or safetensors for a ``.safetensors`` name) to a temp file, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            save_safetensors(state, tmp)
        else:
            torch.save(state, tmp)
            os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def openbmb_files(dst: Path, vocab: Path | None) -> list[Path]:
    """What the OpenBMB writer puts down: the state file, its ``.json`` config, the vocabulary."""
    files = [dst, dst.with_suffix(".json")]
    if vocab is not None and vocab.resolve() != (dst.parent / VOCAB_NAME).resolve():
        files.append(dst.parent / VOCAB_NAME)
    return files


def write_openbmb(state: dict[str, Tensor], config: Any, dst: Path, vocab: Path | None) -> None:
    """A flat, unit-scaled state file in OpenBMB's names, its ``.json`` config and ``vocab.txt`` beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.contiguous() for k, v in ours_to_openbmb(state, config).items()}
    _atomic_state_save(flat, dst)
    atomic_write_text(dst.with_suffix(".json"), json.dumps(openbmb_config_dict(config), indent=2) + "\n")
    if vocab is not None and dst.parent / VOCAB_NAME in openbmb_files(dst, vocab):
        atomic_write_text(dst.parent / VOCAB_NAME, vocab.read_text(encoding="utf-8"))


def check_destination(dst: Path, to: str, vocab: Path | None, force: bool) -> None:
    """Refuse to replace anything at ``dst`` the user did not ask to replace (``force``)."""
    if to == "gguf":
        if dst.is_dir() or dst.suffix not in FILE_FORMATS[to]:
            raise CpmliveError(f"{dst}: a GGUF checkpoint is a single file named .gguf")
        check_output(dst, force)
        return
    if to != "openbmb":
        if dst.is_file():
            raise CpmliveError(f"{dst}: is a file; the {to} format is a directory")
        check_output(dst, force)
        return
    if dst.is_dir():
        raise CpmliveError(f"{dst}: the OpenBMB format is a single .pt file; {dst} is a directory")
    if dst.suffix not in WEIGHT_SUFFIXES:
        raise CpmliveError(f"{dst}: an OpenBMB file is named .pt, .bin or .safetensors")
    for path in openbmb_files(dst, vocab):
        same_vocab = path.name == VOCAB_NAME and path.is_file() and vocab is not None \
            and path.read_bytes() == vocab.read_bytes()
        if not same_vocab:
            check_output(path, force)


def write_converted(state: dict[str, Tensor], config: Any, dst: Path, to: str, vocab: Path | None,
                    dtype: torch.dtype | None, dequantize: bool, writers: dict[str, Writer]) -> None:
    """Write a state dict in our layout to ``dst`` in format ``to``: dequantized when asked or
    when ``to`` has no quantized form, cast to ``dtype``, with ``half`` following the weights."""
    if config.quantization is not None and (dequantize or to != "ours"):
        state, config = dequantize_state(state), config.dequantized()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = dataclasses.replace(config, half=weights_dtype(state) == torch.float16)
    writers[to](state, config, dst, vocab)


# ---- a family's entry points ---------------------------------------------------------------------


def quantization_scheme(source: Source, config: Any) -> dict:
    """What ``cpmlive info`` says beside the format unless the family says more: its model_type
    and quantization scheme."""
    return {"model_type": config.model_type,
            **({"quantization": config.quantization.scheme} if config.quantization is not None else {})}


@dataclass(frozen=True)
class CheckpointFormats:
    """A family's checkpoint layouts: how it finds a checkpoint in any of them (``resolve``), reads
    it into our layout with every key checked (``read``) or only its tensors' names, shapes and
    dtypes (``headers``, for ``cpmlive info``: no weight data), and writes each target format."""

    resolve: Callable[[str | os.PathLike, str | os.PathLike | None], Source]
    read: Callable[[Source], tuple[dict[str, Tensor], Any]]
    headers: Callable[[Source], tuple[dict[str, Tensor], Any]]
    writers: dict[str, Writer]
    refusal: str  # the error for an unknown target format, with ``{to!r}``
    vocab_names: tuple[str, ...] = (VOCAB_NAME,)  # the vocabulary files a checkpoint may hold, first found wins
    check_vocab: Callable[[Path, Any, str], None] | None = None  # (vocab, config, where): refuse one that does not fit
    details: Callable[[Source, Any], dict] = quantization_scheme  # info's lines after the format

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.writers)

    def convert(self, src: str | os.PathLike, dst: str | os.PathLike, to: str = "ours",
                config_path: str | os.PathLike | None = None, vocab_path: str | os.PathLike | None = None,
                dtype: torch.dtype | str | None = None, force: bool = False, dequantize: bool = False) -> Path:
        """Read ``src`` in any of the family's layouts and write it to ``dst`` in format ``to``; returns ``dst``.

        A quantized checkpoint is written with float weights (the codes times their scales) when
        ``dequantize`` or when ``to`` is a published layout, which have no quantized form.

        ``dtype`` casts the floating-point weights (the config's ``half`` follows the weights).
        A ``dst`` that already holds something is refused unless ``force``; then only the files
        the conversion writes are replaced (other files in a destination directory are kept).
        """
        if to not in self.writers:
            raise CpmliveError(self.refusal.format(to=to))
        target_dtype = parse_dtype(dtype)
        source = self.resolve(src, config_path)
        vocab = find_vocab(source, vocab_path, self.vocab_names)
        dst = Path(dst)
        check_destination(dst, to, vocab, force)
        state, config = self.read(source)
        if vocab is not None and self.check_vocab is not None:
            self.check_vocab(vocab, config, str(vocab))
        write_converted(state, config, dst, to, vocab, target_dtype, dequantize, self.writers)
        return dst

    def load_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", keep_matrices: bool = False) -> tuple[Any, Path]:
        """A model from a checkpoint in any of the family's layouts (``"demo"`` too), and the
        directory that holds its vocabulary: published layouts load as they are, no conversion
        first. ``keep_matrices``: see :func:`~cpmlive.model.checkpoint.model_from_state_dict`."""
        source = self.resolve(path, None)
        state, config = self.read(source)
        model = model_from_state_dict(config, state, dtype, device, source=str(source.path),
                                      keep_matrices=keep_matrices)
        return model, source.directory

    def checkpoint_info(self, path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> dict:
        """What ``cpmlive info`` prints; reads headers and shapes only, no weight data."""
        source = self.resolve(path, config_path)
        tensors, config = self.headers(source)
        check_layer_count(tensors, config, str(source.path))
        with torch.device("meta"):
            parameters = model_class(config)(config).num_parameters()
        files = source.files
        return {
            "path": str(source.path),
            "format": source.format,
            **self.details(source, config),
            "config": config.to_dict(),
            "parameters": parameters,
            "tensors": len(tensors),
            "dtypes": sorted({dtype_name(t.dtype) for t in tensors.values()}),
            "size_bytes": sum(f.stat().st_size for f in files),
            "files": len(files),
        }


__all__ = [
    "CheckpointFormats", "FILE_FORMATS", "GENERATION_CONFIG_NAME", "HF_BIN_NAME", "Source",
    "TOKENIZER_CONFIG_NAME", "TORCH_SUFFIXES", "WEIGHT_SUFFIXES", "check_destination", "check_layout",
    "dtype_name", "expected_state", "find_vocab", "from_openbmb", "check_hf_tokenizer", "hf_config", "hf_family_source",
    "hf_source", "is_hf_family_directory",
    "hf_weight_files",
    "json_object_or_none", "openbmb_config_dict", "openbmb_config_file", "ours_source", "read_files",
    "read_layout", "read_raw", "read_torch", "shapes_only", "torch_files", "weights_dtype", "write_converted",
    "write_hf_directory", "write_openbmb", "write_ours",
]
