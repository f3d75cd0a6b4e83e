"""Checkpoints: our directory format, and the OpenBMB and HF state dicts (spec section 2).

Our format is a directory with ``config.json``, ``model.safetensors`` (sharded with
``model.safetensors.index.json`` above ``shard_bytes``) and ``vocab.txt``. Weights carry the
1/sqrt(fan-in) factors folded in (as HF does); OpenBMB keeps them unit-scaled.

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

from cpmlive.config import AntConfig, BeeConfig, Cpm1Config
from cpmlive.errors import CpmliveError
from cpmlive.model.ant import CpmAnt
from cpmlive.model.bee import CpmBee
from cpmlive.model.cpm1 import Cpm1
from cpmlive.model.quant import install_quantized_layers
from cpmlive.utils import default_mode, install_directory

CONFIG_NAME = "config.json"
SPIECE_NAME = "spiece.model"  # CPM-1's vocabulary (a SentencePiece model), where CPM-Ant/Bee have vocab.txt
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
VOCAB_NAME = "vocab.txt"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# The files a checkpoint directory is made of, in our layout and HF's: a write into an existing
# directory replaces these (an older write's other shards included) and keeps every other file.
CHECKPOINT_FILE = re.compile(r"config\.json|vocab\.txt|spiece\.model|tokenizer_config\.json|generation_config\.json"
                             r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                             r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json")


def is_checkpoint_file(name: str) -> bool:
    return CHECKPOINT_FILE.fullmatch(name) is not None

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


MODEL_CLASSES = {"cpm-ant": CpmAnt, "cpm-bee": CpmBee, "cpm1": Cpm1}


def model_class(config: AntConfig | BeeConfig | Cpm1Config) -> type[CpmAnt] | type[CpmBee] | type[Cpm1]:
    return MODEL_CLASSES[config.model_type]


def empty_model(config: AntConfig | BeeConfig) -> CpmAnt | CpmBee:
    """The model on the meta device, with quantized layers where the config says so."""
    with torch.device("meta"):
        model = model_class(config)(config)
        if config.quantization is not None:
            install_quantized_layers(model, config.quantization)
    return model


def expected_shapes(config: AntConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in empty_model(config).state_dict().items()}


def expected_dtypes(config: AntConfig) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in empty_model(config).state_dict().items()}


LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(names: Iterable[str], config: AntConfig, source: str) -> None:
    """Compare the config's depth with the weights' before building anything of that depth: a
    config that claims 100,000 layers is refused at once, not after minutes of building."""
    names = list(names)
    check_family(names, config, source)
    found = 1 + max((int(m.group(1)) for name in names if (m := LAYER_KEY.search(name))), default=-1)
    empty_tail = all(config.mask_modules is not None and all(config.mask_modules[i])
                     for i in range(found, config.num_layers))
    if config.num_layers < found or not empty_tail:
        raise CpmliveError(f"{source}: the config has {config.num_layers} layers, the weights {found}")


# Keys only one family's weights have (ours and the published layouts), to name the family of
# weights given under another family's config.
FAMILY_KEYS = {
    "cpm1": ("position_embedding.weight", "transformer.wte.weight", "word_embeddings.weight"),
    "cpm-ant": ("segment_embedding.weight", "cpmant.segment_embedding.weight"),
}
FAMILY_NAMES = {"cpm1": "CPM-1 (GPT-2)", "cpm-ant": "CPM-Ant", "cpm-bee": "CPM-Bee"}


def check_family(names: Iterable[str], config: AntConfig, source: str) -> None:
    """Refuse weights of another family than the config's, naming both."""
    names = set(names)
    for model_type, keys in FAMILY_KEYS.items():
        if model_type != config.model_type and any(key in names for key in keys):
            raise CpmliveError(f"{source}: the config says {FAMILY_NAMES[config.model_type]}, but the weights are "
                               f"a {FAMILY_NAMES[model_type]} checkpoint's")


def check_state_dict(state: dict[str, Tensor], config: AntConfig, source: str) -> None:
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


