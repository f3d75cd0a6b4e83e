"""The stack's plain blocks for one decoding step in a single native call (``csrc/decode.c``).

A decoding step of a ~450M model does about 150 small products and as many small element-wise
operations; from Python each costs tens of microseconds of dispatch, as much as the int8 weights
take to stream. :func:`decode_blocks` hands the whole stack of blocks to C instead: it computes
what ``model.stack.Block.forward`` computes for one new position per row, writing keys and values
into the model's own :class:`~cpmlive.model.cache.KVCache` tensors, so prompts (prefilled by PyTorch)
and steps share one cache. Embedding, attention bias, final norm and head stay in PyTorch.

:func:`plan` says whether a model can take this path (float or quantized plain layers without
biases, unscaled residuals, float32 activations and cache, no adapters or experts) and describes
its layers to C once; the description is rebuilt when a weight changes.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import cpmlive.model.runtime.native as native
from cpmlive.model.runtime.quant import QuantizedLinear

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_I8, KIND_W8A8, KIND_I4 = 3, 4, 5


# Plans by model, outside the module so that copying or pickling a model never meets ctypes pointers.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


class Matrix(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("group", ctypes.c_int64)]


class Block(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("q", Matrix), ("k", Matrix), ("v", Matrix), ("out", Matrix),
                ("ffn_norm", ctypes.c_void_p),
                ("w_0", Matrix), ("w_1", Matrix), ("w_out", Matrix)]


SUBLAYERS = (("attn_norm",), ("attn", "project_q"), ("attn", "project_k"), ("attn", "project_v"),
             ("attn", "attention_out"), ("ffn_norm",), ("ffn",), ("ffn", "w_0"), ("ffn", "w_1"), ("ffn", "w_out"))


def _layers(model: nn.Module) -> list[nn.Module | None]:
    """Every module the description reads, in order (``None`` where a sublayer is absent)."""
    found = []
    for block in model.layers:
        for path in SUBLAYERS:
            module = block
            for name in path:
                module = getattr(module, name, None)
            found.append(module)
    return found


@dataclass(repr=False)
class Plan:
    blocks: ctypes.Array
    modules: list[nn.Module | None]
    tensors: list[Tensor]  # every tensor the description points into
    versions: list[tuple[int, int]]
    dim_ff: int
    eps: float

    def current(self, model: nn.Module) -> bool:
        """Whether no layer was replaced (an adapter attached), no weight tensor replaced and
        none changed in place since the description was made."""
        layers = _layers(model)
        if len(layers) != len(self.modules) or any(a is not b for a, b in zip(layers, self.modules)):
            return False
        tensors = _tensors(layers)
        return len(tensors) == len(self.tensors) and all(
            a is b and (a._version, a.data_ptr()) == v for a, b, v in zip(tensors, self.tensors, self.versions))


def _tensors(layers: list[nn.Module | None]) -> list[Tensor]:
    """The tensors a description of these layers points into, in order."""
    found = []
    for layer in layers:
        for name in ("weight", "weight_scale", "weight_zero"):
            tensor = getattr(layer, name, None) if layer is not None else None
            if isinstance(tensor, Tensor):
                found.append(tensor)
    return found


def _base_type(layer: nn.Module, base: type) -> bool:
    """Whether ``layer`` computes as a plain ``base`` here: it is one, or it is an adapter layer
    over one (its base weights are its own ``weight``; ``applies`` refused steps that run an adapter)."""
    return type(layer) is base or (isinstance(layer, base) and hasattr(layer, "delta_state"))


def _matrix(layer: nn.Module) -> Matrix | None:
    if _base_type(layer, nn.Linear) and not isinstance(layer, QuantizedLinear) and layer.bias is None \
            and not (layer._forward_hooks or layer._forward_pre_hooks):
        weight = layer.weight
        if weight.dtype not in KINDS or not weight.is_contiguous() or weight.device.type != "cpu":
            return None
        return Matrix(KINDS[weight.dtype], weight.data_ptr(), None, None, weight.size(0), weight.size(1), 0)
    if _base_type(layer, QuantizedLinear) and layer.native_layout():
        zero = layer.weight_zero.data_ptr() if layer.bits == 4 else None
        kind = KIND_I4 if layer.bits == 4 else KIND_W8A8 if layer.activations == "int8" else KIND_I8
        return Matrix(kind, layer.weight.data_ptr(), layer.weight_scale.data_ptr(), zero, layer.out_features,
                      layer.in_features, layer.group_size or 0)
    return None


def _norm(norm: nn.Module, norm_type: type) -> int | None:
    if not _base_type(norm, norm_type) or norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous():
        return None
    return norm.weight.data_ptr()


def _describe(block: nn.Module, norm_type: type, ffn_type: type) -> Block | None:
    """The C description of one block, or ``None`` when C does not compute what it does (a scaled
    residual, attention biases, a norm or FFN of another kind, a layer it cannot read)."""
    if getattr(block, "residual_scale", 1.0) != 1.0:
        return None
    description = Block()
    if hasattr(block, "attn"):
        if getattr(block.attn, "biased", False):
            return None
        names = ("project_q", "project_k", "project_v", "attention_out")
        parts = [_matrix(getattr(block.attn, name)) for name in names]
        norm = _norm(block.attn_norm, norm_type)
        if norm is None or any(p is None for p in parts):
            return None
        description.attn_norm = norm
        description.q, description.k, description.v, description.out = parts
    if hasattr(block, "ffn"):
        if type(block.ffn) is not ffn_type:
            return None
        parts = [_matrix(getattr(block.ffn, name)) for name in ("w_0", "w_1", "w_out")]
        norm = _norm(block.ffn_norm, norm_type)
        if norm is None or any(p is None for p in parts):
            return None
        description.ffn_norm = norm
        description.w_0, description.w_1, description.w_out = parts
    return description


def plan(model: nn.Module, norm_type: type, ffn_type: type) -> Plan | None:
    """The C description of ``model``'s blocks, or ``None`` when some layer must run in PyTorch
    (``norm_type`` / ``ffn_type``: the model's plain norm and feed-forward classes)."""
    cached = _PLANS.get(model)
    if cached is not None and cached.current(model):
        return cached
    blocks = [_describe(block, norm_type, ffn_type) for block in model.layers]
    if any(b is None for b in blocks):
        return None
    dim_ff = max([b.w_0.n for b in blocks if b.ffn_norm] or [1])
    layers = _layers(model)
    tensors = _tensors(layers)
    result = Plan((Block * len(blocks))(*blocks), layers, tensors, [(t._version, t.data_ptr()) for t in tensors],
                  dim_ff, model.config.eps)
    _PLANS[model] = result
    return result


# Rows of one step taken by C. More than the single products' ``native.MAX_ROWS``: a step reads
# each weight tile once for all its rows, and an engine's batch of up to 64 rows still decodes
# faster here than through PyTorch's blocks (``benchmarks/serve.py`` measures the batch).
STEP_MAX_ROWS = 64


def applies(model: nn.Module, hidden: Tensor, cache: object) -> bool:
    """Whether this step (one new position per row, at most ``STEP_MAX_ROWS`` rows, float32,
    inference, no adapter running) can go to C."""
    return (cache is not None and hidden.size(1) == 1 and hidden.dtype == torch.float32 and not model.training
            and 0 < hidden.size(0) <= STEP_MAX_ROWS and hidden.device.type == "cpu" and not torch.is_grad_enabled()
            and native.available() and not torch.is_autocast_enabled("cpu") and not _adapter_running(model))


def _adapter_running(model: nn.Module) -> bool:
    """Whether an attached adapter (``tune.delta``'s ``delta_state``) runs in this step, for the
    whole batch or for some of its rows: then the step stays on PyTorch's blocks."""
    state = getattr(model, "delta_state", None)
    if state is None:
        return False
    groups = state.row_groups()
    if groups is not None:
        return any(name is not None for name, _ in groups)
    return state.current() is not None


def decode_blocks(model: nn.Module, step: Plan, hidden: Tensor, bias: Tensor, cache: object) -> Tensor | None:
    """The blocks' output for ``hidden`` ``[rows, 1, dim]``, each row's keys and values stored at
    its cache column (``cache.write_columns()``), or ``None`` when the cache is not float32 and
    contiguous."""
    count = len(model.layers)
    keys, values = (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)()
    for index, block in enumerate(model.layers):
        if not hasattr(block, "attn"):
            continue
        key, value = cache.keys[index], cache.values[index]
        expected = (hidden.size(0), model.config.num_heads, cache.capacity, model.config.dim_head)
        if key is None or key.dtype != torch.float32 or not (key.is_contiguous() and value.is_contiguous()) \
                or key.shape != expected or value.shape != expected:
            return None
        keys[index], values[index] = key.data_ptr(), value.data_ptr()
    config = model.config
    out = hidden.reshape(hidden.size(0), -1).contiguous().clone()
    bias = bias.reshape(hidden.size(0), config.num_heads, -1).float().contiguous()
    columns = cache.write_columns().to(torch.int64).contiguous()
    if int(columns.max()) >= bias.size(-1):
        return None
    decode = native.decoder()
    stream = getattr(model, "weight_stream", None)

    def run(first: int, blocks: int) -> None:
        skip = first * ctypes.sizeof(ctypes.c_void_p)
        decode(ctypes.addressof(step.blocks) + first * ctypes.sizeof(Block), blocks, ctypes.addressof(keys) + skip,
               ctypes.addressof(values) + skip, out.data_ptr(), bias.data_ptr(),
               out.size(0), config.dim_model, config.num_heads, config.dim_head, step.dim_ff, cache.capacity,
               columns.data_ptr(), bias.size(-1), step.eps, torch.get_num_threads())

    if stream is None:
        run(0, count)
    else:  # block by block, so that streamed weights are fetched ahead and dropped after (model.streaming)
        for index in range(count):
            stream.before(index)
            run(index, 1)
            stream.after(index)
    return out.view_as(hidden)


__all__ = ["Plan", "STEP_MAX_ROWS", "applies", "decode_blocks", "plan"]
