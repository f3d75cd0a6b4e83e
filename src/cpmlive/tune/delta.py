"""Delta tuning for CPM-Ant: LoRA, soft-prompt tuning and BitFit-style norm tuning.

HF PEFT is the reference (same target matching, same LoRA arithmetic and initialisation, same
file layout), but the layers are our own, for two reasons:

* a LoRA layer computes its base product through :func:`cpmlive.model.runtime.kernels.project`, so float32
  decoding keeps the oneDNN path that PEFT's wrapper would bypass;
* which adapter runs can be chosen per call and per thread (:func:`active_adapter`), so one
  server can answer each request with its own adapter over one copy of the base.

Each tuned module is replaced by a subclass of its own class that keeps the base weight under
its original name, so the base part of ``model.state_dict()`` keeps its keys, and holds one
delta per adapter name under PEFT's container names:

* ``LoraLinear(nn.Linear)``: ``lora_A``/``lora_B``/``lora_dropout``;
  ``out = base(x) + B(A(dropout(x))) * alpha / r``;
* ``TunedRMSNorm(RMSNorm)``: ``ln_tuning_layers``, a tuned copy of the norm (PEFT LN_TUNING;
  CPM-Ant has no biases, so BitFit tunes the RMSNorm scales instead);
* ``PromptTable(nn.Embedding)``: ``prompt_embeddings``, ``prompt_length`` new rows that replace
  the prompt-table rows of task ``task_id`` (a soft prompt in CPM-Ant's own prompt mechanism).

An adapter on disk (:func:`save_adapter`, :func:`load_adapter`) is a directory with:

* ``adapter_config.json``: a PEFT config (``LORA``, ``PROMPT_TUNING`` for soft prompts,
  ``LN_TUNING`` for bitfit) with only keys PEFT's config classes accept;
* ``adapter_model.safetensors``: PEFT's key names (``base_model.model.<module>.lora_A.weight``,
  ``...lora_B.weight``, ``...<norm>.ln_tuning_layers.weight``; ``prompt_embeddings``); its
  metadata carries ``cpmlive_base_hash`` and ``cpmlive_delta`` (PEFT ignores metadata);
* ``cpmlive_adapter.json``: our sidecar with the base hash, the adapter name and the full
  :class:`DeltaConfig` (a soft prompt's ``task_id`` has no PEFT field). PEFT ignores the file.

So ``PeftModel.from_pretrained(CpmAnt(...), directory)`` loads our LoRA and bitfit adapters,
and :func:`load_adapter` loads PEFT's LoRA/LN_TUNING adapters (those carry no base hash: they
load with a warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from cpmlive.config import read_json_object
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Embedding, RMSNorm
from cpmlive.model.checkpoint import read_safetensors, safetensors_bytes
from cpmlive.model.fingerprint import weights_fingerprint
from cpmlive.model.registry import families
from cpmlive.model.runtime.kernels import project
from cpmlive.model.runtime.quant import QuantizedLinear
from cpmlive.resources import model_path
from cpmlive.tune.published import AdapterNames
from cpmlive.utils import atomic_write_bytes, atomic_write_text, check_output, dataclass_from_dict, replace_submodule

METHODS = ("lora", "prompt", "bitfit")
DEFAULT_TARGETS = {"lora": ["project_q", "project_v"], "bitfit": ["attn_norm", "ffn_norm", "output_norm"]}
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
Targets = Union[list[str], str]


# ---- configuration --------------------------------------------------------------------------------


@dataclass
class DeltaConfig:
    """One delta. ``target_modules`` (LoRA, bitfit) follows PEFT: a list entry matches a module's
    full dotted name or a suffix of it at a dot boundary, a single string is a regex that must
    match the full name; ``None`` means the method's default (LoRA: attention q and v; bitfit:
    every RMSNorm). ``task_id``/``init_task`` are for ``prompt``: the tuned rows replace task
    ``task_id``'s and start as a copy of task ``init_task``'s (2 is generation)."""

    method: str = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Targets | None = None
    task_id: int = 3
    init_task: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise CpmliveError(f"delta: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(_is_int(self.r) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        _require(_is_number(self.alpha) and self.alpha > 0, f"alpha must be a positive number, got {self.alpha!r}")
        _require(_is_number(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("task_id", "init_task"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        targets = self.target_modules
        if self.method == "prompt":
            _require(targets is None, "target_modules does not apply to prompt tuning")
        elif targets is not None:
            ok = isinstance(targets, str) or (isinstance(targets, list) and targets
                                              and all(isinstance(t, str) and t for t in targets))
            _require(bool(ok), f"target_modules must be a regex string or a non-empty list of names, got {targets!r}")

    @property
    def targets(self) -> Targets:
        """``target_modules`` with the method's default filled in (empty for prompt tuning)."""
        return self.target_modules if self.target_modules is not None else list(DEFAULT_TARGETS.get(self.method, []))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaConfig":
        return dataclass_from_dict(cls, data, "delta", "delta: a config must be a JSON object")

    @classmethod
    def from_json(cls, text: str) -> "DeltaConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CpmliveError(f"delta: not valid JSON ({exc})") from None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeltaConfig":
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CpmliveError(f"{path}: cannot read the delta config ({exc})") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CpmliveError(f"delta: {message}")