def model_from_state_dict(config: AntConfig, state: dict[str, Tensor], dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", source: str = "checkpoint",
                          keep_matrices: bool = False) -> CpmAnt:
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


def matrix_names(model: CpmAnt) -> set[str]:
    """State-dict names of the weight matrices: every float ``Linear``'s and the embedding's."""
    names = {f"{name}.weight" for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    return names | {"input_embedding.weight"}


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> CpmAnt:
    """Load a checkpoint directory in our format."""
    directory = Path(path)
    if not directory.exists():
        raise CpmliveError(f"{directory}: no such checkpoint")
    if not directory.is_dir():
        raise CpmliveError(f"{directory}: a checkpoint is a directory (use `cpmlive convert` for other formats)")
    config = AntConfig.load(directory / CONFIG_NAME)
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


def save_checkpoint(model_or_state: CpmAnt | dict[str, Tensor], config: AntConfig, path: str | os.PathLike,
                    vocab: str | os.PathLike | Iterable[str] | None = None, dtype: torch.dtype | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``config.json``, the weights and ``vocab.txt`` atomically (temp dir + rename). Into an
    existing directory, as HF's ``save_pretrained``: the checkpoint's files are replaced (stale
    shards removed), anything else there is kept."""
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
    """The name a vocabulary takes in a checkpoint: ``spiece.model`` for a SentencePiece model."""
    return SPIECE_NAME if isinstance(vocab, (str, os.PathLike)) and Path(vocab).suffix == ".model" else VOCAB_NAME


def checkpoint_vocab(directory: Path) -> Path | None:
    """A checkpoint directory's vocabulary file (``vocab.txt`` or ``spiece.model``), if any."""
    return next((directory / name for name in (VOCAB_NAME, SPIECE_NAME) if (directory / name).is_file()), None)


def write_vocab(vocab: str | os.PathLike | Iterable[str], path: Path) -> None:
    if isinstance(vocab, (str, os.PathLike)):
        try:
            shutil.copyfile(vocab, path)
        except OSError as exc:
            raise CpmliveError(f"{vocab}: cannot copy the vocabulary ({exc.strerror or exc})") from None
    else:
        path.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")


# ---- OpenBMB <-> ours ------------------------------------------------------------------------

OPENBMB_LAYER = {
    "self_att.layernorm_before_attention.weight": "attn_norm.weight",
    "self_att.self_attention.project_q.weight": "attn.project_q.weight",
    "self_att.self_attention.project_k.weight": "attn.project_k.weight",
    "self_att.self_attention.project_v.weight": "attn.project_v.weight",
    "self_att.self_attention.attention_out.weight": "attn.attention_out.weight",
    "ffn.layernorm_before_ffn.weight": "ffn_norm.weight",
    "ffn.ffn.w_in.w_0.weight": "ffn.w_0.weight",
    "ffn.ffn.w_in.w_1.weight": "ffn.w_1.weight",
    "ffn.ffn.w_out.weight": "ffn.w_out.weight",
}
OPENBMB_TOP = {
    "encoder.output_layernorm.weight": "output_norm.weight",
    "prompt_embedding.weight": "prompt_embedding.weight",
    "segment_embedding.weight": "segment_embedding.weight",
    "input_embedding.weight": "input_embedding.weight",
    "position_bias.relative_attention_bias": "position_bias.weight",
}


def fan_in_scale(ours: str, config: AntConfig) -> float:
    """The factor OpenBMB applies at run time and we fold into the stored weight."""
    if ours.endswith(("embedding.weight", "project_q.weight", "project_k.weight", "project_v.weight",
                      "w_0.weight", "w_1.weight")):
        return 1.0 / math.sqrt(config.dim_model)
    if ours.endswith("attention_out.weight"):
        return 1.0 / math.sqrt(config.dim_attention)
    if ours.endswith("w_out.weight"):
        return 1.0 / math.sqrt(config.dim_ff)
    return 1.0


def _openbmb_name_to_ours(name: str) -> str | None:
    if name in OPENBMB_TOP:
        return OPENBMB_TOP[name]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in OPENBMB_LAYER:
        return f"layers.{match.group(1)}.{OPENBMB_LAYER[match.group(2)]}"
    return None


def _scaled(tensor: Tensor, factor: float) -> Tensor:
    if factor == 1.0:
        return tensor
    return (tensor.float() * factor).to(tensor.dtype)


def openbmb_to_ours(state: dict[str, Tensor], config: AntConfig) -> dict[str, Tensor]:
    out = {}
    for name, tensor in state.items():
        ours = _openbmb_name_to_ours(name)
        if ours is None:
            raise CpmliveError(f"not a CPM-Ant OpenBMB state dict: unknown key {name!r}")
        out[ours] = _scaled(tensor, fan_in_scale(ours, config))
    return out


def _ours_name_to_openbmb(name: str) -> str:
    reverse_top = {v: k for k, v in OPENBMB_TOP.items()}
    reverse_layer = {v: k for k, v in OPENBMB_LAYER.items()}
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in reverse_layer:
        return f"encoder.layers.{match.group(1)}.{reverse_layer[match.group(2)]}"
    if not match and name in reverse_top:
        return reverse_top[name]
    raise CpmliveError(f"not a CPM-Ant state dict in our layout: unknown key {name!r}")


def ours_to_openbmb(state: dict[str, Tensor], config: AntConfig) -> dict[str, Tensor]:
    return {_ours_name_to_openbmb(name): _scaled(tensor, 1.0 / fan_in_scale(name, config))
            for name, tensor in state.items()}


def config_from_openbmb_state(state: dict[str, Tensor], prompt_length: int = 32) -> AntConfig:
    """Read the shapes back into a config (an OpenBMB ``.pt`` carries no config)."""
    try:
        vocab_size, dim_model = state["input_embedding.weight"].shape
        segment_types = state["segment_embedding.weight"].shape[0]
        bias_rows, num_heads = state["position_bias.relative_attention_bias"].shape
        prompt_rows = state["prompt_embedding.weight"].shape[0]
    except KeyError as exc:
        raise CpmliveError(f"not a CPM-Ant OpenBMB state dict: no {exc.args[0]!r}") from None
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    dim_attention, dim_ff = None, None
    mask = []
    for i in range(num_layers):
        q = state.get(f"encoder.layers.{i}.self_att.self_attention.project_q.weight")
        w0 = state.get(f"encoder.layers.{i}.ffn.ffn.w_in.w_0.weight")
        if q is not None:
            dim_attention = q.shape[0]
        if w0 is not None:
            dim_ff = w0.shape[0]
        mask.append([q is None, w0 is None])
    if dim_attention is None or dim_ff is None:
        raise CpmliveError("cannot infer the config: no layer has both attention and FFN weights")
    return AntConfig(vocab_size=vocab_size, dim_model=dim_model, dim_ff=dim_ff, num_layers=num_layers,
                     num_heads=num_heads, dim_head=dim_attention // num_heads,
                     position_bias_num_buckets=bias_rows - segment_types**2, half=False,
                     prompt_types=prompt_rows // prompt_length, prompt_length=prompt_length,
                     segment_types=segment_types,
                     mask_modules=mask if any(a or f for a, f in mask) else None)


# ---- HF <-> ours -----------------------------------------------------------------------------


def hf_to_ours(state: dict[str, Tensor], config: AntConfig) -> tuple[dict[str, Tensor], AntConfig]:
    """Map an HF ``CpmAntForCausalLM``/``CpmAntModel`` state dict; zeroed output projections
    (how removed sub-blocks are written to HF) become removed sub-blocks again."""
    state = {k.removeprefix("cpmant."): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    try:
        table = state.pop("input_embedding.weight")
        out = {"input_embedding.weight": table[: config.vocab_size],
               "prompt_embedding.weight": table[config.vocab_size:],
               "segment_embedding.weight": state.pop("segment_embedding.weight"),
               "position_bias.weight": state.pop("position_bias.relative_attention_bias"),
               "output_norm.weight": state.pop("encoder.output_layernorm.weight")}
    except KeyError as exc:
        raise CpmliveError(f"not a CpmAnt HF state dict: no 'cpmant.{exc.args[0]}'") from None
    if head is not None and not torch.equal(head[: config.vocab_size], out["input_embedding.weight"]):
        raise CpmliveError("lm_head.weight differs from the input embedding: CPM-Ant ties them, "
                           "this checkpoint is not a CPM-Ant")
    for name, tensor in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
        if not match or match.group(2) not in OPENBMB_LAYER:
            raise CpmliveError(f"not a CpmAnt HF state dict: unknown key {name!r}")
        out[f"layers.{match.group(1)}.{OPENBMB_LAYER[match.group(2)]}"] = tensor
    mask = []
    for i in range(config.num_layers):
        attn_out = out.get(f"layers.{i}.attn.attention_out.weight")
        ffn_out = out.get(f"layers.{i}.ffn.w_out.weight")
        if attn_out is None or ffn_out is None:
            missing = "self_att.self_attention.attention_out" if attn_out is None else "ffn.ffn.w_out"
            raise CpmliveError(f"not a CpmAnt HF state dict: no 'cpmant.encoder.layers.{i}.{missing}.weight'")
        mask.append([not attn_out.any().item(), not ffn_out.any().item()])
    if config.mask_modules is not None:
        mask = [[a or ca, f or cf] for (a, f), (ca, cf) in zip(mask, config.mask_modules)]
    if any(a or f for a, f in mask):
        for i, (no_attn, no_ffn) in enumerate(mask):
            prefixes = (["attn_norm.", "attn."] if no_attn else []) + (["ffn_norm.", "ffn."] if no_ffn else [])
            for key in [k for k in out if any(k.startswith(f"layers.{i}.{p}") for p in prefixes)]:
                del out[key]
        config = AntConfig.from_dict({**config.to_dict(), "mask_modules": mask})
    return out, config


def ours_to_hf(state: dict[str, Tensor], config: AntConfig) -> dict[str, Tensor]:
    """HF has every sub-block: a removed one is written with a zero output projection."""
    out = {
        "cpmant.input_embedding.weight": torch.cat([state["input_embedding.weight"],
                                                    state["prompt_embedding.weight"]]),
        "cpmant.segment_embedding.weight": state["segment_embedding.weight"],
        "cpmant.position_bias.relative_attention_bias": state["position_bias.weight"],
        "cpmant.encoder.output_layernorm.weight": state["output_norm.weight"],
        "lm_head.weight": state["input_embedding.weight"].clone(),
    }
    reverse = {v: k for k, v in OPENBMB_LAYER.items()}
    like = state["input_embedding.weight"]
    d, a, ff = config.dim_model, config.dim_attention, config.dim_ff
    filler = {"attn_norm.weight": (d,), "attn.project_q.weight": (a, d), "attn.project_k.weight": (a, d),
              "attn.project_v.weight": (a, d), "attn.attention_out.weight": (d, a), "ffn_norm.weight": (d,),
              "ffn.w_0.weight": (ff, d), "ffn.w_1.weight": (ff, d), "ffn.w_out.weight": (d, ff)}
    for i in range(config.num_layers):
        for local, shape in filler.items():
            tensor = state.get(f"layers.{i}.{local}")
            if tensor is None:
                tensor = like.new_ones(shape) if local.endswith("norm.weight") else like.new_zeros(shape)
            out[f"cpmant.encoder.layers.{i}.{reverse[local]}"] = tensor
    return out


__all__ = [
    "CONFIG_NAME", "INDEX_NAME", "VOCAB_NAME", "WEIGHTS_NAME", "check_state_dict", "config_from_openbmb_state",
    "hf_to_ours", "load_model", "model_from_state_dict", "openbmb_to_ours", "ours_to_hf", "ours_to_openbmb",
    "read_safetensors", "read_weights", "safetensors_bytes", "save_checkpoint",
]
