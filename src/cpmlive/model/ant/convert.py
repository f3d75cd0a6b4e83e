"""Reading and writing CPM-Ant checkpoints in any of the three layouts (spec section 2).

* ``ours``: a directory written by :func:`cpmlive.model.checkpoint.save_checkpoint`
  (``config.json`` with ``model_type`` ``"cpm-ant"``, ``model.safetensors`` or shards).
* ``hf``: a directory that ``transformers.CpmAntForCausalLM.from_pretrained`` reads
  (``config.json`` with ``model_type`` ``"cpmant"``; safetensors or ``pytorch_model.bin``).
* ``openbmb``: a flat, unit-scaled state dict with OpenBMB key names, in a ``.pt``/``.bin``
  file (``torch.save``) or a ``.safetensors`` file; its config is a json given by the user,
  ``<name>.json`` or ``config.json`` beside it, or else read back from the tensor shapes.

Everything is converted through our layout; every write is atomic.
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
from typing import Callable, Literal

import torch
from torch import Tensor

from cpmlive.model.ant.config import AntConfig
from cpmlive.config import QuantConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import CpmAnt
from cpmlive.model.runtime.quant import dequantize_state
from cpmlive.model.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    check_layer_count,
    check_state_dict,
    expected_shapes,
    install_checkpoint,
    model_from_state_dict,
    new_build_directory,
    read_safetensors,
    read_weights,
    save_checkpoint,
    save_safetensors,
    write_vocab,
    write_weights,
)
from cpmlive.model.ant.keys import config_from_openbmb_state, hf_to_ours, ours_to_hf
from cpmlive.model.openbmb import openbmb_to_ours, ours_to_openbmb
from cpmlive.resources import model_path
from cpmlive.utils import atomic_write_text, check_output, default_mode, parse_dtype

Format = Literal["ours", "hf", "openbmb"]
FORMATS: tuple[str, ...] = ("ours", "hf", "openbmb")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_BIN_NAME = "pytorch_model.bin"
HF_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Where the special tokens sit in every published CPM-Ant vocabulary (used without a vocab file).
STANDARD_SPECIAL_IDS = {"<pad>": 0, "<s>": 6, "</s>": 7}
# What ``cpmlive generate`` and ``LM.generate`` do by default, written for HF's ``generate``.
DEFAULT_NEW_TOKENS = 64

@dataclass
class Source:
    """Where a checkpoint's pieces are: its weight files, config and vocabulary."""

    path: Path
    format: Format
    directory: Path
    weights: list[Path]
    config: Path | None

    @property
    def files(self) -> list[Path]:
        """The files that make up the checkpoint (weights, config, vocab, index...)."""
        if self.format != "openbmb":
            return sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        extra = [self.config, self.directory / VOCAB_NAME]
        return [*self.weights, *(p for p in extra if p is not None and p.is_file())]


# ---- telling the formats apart ---------------------------------------------------------------


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpmliveError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CpmliveError(f"{path}: expected a JSON object")
    return data


def _safetensors_keys(directory: Path) -> set[str]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = _json_object(index).get("weight_map")
        return set(weight_map) if isinstance(weight_map, dict) else set()
    if (directory / WEIGHTS_NAME).is_file():
        return set(read_safetensors(directory / WEIGHTS_NAME))
    return set()


def _format_of_keys(keys: set[str]) -> Format | None:
    if "prompt_embedding.weight" in keys and "encoder.output_layernorm.weight" in keys:
        return "openbmb"
    if "output_norm.weight" in keys:
        return "ours"
    if any(k.startswith("cpmant.") for k in keys):
        return "hf"
    return None


def _torch_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)


def _directory_format(directory: Path) -> Format:
    config_file = directory / CONFIG_NAME
    model_type = _json_object(config_file).get("model_type") if config_file.is_file() else None
    if model_type == "cpmant":
        return "hf"
    if model_type == "cpm-ant":
        return "ours"
    if model_type is not None:
        raise CpmliveError(f"{config_file}: model_type {model_type!r} is not a CPM-Ant checkpoint")
    found = _format_of_keys(_safetensors_keys(directory))
    if found == "ours" or found == "openbmb":
        return found
    if found is None and len(_torch_files(directory)) == 1:
        return "openbmb"
    raise CpmliveError(f"{directory}: unknown checkpoint format (no CPM-Ant config.json or weights found)")


def detect_format(path: str | os.PathLike) -> Format:
    """``"ours"``, ``"hf"`` or ``"openbmb"`` for a checkpoint directory or weights file."""
    path = Path(path)
    if not path.exists():
        raise CpmliveError(f"{path}: no such file or directory")
    if path.is_dir():
        return _directory_format(path)
    if path.suffix in TORCH_SUFFIXES:
        return "openbmb"
    if path.suffix == ".safetensors":
        if _format_of_keys(set(read_safetensors(path))) == "openbmb":
            return "openbmb"
        raise CpmliveError(f"{path}: not an OpenBMB CPM-Ant state dict (give the checkpoint's directory)")
    raise CpmliveError(f"{path}: unknown checkpoint format (expected a directory, .pt, .bin or .safetensors)")