# ---- which adapter runs -----------------------------------------------------------------------------

# Per-context overrides {id(DeltaState): adapter name or None}; each thread starts empty.
_OVERRIDES: ContextVar[dict[int, str | None]] = ContextVar("cpmlive_active_adapter", default={})


# Per-context row assignments {id(DeltaState): [(adapter name or None, row indices), ...]}.
_ROWS: ContextVar[dict[int, list[tuple[str | None, Tensor]]]] = ContextVar("cpmlive_row_adapters", default={})


class DeltaState:
    """Shared by every delta layer of one model: the attached adapters and which one runs."""

    def __init__(self) -> None:
        self.configs: dict[str, DeltaConfig] = {}
        self.active: str | None = None

    def current(self) -> str | None:
        overrides = _OVERRIDES.get()
        return overrides.get(id(self), self.active) if overrides else self.active

    def row_groups(self) -> list[tuple[str | None, Tensor]] | None:
        """Under :func:`adapters_by_row`: each adapter with the batch rows it runs on."""
        assigned = _ROWS.get()
        return assigned.get(id(self)) if assigned else None


def delta_state(model: nn.Module) -> DeltaState | None:
    return getattr(model, "delta_state", None)


def _known_state(model: nn.Module, name: str | None) -> DeltaState:
    state = delta_state(model)
    if state is None:
        raise CpmliveError("the model has no adapters attached")
    if name is not None and name not in state.configs:
        raise CpmliveError(f"no adapter named {name!r} (attached: {', '.join(state.configs)})")
    return state


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` from now on (``None``: the base model alone)."""
    _known_state(model, name).active = name


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Use adapter ``name`` inside the block, in this thread/task only (other threads keep
    theirs). For inference: a backward pass run outside the block, or in autograd's device
    threads, would not see the choice, so train with :func:`set_active_adapter`."""
    state = _known_state(model, name)
    token = _OVERRIDES.set({**_OVERRIDES.get(), id(state): name})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@contextlib.contextmanager
def adapters_by_row(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Row ``i`` of every batch inside the block runs through adapter ``names[i]`` (``None``: the
    base model), in this thread/task only: an engine's batch mixes requests for several adapters
    over one copy of the base. Each layer computes its base output for all rows at once and each
    adapter's part for its own rows."""
    state = delta_state(model)
    if state is None:
        if any(name is not None for name in names):
            raise CpmliveError("the model has no adapters attached")
        yield
        return
    for name in names:
        _known_state(model, name)
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    device = next(model.parameters()).device
    split = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
    token = _ROWS.set({**_ROWS.get(), id(state): split})
    try:
        yield
    finally:
        _ROWS.reset(token)


def _by_row(state: DeltaState, out: Tensor, part: Any) -> Tensor:
    """``out`` with the rows of each assigned adapter replaced by ``part(name, rows)`` (``None``:
    that adapter leaves this layer alone)."""
    for name, rows in state.row_groups() or ():
        if name is None:
            continue
        replaced = part(name, rows)
        if replaced is not None:
            out = out.index_copy(0, rows, replaced.to(out.dtype))
    return out


# ---- delta layers ---------------------------------------------------------------------------------


class LoraLinear(nn.Linear):
    """A linear layer plus one low-rank branch per adapter (PEFT's ``lora.Linear`` arithmetic)."""

    DELTA_PARTS = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base: nn.Linear, state: DeltaState) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.delta_state = state

    def add(self, name: str, config: DeltaConfig) -> None:
        """A kaiming-uniform ``A`` and a zero ``B``, as PEFT initialises them. Half-precision
        bases get float32 adapters (PEFT's ``autocast_adapter_dtype``)."""
        kind = dict(device=self.weight.device, dtype=_adapter_dtype(self.weight))
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **kind)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **kind)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = project(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)
        return self.with_delta(x, out)

    def with_delta(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus the active adapter's low-rank branch of ``x`` (none active: ``out``)."""
        if self.delta_state.row_groups() is not None:
            return _by_row(self.delta_state, out, lambda name, rows: None if name not in self.lora_A else
                           out[rows] + self.low_rank(name, x[rows]).to(out.dtype))
        name = self.delta_state.current()
        if name not in self.lora_A:
            return out
        return out + self.low_rank(name, x).to(out.dtype)

    def low_rank(self, name: str, x: Tensor) -> Tensor:
        a = self.lora_A[name]
        return self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]

    def delta_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def remove(self, name: str) -> None:
        for part in self.DELTA_PARTS:
            del getattr(self, part)[name]
        del self.scaling[name]

    def plain(self, merge: str | None = None) -> nn.Linear:
        """The base layer again; with ``merge``, that adapter folded in: ``W + B @ A * scale``."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        if merge is not None:
            a, b = self.lora_A[merge].weight, self.lora_B[merge].weight
            folded = self.weight.float() + (b.float() @ a.float()) * self.scaling[merge]
            layer.weight = nn.Parameter(folded.to(self.weight.dtype))
        return layer


class LoraQuantizedLinear(QuantizedLinear):
    """LoRA over a quantized layer (QLoRA): the codes stay frozen integers, the low-rank branch
    is float32 and trains; the same container names and arithmetic as :class:`LoraLinear`."""

    DELTA_PARTS = LoraLinear.DELTA_PARTS
    add, delta_tensors = LoraLinear.add, LoraLinear.delta_tensors
    adapters, remove = LoraLinear.adapters, LoraLinear.remove

    def __init__(self, base: QuantizedLinear, state: DeltaState) -> None:
        super().__init__(base.in_features, base.out_features, base.layer_config(), device="meta")
        self.adopt_codes(base)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.delta_state = state

    with_delta, low_rank = LoraLinear.with_delta, LoraLinear.low_rank

    def forward(self, x: Tensor) -> Tensor:
        return self.with_delta(x, QuantizedLinear.forward(self, x))

    def plain(self, merge: str | None = None) -> QuantizedLinear:
        if merge is not None:
            raise CpmliveError("a LoRA adapter cannot be merged into quantized weights: merge it into the "
                               "float base (`cpmlive convert --dequantize` first) or serve it as an adapter")
        layer = QuantizedLinear(self.in_features, self.out_features, self.layer_config(), device="meta")
        layer.adopt_codes(self)
        return layer


class TunedRMSNorm(RMSNorm):
    """An RMSNorm plus one tuned copy per adapter (PEFT LN_TUNING's ``ln_tuning_layers``)."""

    DELTA_PARTS = ("ln_tuning_layers",)

    def __init__(self, base: RMSNorm, state: DeltaState) -> None:
        nn.Module.__init__(self)
        self.eps, self.weight = base.eps, base.weight
        self.ln_tuning_layers = nn.ModuleDict()
        self.delta_state = state

    def add(self, name: str, config: DeltaConfig) -> None:
        with torch.device("meta"):
            copy = RMSNorm(self.weight.numel(), self.eps)
        copy.weight = nn.Parameter(self.weight.detach().clone())
        self.ln_tuning_layers[name] = copy

    def forward(self, x: Tensor) -> Tensor:
        if self.delta_state.row_groups() is not None:
            return _by_row(self.delta_state, super().forward(x), lambda name, rows: None
                           if name not in self.ln_tuning_layers else self.ln_tuning_layers[name](x[rows]))
        name = self.delta_state.current()
        if name in self.ln_tuning_layers:
            return self.ln_tuning_layers[name](x)
        return super().forward(x)

    def delta_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"ln_tuning_layers.weight": self.ln_tuning_layers[name].weight}

    def adapters(self) -> list[str]:
        return list(self.ln_tuning_layers)

    def remove(self, name: str) -> None:
        del self.ln_tuning_layers[name]

    def plain(self, merge: str | None = None) -> RMSNorm:
        with torch.device("meta"):
            layer = RMSNorm(self.weight.numel(), self.eps)
        layer.weight = self.weight
        if merge is not None:
            layer.weight = nn.Parameter(self.ln_tuning_layers[merge].weight.detach().clone())
        return layer


class PromptTable(nn.Embedding):
    """CPM-Ant's prompt table plus, per adapter, ``prompt_length`` rows that replace those of
    the adapter's task. Inputs select a task through their prompt ids (task ``t`` is rows
    ``t * prompt_length ...``), so a prompt adapter is used by building inputs for its task."""

    DELTA_PARTS = ("prompt_embeddings",)

    def __init__(self, base: nn.Embedding, state: DeltaState, prompt_length: int) -> None:
        super().__init__(base.num_embeddings, base.embedding_dim, device="meta")
        self.weight = base.weight
        self.prompt_length = prompt_length
        self.prompt_embeddings = nn.ParameterDict()
        self.task_ids: dict[str, int] = {}
        self.delta_state = state

    def add(self, name: str, config: DeltaConfig) -> None:
        start = config.init_task * self.prompt_length
        rows = self.weight.detach()[start:start + self.prompt_length].clone()
        self.prompt_embeddings[name] = nn.Parameter(rows)
        self.task_ids[name] = config.task_id

    def forward(self, ids: Tensor) -> Tensor:
        out = super().forward(ids)
        if self.delta_state.row_groups() is not None:
            return _by_row(self.delta_state, out, lambda name, rows: None if name not in self.prompt_embeddings
                           else self.tuned(name, ids[rows], out[rows]))
        name = self.delta_state.current()
        return out if name not in self.prompt_embeddings else self.tuned(name, ids, out)

    def tuned(self, name: str, ids: Tensor, out: Tensor) -> Tensor:
        """``out`` with the rows of adapter ``name``'s task taken from its tuned prompt."""
        offset = ids - self.task_ids[name] * self.prompt_length
        inside = (offset >= 0) & (offset < self.prompt_length)
        rows = self.prompt_embeddings[name][offset.clamp(0, self.prompt_length - 1)]
        return torch.where(inside[..., None], rows, out)

    def delta_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.prompt_embeddings[name]}

    def adapters(self) -> list[str]:
        return list(self.prompt_embeddings)

    def remove(self, name: str) -> None:
        del self.prompt_embeddings[name]
        del self.task_ids[name]

    def plain(self, merge: str | None = None) -> nn.Embedding:
        layer = Embedding(self.num_embeddings, self.embedding_dim, device="meta")
        layer.weight = self.weight
        if merge is not None:
            start = self.task_ids[merge] * self.prompt_length
            table = self.weight.detach().clone()
            table[start:start + self.prompt_length] = self.prompt_embeddings[merge].detach()
            layer.weight = nn.Parameter(table)
        return layer


DeltaLayer = Union[LoraLinear, LoraQuantizedLinear, TunedRMSNorm, PromptTable]
DELTA_TYPES = (LoraLinear, LoraQuantizedLinear, TunedRMSNorm, PromptTable)
LORA_TARGET_TYPES = (nn.Linear, QuantizedLinear)


def _adapter_dtype(weight: Tensor) -> torch.dtype:
    """float32 over half-precision and integer (quantized) bases, else the base's own dtype."""
    half_or_codes = weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point()
    return torch.float32 if half_or_codes else weight.dtype


def delta_layers(model: nn.Module) -> list[tuple[str, DeltaLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, DELTA_TYPES)]


# ---- target matching ------------------------------------------------------------------------------


def _entry_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def find_targets(model: nn.Module, targets: Targets, kind: type | tuple[type, ...]) -> list[str]:
    """Names of the modules ``targets`` selects; every pattern must select something, and only
    modules of type ``kind`` may be selected. Modules inside delta layers are never targets."""
    inner = tuple(f"{name}." for name, _ in delta_layers(model))
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    selected: list[str] = []
    for pattern in [targets] if isinstance(targets, str) else targets:
        found = [n for n in names if _pattern_matches(n, pattern, regex=isinstance(targets, str))]
        if not found:
            example = next((n for n in names if isinstance(model.get_submodule(n), kind)), names[-1])
            raise CpmliveError(f"target_modules: {pattern!r} matches no module of the model "
                               f"(names look like {example!r})")
        selected += [n for n in found if n not in selected]
    for name in selected:
        module = model.get_submodule(name)
        if not isinstance(module, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CpmliveError(f"target_modules: {name!r} is a {type(module).__name__}; "
                               f"only {kinds} modules can be tuned this way")
    return sorted(selected, key=names.index)


def _pattern_matches(name: str, pattern: str, regex: bool) -> bool:
    """PEFT's rule: a string is a regex full-match; a list entry matches exactly or as a suffix
    at a dot boundary."""
    if not regex:
        return _entry_matches(name, pattern)
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise CpmliveError(f"target_modules: {pattern!r} is not a valid regex ({exc})") from None


# ---- attach / remove / merge ----------------------------------------------------------------------


def attach(model: nn.Module, config: DeltaConfig, name: str = "default") -> nn.Module:
    """Freeze the backbone and add adapter ``name``; it becomes the active one and the only
    trainable parameters."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise CpmliveError(f"adapter name {name!r}: use letters, digits, '_' and '-'")
    state = delta_state(model) or DeltaState()
    if name in state.configs:
        raise CpmliveError(f"an adapter named {name!r} is already attached")
    for path in _target_paths(model, config):
        layer = _delta_layer(model, path, state)
        layer.add(name, config)
        layer.train(model.training)  # new modules start in training mode: dropout would run at inference
    model.delta_state = state
    state.configs[name] = config
    state.active = name
    model.requires_grad_(False)
    for parameter in adapter_tensors(model, name).values():
        parameter.requires_grad_(True)
    return model


def _target_paths(model: nn.Module, config: DeltaConfig) -> list[str]:
    if config.method == "prompt":
        _check_prompt_task(model, config)
        return ["prompt_embedding"]
    paths = find_targets(model, config.targets, LORA_TARGET_TYPES if config.method == "lora" else RMSNorm)
    names = adapter_names(model)
    if names is not None:
        names.check_targets(paths)
    return paths


def adapter_names(model: nn.Module) -> AdapterNames | None:
    """Where the model's family saves adapters under its published checkpoints' module names
    (``Family.adapter_modules``), the translation for this model's modules; else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    kind = families().get(model_type)  # the registry keys its families by model_type
    if kind is None or kind.adapter_modules is None:
        return None
    present = {name for name, _ in model.named_modules()}
    published = {ours: theirs for ours, theirs in kind.adapter_modules(model.config).items() if ours in present}
    return AdapterNames(published, kind.name)


def _check_prompt_task(model: nn.Module, config: DeltaConfig) -> None:
    types = model.config.prompt_types
    for field_name in ("task_id", "init_task"):
        if getattr(config, field_name) >= types:
            raise CpmliveError(f"delta: {field_name} {getattr(config, field_name)} is out of range "
                               f"(the model has {types} prompt types)")


def _delta_layer(model: nn.Module, path: str, state: DeltaState) -> DeltaLayer:
    """The delta layer at ``path``, replacing the plain module there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, DELTA_TYPES):
        return module
    if isinstance(module, QuantizedLinear):
        layer: DeltaLayer = LoraQuantizedLinear(module, state)
    elif isinstance(module, nn.Linear):
        layer = LoraLinear(module, state)
    elif isinstance(module, RMSNorm):
        layer = TunedRMSNorm(module, state)
    else:
        layer = PromptTable(module, state, model.config.prompt_length)
    replace_submodule(model, path, layer)
    return layer



def adapter_tensors(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters under their PEFT names, without PEFT's ``base_model.model.``
    prefix (e.g. ``layers.0.attn.project_q.lora_A.weight``; a soft prompt is ``prompt_embeddings``)."""
    tensors: dict[str, nn.Parameter] = {}
    for path, layer in delta_layers(model):
        if name in layer.adapters():
            for local, parameter in layer.delta_tensors(name).items():
                tensors[local if isinstance(layer, PromptTable) else f"{path}.{local}"] = parameter
    return tensors


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the adapters: the keys of the model before ``attach``."""
    inner = tuple(f"{path}.{part}." for path, layer in delta_layers(model) for part in layer.DELTA_PARTS)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(inner)}


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name``; modules left without adapters become plain again."""
    state = _known_state(model, name)
    for path, layer in delta_layers(model):
        if name in layer.adapters():
            layer.remove(name)
            if not layer.adapters():
                replace_submodule(model, path, layer.plain())
    del state.configs[name]
    if state.active == name:
        state.active = None
    if not state.configs:
        _forget(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: the plain base model again, every parameter trainable."""
    _known_state(model, None)
    for path, layer in delta_layers(model):
        replace_submodule(model, path, layer.plain())
    _forget(model)
    return model


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into the base weights and remove every
    adapter: LoRA adds ``B @ A * alpha / r`` to its weight, bitfit writes its scales, a soft
    prompt writes its rows into task ``task_id`` of the prompt table. The result is a plain
    ``CpmAnt`` (every parameter trainable) that computes what the adapted model did."""
    state = _known_state(model, name)
    name = name if name is not None else state.active
    if name is None:
        raise CpmliveError("no adapter is active: name the one to merge")
    for path, layer in delta_layers(model):
        replace_submodule(model, path, layer.plain(merge=name if name in layer.adapters() else None))
    _forget(model)
    return model


def _forget(model: nn.Module) -> None:
    del model.delta_state
    model.requires_grad_(True)


# ---- parameter counts -----------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included in the total (as PEFT counts)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line."""
    trainable, total = trainable_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


# ---- on disk -------------------------------------------------------------------------------------

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "cpmlive_adapter.json"
SIDECAR_FORMAT = "cpmlive-adapter/1"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = {"lora": "LORA", "prompt": "PROMPT_TUNING", "bitfit": "LN_TUNING"}

# PEFT config keys that only describe the file or steer initialisation: any value is fine.
PEFT_INERT_KEYS = {
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_core", "qalora_group_size", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_name_or_path", "tokenizer_kwargs", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "token_dim", "num_virtual_tokens", "r", "lora_alpha", "lora_dropout", "target_modules",
}
# Values that mean "feature off" for every other PEFT key.
PEFT_OFF_VALUES = (None, False, "none", {}, [])


# ---- the base hash --------------------------------------------------------------------------------


def base_hash(model: nn.Module) -> str:
    """The fingerprint of the base weights (``cpmlive.model.fingerprint``), adapters left out."""
    return weights_fingerprint(model.config.to_dict(), base_state_dict(model))


# ---- saving ---------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` in PEFT's layout (each file atomically); return the directory."""
    state = delta_state(model)
    if state is None or name not in state.configs:
        raise CpmliveError(f"no adapter named {name!r} to save")
    config, digest = state.configs[name], base_hash(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = adapter_names(model)
    tensors = {_peft_key(key if names is None else names.key_to_published(key)): t.detach().contiguous().cpu()
               for key, t in adapter_tensors(model, name).items()}
    metadata = {"format": "pt", "cpmlive_base_hash": digest, "cpmlive_delta": json.dumps(config.to_dict())}
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    peft_config = peft_config_of(config, model, base_model_name_or_path)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    sidecar = {"format": SIDECAR_FORMAT, "adapter_name": name, "base_hash": digest, "delta": config.to_dict()}
    atomic_write_text(directory / SIDECAR_NAME, json.dumps(sidecar, indent=2) + "\n")
    return directory


def _peft_key(key: str) -> str:
    return key if key == "prompt_embeddings" else PEFT_PREFIX + key


def peft_config_of(config: DeltaConfig, model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT would write for this delta (only fields it accepts)."""
    common = {"peft_type": PEFT_TYPES[config.method], "task_type": None, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path, "revision": None, "modules_to_save": None}
    names = adapter_names(model)
    targets = config.targets if names is None or config.method == "prompt" else names.targets_to_published(
        config.targets)
    if config.method == "lora":
        alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
        return {**common, "r": config.r, "lora_alpha": alpha, "lora_dropout": config.dropout,
                "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
                "use_rslora": False, "use_dora": False, "init_lora_weights": True, "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    if config.method == "bitfit":
        return {**common, "target_modules": targets, "exclude_modules": None}
    ant = model.config
    return {**common, "num_virtual_tokens": ant.prompt_length, "token_dim": ant.dim_model,
            "num_transformer_submodules": 1, "num_attention_heads": ant.num_heads, "num_layers": ant.num_layers,
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}


# ---- loading --------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                 trainable: bool = False) -> str:
    """Attach the adapter saved in ``directory`` (ours or PEFT's) and return its name
    (default: the name it was saved under, else ``"default"``). Refuses an adapter trained on
    another base. It becomes the active adapter; its parameters are trainable only with
    ``trainable`` (as PEFT's ``is_trainable``)."""
    directory = Path(directory)
    sidecar = _read_sidecar(directory)
    config = delta_config_from_peft(_peft_config_for(model, directory, sidecar), sidecar.get("delta", {}),
                                    str(directory))
    _check_base(model, directory, sidecar.get("base_hash") or _file_metadata(directory).get("cpmlive_base_hash"))
    name = name or sidecar.get("adapter_name") or "default"
    tensors = _read_adapter_tensors(model, directory)
    attach(model, config, name)
    try:
        _copy_into(adapter_tensors(model, name), tensors, directory)
    except BaseException:
        remove_adapter(model, name)
        raise
    if not trainable:
        for parameter in adapter_tensors(model, name).values():
            parameter.requires_grad_(False)
    return name


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Refill attached adapter ``name`` (default: the active one) from a saved one, in place:
    for resuming training, since the parameters (and an optimizer's state for them) stay the
    same objects. The saved delta must be the attached one's, on the same base."""
    directory = Path(directory)
    state = _known_state(model, name)
    name = name if name is not None else state.active
    if name is None:
        raise CpmliveError("no adapter is active: name the one to load into")
    sidecar = _read_sidecar(directory)
    saved = delta_config_from_peft(_peft_config_for(model, directory, sidecar), sidecar.get("delta", {}),
                                   str(directory))
    if _comparable(saved) != _comparable(state.configs[name]):
        raise CpmliveError(f"{directory}: the saved adapter is not shaped like the attached {name!r} "
                           f"({_comparable(saved)} vs {_comparable(state.configs[name])})")
    _check_base(model, directory, sidecar.get("base_hash") or _file_metadata(directory).get("cpmlive_base_hash"))
    _copy_into(adapter_tensors(model, name), _read_adapter_tensors(model, directory), directory)
    return name


def _peft_config_for(model: nn.Module, directory: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """The adapter's PEFT config with ``target_modules`` in our module names: as our sidecar
    recorded them, else translated from the published names where the family saves in those."""
    peft_config = _read_peft_config(directory)
    names = adapter_names(model)
    if names is None or "target_modules" not in peft_config:
        return peft_config
    recorded = sidecar.get("delta", {})
    targets = recorded["target_modules"] if "target_modules" in recorded else \
        names.targets_from_published(peft_config["target_modules"])
    return {**peft_config, "target_modules": targets}


def _read_adapter_tensors(model: nn.Module, directory: Path) -> dict[str, Tensor]:
    tensors = read_safetensors(directory / WEIGHTS_NAME)
    names = adapter_names(model)
    return tensors if names is None else names.tensors_from_published(tensors, PEFT_PREFIX)


def _comparable(config: DeltaConfig) -> dict[str, Any]:
    """The config with default targets spelled out and target lists in a fixed order."""
    data = config.to_dict()
    if config.method != "prompt":
        targets = config.targets
        data["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    return data


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CpmliveError(f"{path}: not found (not an adapter directory?)")
    return read_json_object(path, "adapter config")


def _read_sidecar(directory: Path) -> dict[str, Any]:
    path = directory / SIDECAR_NAME
    if not path.is_file():
        return {}
    sidecar = read_json_object(path, "adapter sidecar")
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise CpmliveError(f"{path}: unknown format {sidecar.get('format')!r} (expected {SIDECAR_FORMAT!r})")
    return sidecar


def _file_metadata(directory: Path) -> dict[str, str]:
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
            return handle.metadata() or {}
    except FileNotFoundError:
        raise CpmliveError(f"{directory / WEIGHTS_NAME}: not found") from None
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise CpmliveError(f"{directory / WEIGHTS_NAME}: not a safetensors file ({exc})") from None


def _check_base(model: nn.Module, directory: Path, recorded: str | None) -> None:
    if recorded is None:
        warnings.warn(f"{directory}: the adapter records no base hash (saved by PEFT?), so it is not "
                      "checked against this model", stacklevel=3)
        return
    actual = base_hash(model)
    quantization = getattr(model.config, "quantization", None)
    if quantization is not None and recorded == quantization.source:
        return  # trained on the float model this one was quantized from
    if recorded != actual:
        raise CpmliveError(f"{directory}: adapter was trained on base {recorded}, this model is base {actual}")


def delta_config_from_peft(peft_config: dict[str, Any], extra: dict[str, Any], source: str) -> DeltaConfig:
    """Our config for a PEFT ``adapter_config.json``; ``extra`` (our sidecar's ``delta``) adds what
    PEFT has no field for. PEFT options we do not implement are refused by name."""
    methods = {v: k for k, v in PEFT_TYPES.items()}
    peft_type = peft_config.get("peft_type")
    if peft_type not in methods:
        raise CpmliveError(f"{source}: peft_type {peft_type!r} is not supported (use one of {', '.join(methods)})")
    for key, value in peft_config.items():
        if key not in PEFT_INERT_KEYS and not any(value == off and type(value) is type(off) for off in PEFT_OFF_VALUES):
            raise CpmliveError(f"{source}: PEFT option {key}={value!r} is not supported")
    method = methods[peft_type]
    fields: dict[str, Any] = {"method": method}
    if method == "lora":
        fields.update(r=peft_config.get("r", 8), alpha=peft_config.get("lora_alpha", 8),
                      dropout=peft_config.get("lora_dropout", 0.0))
    if method != "prompt":
        fields["target_modules"] = peft_config.get("target_modules")
    if method == "prompt":
        fields.update({k: extra[k] for k in ("task_id", "init_task") if k in extra})
    return DeltaConfig.from_dict(fields)


def _copy_into(params: dict[str, nn.Parameter], tensors: dict[str, Tensor], directory: Path) -> None:
    """Fill the freshly attached adapter from the file's tensors, key for key."""
    stored = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}
    source = directory / WEIGHTS_NAME
    for key, parameter in params.items():
        if key not in stored:
            raise CpmliveError(f"{source}: missing tensor {_peft_key(key)!r}")
        if tuple(stored[key].shape) != tuple(parameter.shape):
            raise CpmliveError(f"{source}: tensor {_peft_key(key)!r} has shape {list(stored[key].shape)}, "
                               f"the model expects {list(parameter.shape)}")
    extra = sorted(set(stored) - set(params))
    if extra:
        raise CpmliveError(f"{source}: unexpected tensor {_peft_key(extra[0])!r} for this adapter and model")
    with torch.no_grad():
        for key, parameter in params.items():
            parameter.copy_(stored[key].to(parameter.dtype))


def adapter_size(directory: str | os.PathLike) -> int:
    """Bytes on disk of an adapter directory's files."""
    return sum(path.stat().st_size for path in Path(directory).iterdir() if path.is_file())


# ---- merged checkpoints ---------------------------------------------------------------------------


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                     dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Load a base checkpoint (a directory or ``"demo"``), fold the adapter in and write the
    result in our checkpoint format (with the base's vocabulary). An ``out`` that already holds
    files is refused unless ``force`` (then only the checkpoint's files are replaced)."""
    from cpmlive.model.checkpoint import checkpoint_vocab, save_checkpoint
    from cpmlive.model.registry import family_of

    base_dir = model_path(base)
    if Path(out).resolve() == base_dir.resolve():
        raise CpmliveError(f"{out}: the output would overwrite the base checkpoint")
    check_output(out, force)
    model, _ = family_of(base_dir).load(base_dir)
    load_adapter(model, adapter)
    merge(model)
    return save_checkpoint(model, model.config, out, vocab=checkpoint_vocab(base_dir), dtype=dtype)


__all__ = [
    "DeltaConfig", "DeltaState", "LoraLinear", "PromptTable", "TunedRMSNorm", "active_adapter", "adapter_tensors",
    "attach", "adapter_size", "base_hash", "base_state_dict", "delta_config_from_peft", "delta_layers", "find_targets",
    "load_adapter", "load_adapter_weights", "merge", "merge_checkpoint", "peft_config_of", "remove_adapter",
    "save_adapter", "set_active_adapter", "trainable_parameters", "trainable_summary", "unload",
]