def _openbmb_file(directory: Path) -> Path:
    if (directory / WEIGHTS_NAME).is_file():
        return directory / WEIGHTS_NAME
    candidates = _torch_files(directory)
    if len(candidates) != 1:
        raise CpmliveError(f"{directory}: expected one .pt/.bin weights file, found {len(candidates)}")
    return candidates[0]


def openbmb_config_file(weights: Path) -> Path | None:
    for candidate in (weights.with_suffix(".json"), weights.parent / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def _hf_weight_files(directory: Path) -> list[Path]:
    for index_name in (INDEX_NAME, HF_BIN_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            weight_map = _json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CpmliveError(f"{index}: corrupt shard index (no weight_map)")
            return [directory / name for name in sorted(set(map(str, weight_map.values())))]
    for name in (WEIGHTS_NAME, HF_BIN_NAME):
        if (directory / name).is_file():
            return [directory / name]
    raise CpmliveError(f"{directory}: no {WEIGHTS_NAME} or {HF_BIN_NAME} in the checkpoint")


def resolve(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> Source:
    """Find the weight files and config of a checkpoint in any format (``"demo"``: the shipped one)."""
    path = model_path(path)
    fmt = detect_format(path)
    given = Path(config_path) if config_path is not None else None
    if fmt == "openbmb":
        weights = path if path.is_file() else _openbmb_file(path)
        return Source(path, fmt, weights.parent, [weights], given or openbmb_config_file(weights))
    if fmt == "hf":
        return Source(path, fmt, path, _hf_weight_files(path), given or path / CONFIG_NAME)
    if not (path / WEIGHTS_NAME).is_file() and not (path / INDEX_NAME).is_file():
        raise CpmliveError(f"{path}: no {WEIGHTS_NAME} in the checkpoint")
    return Source(path, fmt, path, [path / WEIGHTS_NAME], given or path / CONFIG_NAME)


# ---- reading -----------------------------------------------------------------------------------


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
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else read_torch(file))
    return state


def read_raw(source: Source) -> dict[str, Tensor]:
    """The tensors as stored, with the file's own key names (nothing converted)."""
    if source.format == "ours":
        return read_weights(source.directory)
    return read_files(source.weights)


def _meta_state(config: AntConfig, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The shapes ``config`` expects, once its depth is checked against ``state``'s layer keys."""
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


def _config_with_state_mask(config: AntConfig, state: dict[str, Tensor]) -> AntConfig:
    """A config json without ``mask_modules`` (e.g. the 10B one) next to a compressed state."""
    if config.mask_modules is not None:
        return config
    mask = []
    for i in range(config.num_layers):
        prefix = f"encoder.layers.{i}."
        mask.append([not any(k.startswith(prefix + "self_att.") for k in state),
                     not any(k.startswith(prefix + "ffn.") for k in state)])
    if not any(a or f for a, f in mask):
        return config
    return dataclasses.replace(config, mask_modules=mask)


def _openbmb_config(source: Source, state: dict[str, Tensor]) -> AntConfig:
    if source.config is None:
        return config_from_openbmb_state(state)
    return _config_with_state_mask(AntConfig.load(source.config), state)


def _load_openbmb(source: Source, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], AntConfig]:
    config = _openbmb_config(source, state)
    where = str(source.weights[0])
    check_layout(state, ours_to_openbmb(_meta_state(config, state, where), config), where)
    return openbmb_to_ours(state, config), config


def _hf_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare ``CpmAntModel`` state dict has no ``cpmant.`` prefix; a v4 head covers the prompts."""
    return {k if k.startswith("cpmant.") or k == "lm_head.weight" else f"cpmant.{k}": v for k, v in state.items()}


def _load_hf(source: Source, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], AntConfig]:
    config = AntConfig.load(source.config)
    state = _hf_names(state)
    head = state.get("lm_head.weight")
    if head is not None and head.size(0) > config.vocab_size:
        state["lm_head.weight"] = head[: config.vocab_size]
    where = str(source.directory)
    check_layout(state, ours_to_hf(_meta_state(config, state, where), config), where,
                 optional=("lm_head.weight",))
    try:
        return hf_to_ours(state, config)
    except CpmliveError as exc:
        raise CpmliveError(f"{source.directory}: {exc}") from None


def _load_ours(source: Source, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], AntConfig]:
    config = AntConfig.load(source.config)
    check_layout(state, _meta_state(config, state, str(source.directory)), str(source.directory))
    return state, config


LOADERS: dict[str, Callable[[Source, dict[str, Tensor]], tuple[dict[str, Tensor], AntConfig]]] = {
    "ours": _load_ours, "hf": _load_hf, "openbmb": _load_openbmb,
}


def _load(source: Source) -> tuple[dict[str, Tensor], AntConfig]:
    state, config = LOADERS[source.format](source, read_raw(source))
    check_state_dict(state, config, str(source.path))
    return state, config


def load_any(path: str | os.PathLike,
             config_path: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], AntConfig]:
    """A checkpoint in any format as ``(state dict in our layout, config)``."""
    return _load(resolve(path, config_path))


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", keep_matrices: bool = False) -> tuple[CpmAnt, Path]:
    """A model from a checkpoint in any format (``"demo"`` too), and the directory that holds
    its vocabulary: HF and OpenBMB checkpoints load as they are, no conversion first.
    ``keep_matrices``: see :func:`~cpmlive.model.checkpoint.model_from_state_dict`."""
    source = resolve(path)
    state, config = _load(source)
    model = model_from_state_dict(config, state, dtype, device, source=str(source.path), keep_matrices=keep_matrices)
    return model, source.directory


# ---- writing -------------------------------------------------------------------------------------


def _weights_dtype(state: dict[str, Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_ours(state: dict[str, Tensor], config: AntConfig, dst: Path, vocab: Path | None) -> None:
    save_checkpoint(state, config, dst, vocab=vocab)


def special_ids(vocab: Path | None) -> dict[str, int]:
    """The ids of ``<pad>``, ``<s>`` and ``</s>`` in ``vocab`` (one token a line), those it has."""
    if vocab is None:
        return dict(STANDARD_SPECIAL_IDS)
    ids = {line.rstrip("\n"): i for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines(True))}
    return {token: ids[token] for token in STANDARD_SPECIAL_IDS if token in ids}


def hf_generation_config(config: AntConfig, vocab: Path | None) -> dict:
    """HF ``generate``'s defaults made ours: greedy, stop at ``</s>``, 64 new tokens at most."""
    ids = special_ids(vocab)
    names = {"<s>": "bos_token_id", "</s>": "eos_token_id", "<pad>": "pad_token_id"}
    return {**{names[token]: i for token, i in ids.items()},
            "max_new_tokens": min(DEFAULT_NEW_TOKENS, config.max_length - config.prompt_length - 1),
            "do_sample": False, "num_beams": 1}


def _write_hf(state: dict[str, Tensor], config: AntConfig, dst: Path, vocab: Path | None) -> None:
    hf_config = {**config.to_hf(), "dtype": dtype_name(_weights_dtype(state))}
    build = new_build_directory(dst)
    try:
        atomic_write_text(build / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")
        generation = hf_generation_config(config, vocab)
        atomic_write_text(build / GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
        write_weights(ours_to_hf(state, config), build)
        if vocab is not None:
            write_vocab(vocab, build / VOCAB_NAME)
            tokenizer = {"tokenizer_class": "CpmAntTokenizer", "model_max_length": config.max_length}
            atomic_write_text(build / "tokenizer_config.json", json.dumps(tokenizer, indent=2) + "\n")
        install_checkpoint(build, dst)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def openbmb_config_dict(config: AntConfig) -> dict:
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


def _write_openbmb(state: dict[str, Tensor], config: AntConfig, dst: Path, vocab: Path | None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.contiguous() for k, v in ours_to_openbmb(state, config).items()}
    _atomic_state_save(flat, dst)
    atomic_write_text(dst.with_suffix(".json"), json.dumps(openbmb_config_dict(config), indent=2) + "\n")
    if vocab is not None and dst.parent / VOCAB_NAME in openbmb_files(dst, vocab):
        atomic_write_text(dst.parent / VOCAB_NAME, vocab.read_text(encoding="utf-8"))


def check_destination(dst: Path, to: Format, vocab: Path | None, force: bool) -> None:
    """Refuse to replace anything at ``dst`` the user did not ask to replace (``force``)."""
    if to != "openbmb":
        if dst.is_file():
            raise CpmliveError(f"{dst}: is a file; the {to} format is a directory")
        check_output(dst, force)
        return
    if dst.is_dir():
        raise CpmliveError(f"{dst}: the OpenBMB format is a single .pt file; {dst} is a directory")
    if dst.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CpmliveError(f"{dst}: an OpenBMB file is named .pt, .bin or .safetensors")
    for path in openbmb_files(dst, vocab):
        same_vocab = path.name == VOCAB_NAME and path.is_file() and vocab is not None \
            and path.read_bytes() == vocab.read_bytes()
        if not same_vocab:
            check_output(path, force)


WRITERS: dict[str, Callable[[dict[str, Tensor], AntConfig, Path, Path | None], None]] = {
    "ours": _write_ours, "hf": _write_hf, "openbmb": _write_openbmb,
}


def find_vocab(source: Source, vocab_path: str | os.PathLike | None = None) -> Path | None:
    """``vocab_path`` if given, else ``vocab.txt`` next to the weights; ``None`` if there is none."""
    if vocab_path is not None:
        path = Path(vocab_path)
        if not path.is_file():
            raise CpmliveError(f"{path}: vocabulary file not found")
        return path
    candidate = source.directory / VOCAB_NAME
    return candidate if candidate.is_file() else None


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: Format = "ours",
            config_path: str | os.PathLike | None = None, vocab_path: str | os.PathLike | None = None,
            dtype: torch.dtype | str | None = None, force: bool = False, dequantize: bool = False) -> Path:
    """Read ``src`` in any format and write it to ``dst`` in format ``to``; returns ``dst``.

    A quantized checkpoint is written with float weights (the codes times their scales) when
    ``dequantize`` or when ``to`` is HF's or OpenBMB's layout, which have no quantized form.

    ``dtype`` casts the floating-point weights (the config's ``half`` follows the weights).
    A ``dst`` that already holds something is refused unless ``force``; then only the files
    the conversion writes are replaced (other files in a destination directory are kept).
    """
    if to not in WRITERS:
        raise CpmliveError(f"unknown target format {to!r} (known: {', '.join(FORMATS)})")
    target_dtype = parse_dtype(dtype)
    source = resolve(src, config_path)
    vocab = find_vocab(source, vocab_path)
    dst = Path(dst)
    check_destination(dst, to, vocab, force)
    state, config = _load(source)
    write_converted(state, config, dst, to, vocab, target_dtype, dequantize)
    return dst


def write_converted(state: dict[str, Tensor], config, dst: Path, to: Format, vocab: Path | None,
                    dtype: torch.dtype | None = None, dequantize: bool = False,
                    writers: dict[str, Callable[..., None]] = WRITERS) -> None:
    """Write a state dict in our layout to ``dst`` in format ``to`` (any model family whose
    OpenBMB names are CPM-Ant's): dequantized when asked or when ``to`` has no quantized form,
    cast to ``dtype``, with ``half`` following the weights."""
    if config.quantization is not None and (dequantize or to != "ours"):
        state, config = dequantize_state(state), config.dequantized()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = dataclasses.replace(config, half=_weights_dtype(state) == torch.float16)
    writers[to](state, config, dst, vocab)


# ---- describing ----------------------------------------------------------------------------------


def checkpoint_info(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> dict:
    """What ``cpmlive info`` prints; reads headers and shapes only, no weight data."""
    source = resolve(path, config_path)
    raw = read_raw(source)
    if source.format == "openbmb":
        config = _openbmb_config(source, raw)
    else:
        config = AntConfig.load(source.config)
    check_layer_count(raw, config, str(source.path))
    with torch.device("meta"):
        parameters = CpmAnt(config).num_parameters()
    files = source.files
    quantization = config.quantization
    history = _compression_history(source.directory)
    return {
        "path": str(source.path),
        "format": source.format,
        **({"quantization": quantization_summary(quantization)} if quantization is not None else {}),
        **({"compression": history} if history is not None else {}),
        **({"moe": f"{config.moe.experts} experts per FFN, top-{config.moe.top_k}, {config.moe.router} router"}
           if config.moe is not None else {}),
        "config": config.to_dict(),
        "parameters": parameters,
        "tensors": len(raw),
        "dtypes": sorted({dtype_name(t.dtype) for t in raw.values()}),
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
    }


def _compression_history(directory: Path) -> str | None:
    """``compression.json`` (written by ``cpmlive compress``) as one line: the steps and sizes."""
    path = directory / "compression.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        steps = " -> ".join(f"{s['step']} ({s['parameters'] / 1e6:.2f}M)" for s in record["steps"])
        return f"from {record['source']} ({record['parameters'] / 1e6:.2f}M): {steps}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: unreadable"


def quantization_summary(quantization: QuantConfig) -> str:
    """One line: scheme, method and what it was calibrated on."""
    text = f"{quantization.scheme} ({quantization.method}"
    calibration = quantization.calibration or {}
    if calibration:
        text += f", calibrated on {calibration.get('rows')} x {calibration.get('tokens_per_row')} tokens " \
                f"of {calibration.get('file')}"
    return text + (", int8 embedding/head)" if quantization.embedding else ", float embedding/head)")


__all__ = [
    "FORMATS", "Format", "Source", "check_destination", "check_layout", "checkpoint_info", "convert", "detect_format", "find_vocab",
    "load_any", "openbmb_config_dict", "openbmb_config_file", "read_files", "read_raw", "read_torch", "resolve", "write_converted",
]
