"""A stack's plain pre-norm blocks for one decoding step in a single native call (``csrc/decode.c``).

A decoding step of a ~450M model does about 150 small products and as many small element-wise
operations; from Python each costs tens of microseconds of dispatch, as much as the int8 weights
take to stream. :func:`decode_blocks` hands the whole stack of blocks to C instead: it computes
what the blocks' forward computes for one new position per row (``model.stack.Block`` of CPM-Ant,
``model.decoder.DecoderBlock`` of Llama and its kin), writing keys and values into the model's own
:class:`~cpmlive.model.cache.KVCache` tensors, so prompts (prefilled by PyTorch) and steps share one
cache. Embedding, attention bias (masks), rotary cos / sin, final norm and head stay in PyTorch.

What C computes of a block: RMS norms or LayerNorms, q / k / v / output products of float32,
float16, bfloat16 or our quantized layers, their biases, grouped key / value heads, per-head q / k
RMS norms, a half-split rotation of the first dims of each head, an additive bias per block (so
sliding windows are masks), the GELU or SiLU gated FFN or GPT-2's MLP (biases, tanh GELU), and a
residual scale of the decoder's kind ``h = (h / s + branch) * s`` or of the stack's (CPM-Bee's)
``h = (h + branch) / s``. :func:`plan` says whether a model can take this path (no other
attention, such as latent attention; no adapters or experts; float32 norms, biases, activations and
cache) and describes its layers to C once; the description is rebuilt when a weight changes.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from dataclasses import dataclass
from typing import Callable

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
    _fields_ = [("attn_norm", ctypes.c_void_p), ("attn_norm_bias", ctypes.c_void_p),
                ("q", Matrix), ("k", Matrix), ("v", Matrix), ("out", Matrix),
                ("bias_q", ctypes.c_void_p), ("bias_k", ctypes.c_void_p), ("bias_v", ctypes.c_void_p),
                ("bias_out", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("ffn_norm", ctypes.c_void_p), ("ffn_norm_bias", ctypes.c_void_p),
                ("w_0", Matrix), ("w_1", Matrix), ("w_out", Matrix), ("bias_in", ctypes.c_void_p),
                ("bias_ffn_out", ctypes.c_void_p), ("activation", ctypes.c_int64), ("layer_norm", ctypes.c_int64),
                ("cross_norm", ctypes.c_void_p), ("cross_q", Matrix), ("cross_out", Matrix)]


class Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("rows", "dim", "heads", "kv_heads", "dim_head", "dim_ff",
                                                    "capacity", "keys", "bias_heads", "rotary_dim")] + [
        ("columns", ctypes.c_void_p), ("cache_rows", ctypes.c_void_p), ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("eps", ctypes.c_float), ("residual_scale", ctypes.c_float), ("threads", ctypes.c_int),
        ("divides", ctypes.c_int), ("scale", ctypes.c_float), ("cross_keys", ctypes.c_int64),
        ("cross_key_caches", ctypes.c_void_p), ("cross_value_caches", ctypes.c_void_p), ("cross_bias", ctypes.c_void_p)]


ACTIVATIONS = {"gelu": 0, "silu": 1, "gelu_tanh": 3}  # of a gated feed-forward
UNGATED = {"gelu_tanh": 2, "relu": 4}  # of ``w_out(act(w_in x [+ bias_in]) [+ bias_out])``
BIASES = ("bias_q", "bias_k", "bias_v", "bias_out")
SUBLAYERS = (("attn_norm",), ("attn",), ("attn", "project_q"), ("attn", "project_k"), ("attn", "project_v"),
             ("attn", "attention_out"), ("attn", "q_norm"), ("attn", "k_norm"), ("cross_norm",), ("cross",),
             ("cross", "project_q"), ("cross", "attention_out"), ("ffn_norm",), ("ffn",),
             ("ffn", "w_0"), ("ffn", "w_1"), ("ffn", "w_in"), ("ffn", "w_out"))
TENSORS = ("weight", "weight_scale", "weight_zero", "bias", "bias_in", *BIASES)

Slot = tuple[dict, str, object]  # the table of a module's attributes that holds a name, and what it held


def _slot(owner: nn.Module, name: str) -> Slot:
    """Where ``owner`` keeps ``name`` (its parameters, buffers, submodules or plain attributes)
    and what it holds there (``None``: nothing). Replacing a parameter, buffer or submodule
    changes the entry of its own table, so the step's check reads one dictionary per slot."""
    for table in (owner._parameters, owner._buffers, owner._modules, owner.__dict__):
        if name in table:
            return table, name, table[name]
    return owner._modules, name, None


def _slots(model: nn.Module) -> list[Slot]:
    """Every module and tensor the description reads, each with its owner (a sublayer may be absent: ``None``)."""
    found: list[Slot] = [_slot(model, "layers")]
    for index, block in enumerate(model.layers):
        found.append(_slot(model.layers, str(index)))
        for path in SUBLAYERS:
            owner: object = block
            for name in path[:-1]:
                owner = _slot(owner, name)[2]
                if owner is None:
                    break
            if owner is None:
                continue
            found.append(_slot(owner, path[-1]))
            module = found[-1][2]
            if isinstance(module, nn.Module):
                found += [slot for name in TENSORS if isinstance((slot := _slot(module, name))[2], Tensor)]
    return found


@dataclass(repr=False)
class Plan:
    blocks: ctypes.Array
    slots: tuple[tuple, tuple, tuple]  # the tables, names and held objects of every slot (``_slots``)
    tensors: list[Tensor]  # every tensor the description points into
    versions: list[tuple[int, int]]
    dim_ff: int
    eps: float
    residual_scale: float  # the decoder's kind: h = (h / s + branch) * s
    divisor: float = 1.0  # model.stack.Block's kind: h = (h + branch) / s
    kinds: tuple[type, type] | None = None  # the norm and feed-forward classes it was made for
    scale: float = 0.0  # of q kᵀ (0: 1 / sqrt(dim_head))
    cross: bool = False  # whether blocks cross-attend (an encoder-decoder's decoder)

    def current(self, model: nn.Module) -> bool:
        """Whether no layer was replaced (an adapter attached), no weight tensor replaced and
        none changed in place since the description was made."""
        tables, names, held = self.slots
        return (model._modules.get("layers") is held[0] and len(held[0]) == len(self.blocks)
                and all(map(operator.is_, map(dict.get, tables, names), held))
                and [(t._version, t.data_ptr()) for t in self.tensors] == self.versions)


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


def _vector(tensor: Tensor | None) -> int | None:
    """The address of a float32 vector C may read (``None`` when it is another kind)."""
    if tensor is None or tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return None
    return tensor.data_ptr()


def _norm(norm: nn.Module, norm_type: type, eps: float) -> tuple[int, int | None] | None:
    """The weight (and a LayerNorm's bias) of a norm C computes: an RMS norm, or a LayerNorm over
    the last dimension with float32 weight and bias."""
    if not _base_type(norm, norm_type) or getattr(norm, "eps", eps) != eps:
        return None
    weight = _vector(getattr(norm, "weight", None))
    if not isinstance(norm, nn.LayerNorm):
        return None if weight is None else (weight, None)
    bias = getattr(norm, "bias", None)
    if weight is None or len(norm.normalized_shape) != 1 or (bias is not None and _vector(bias) is None):
        return None
    return weight, None if bias is None else bias.data_ptr()


def _describe_attention(attn: nn.Module, description: Block, norm_type: type, eps: float) -> bool:
    """Fill in the attention part of ``description``; ``False`` when C does not compute ``attn``
    (it lacks one of the four products, as latent attention does, or has parts C cannot read)."""
    names = ("project_q", "project_k", "project_v", "attention_out")
    parts = [_matrix(getattr(attn, name, None)) for name in names]
    if any(p is None for p in parts):
        return False
    description.q, description.k, description.v, description.out = parts
    for name in BIASES:
        bias = getattr(attn, name, None)
        if bias is not None and _vector(bias) is None:
            return False
        setattr(description, name, None if bias is None else bias.data_ptr())
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is not None:  # C computes per-head RMS norms only: of the model's own RMS norm class
            pointer = None if isinstance(norm, nn.LayerNorm) else _norm(norm, norm_type, eps)
            if pointer is None or pointer[1] is not None:
                return False
            setattr(description, name, pointer[0])
    return True


def _describe(block: nn.Module, norm_type: type, ffn_type: type, eps: float) -> Block | None:
    """The C description of one block, or ``None`` when C does not compute what it does (attention
    or a norm or feed-forward part of another kind, a layer it cannot read)."""
    description = Block()
    description.layer_norm = int(issubclass(norm_type, nn.LayerNorm))
    if hasattr(block, "attn"):
        norm = _norm(block.attn_norm, norm_type, eps)
        if norm is None or not _describe_attention(block.attn, description, norm_type, eps):
            return None
        description.attn_norm, description.attn_norm_bias = norm
    if hasattr(block, "cross"):
        norm = _norm(block.cross_norm, norm_type, eps)
        parts = [_matrix(getattr(block.cross, name, None)) for name in ("project_q", "attention_out")]
        if norm is None or norm[1] is not None or any(p is None for p in parts):
            return None
        description.cross_norm = norm[0]
        description.cross_q, description.cross_out = parts
    if hasattr(block, "ffn"):
        norm = _norm(block.ffn_norm, norm_type, eps)
        if norm is None or type(block.ffn) is not ffn_type or not _describe_ffn(block.ffn, description):
            return None
        description.ffn_norm, description.ffn_norm_bias = norm
    return description


def _describe_ffn(ffn: nn.Module, description: Block) -> bool:
    """Fill in the feed-forward part: gated (``w_0``, ``w_1``, GELU (either form) or SiLU), GPT-2's
    MLP (``w_in`` + ``bias_in``, tanh GELU, ``w_out`` + ``bias_out``) or T5 v1.0's (``w_in``, ReLU,
    ``w_out``, no biases)."""
    if hasattr(ffn, "w_in"):
        parts = [_matrix(ffn.w_in), _matrix(ffn.w_out)]
        biases = [getattr(ffn, name, None) for name in ("bias_in", "bias_out")]
        pointers = [None if bias is None else _vector(bias) for bias in biases]
        activation = UNGATED.get(getattr(ffn, "activation", "gelu_tanh"))
        if activation is None or any(p is None for p in parts) or any(
                b is not None and p is None for b, p in zip(biases, pointers)):
            return False
        description.w_0, description.w_out = parts
        description.bias_in, description.bias_ffn_out = pointers
        description.activation = activation
        return True
    activation = ACTIVATIONS.get(getattr(ffn, "activation", None))
    parts = [_matrix(getattr(ffn, name)) for name in ("w_0", "w_1", "w_out")]
    if activation is None or any(p is None for p in parts):
        return False
    description.w_0, description.w_1, description.w_out = parts
    description.activation = activation
    return True


def plan(model: nn.Module, norm_type: type, ffn_type: type, residual_scale: float = 1.0) -> Plan | None:
    """The C description of ``model``'s blocks, or ``None`` when some layer must run in PyTorch
    (``norm_type`` / ``ffn_type``: the model's plain norm and feed-forward classes;
    ``residual_scale``: ``s`` of blocks that compute ``h = (h / s + branch) * s``)."""
    cached = _PLANS.get(model)
    if cached is not None and cached.residual_scale == residual_scale and cached.kinds == (norm_type, ffn_type) \
            and cached.current(model):
        return cached
    eps = model.config.eps
    divisors = {float(getattr(block, "residual_scale", 1.0)) for block in model.layers}
    if len(divisors) > 1 or (residual_scale != 1.0 and divisors != {1.0}):
        return None  # blocks of different scales, or both kinds of scale
    blocks = [_describe(block, norm_type, ffn_type, eps) for block in model.layers]
    scales = {getattr(block.attn, "scale", None) or 0.0 for block in model.layers if hasattr(block, "attn")}
    scales |= {block.cross.scale for block in model.layers if hasattr(block, "cross")}
    if any(b is None for b in blocks) or len(scales) > 1:
        return None
    dim_ff = max([b.w_0.n for b in blocks if b.ffn_norm] or [1])
    slots = _slots(model)
    tensors = [held for _, _, held in slots if isinstance(held, Tensor)]
    versions = [(t._version, t.data_ptr()) for t in tensors]
    result = Plan((Block * len(blocks))(*blocks), tuple(zip(*slots)), tensors, versions, dim_ff, eps, residual_scale,
                  divisors.pop() if divisors else 1.0, (norm_type, ffn_type), next(iter(scales), 0.0),
                  any(hasattr(block, "cross") for block in model.layers))
    _PLANS[model] = result
    return result


# New positions of one step taken by C (rows x positions per row). More than the single products'
# ``native.MAX_ROWS``: a step reads each weight tile once for all its rows, and an engine's batch
# of up to 64 rows still decodes faster here than through PyTorch's blocks (``benchmarks/serve.py``
# measures the batch).
STEP_MAX_ROWS = 64
# Positions per row a step may take: one, or a speculative step's token and its drafted ones.
STEP_MAX_POSITIONS = 33


def applies(model: nn.Module, hidden: Tensor, cache: object) -> bool:
    """Whether this step (a few new positions per row after a cache, at most ``STEP_MAX_ROWS`` in
    all, float32, inference, no adapter running) can go to C."""
    rows, positions = hidden.size(0), hidden.size(1)
    return (cache is not None and 0 < positions <= STEP_MAX_POSITIONS and hidden.dtype == torch.float32
            and not model.training and 0 < rows * positions <= STEP_MAX_ROWS and hidden.device.type == "cpu"
            and not torch.is_grad_enabled() and (positions == 1 or cache.length > 0)
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


Bias = Tensor | Callable[[nn.Module], Tensor]


def _cross_caches(model: nn.Module, cache: object, rows: int) -> tuple[ctypes.Array, ctypes.Array] | None:
    """Each block's cross-attention keys and values (cache layer ``len(blocks) + i``: an
    encoder-decoder's cache), or ``None`` when one is not float32 and contiguous."""
    count = len(model.layers)
    keys, values = (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)()
    expected = (rows, model.config.num_heads, cache.capacity, model.config.dim_head)
    for index, block in enumerate(model.layers):
        if not hasattr(block, "cross"):
            continue
        key, value = cache.keys[count + index], cache.values[count + index]
        if key is None or any(t.dtype != torch.float32 or not t.is_contiguous() or t.shape != expected
                              for t in (key, value)):
            return None
        keys[index], values[index] = key.data_ptr(), value.data_ptr()
    return keys, values


def decode_blocks(model: nn.Module, step: Plan, hidden: Tensor, bias: Bias, cache: object,
                  rotation: tuple[Tensor, Tensor] | None = None, cross_bias: Tensor | None = None) -> Tensor | None:
    """The blocks' output for ``hidden`` ``[rows, n, dim]``, row ``r``'s keys and values stored at
    its cache columns ``cache.write_columns()[r] + 0 .. n - 1``, or ``None`` when the cache is not
    float32 and contiguous. ``bias``: the additive attention bias ``[rows, heads or 1, n, keys]``
    of every block, or a function giving each block with attention its own; ``rotation``: cos and
    sin ``[rows, n, rotary_dim]`` of the new positions (``None``: no rotary embedding);
    ``cross_bias``: ``[rows, 1, 1, encoder columns]``, the encoder's padding masked for the
    cross-attention of blocks that have one. To C, each new position is a row of its own that
    reads and writes its sequence's cache row."""
    config = model.config
    rows, positions, count = hidden.size(0), hidden.size(1), len(model.layers)
    queries = rows * positions
    kv_heads = getattr(config, "num_kv_heads", config.num_heads)
    keys, values = (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)()
    biases, held = (ctypes.c_void_p * count)(), {}
    for index, block in enumerate(model.layers):
        if not hasattr(block, "attn"):
            continue
        key, value = cache.keys[index], cache.values[index]
        expected = (rows, kv_heads, cache.capacity, config.dim_head)
        if key is None or key.dtype != torch.float32 or not (key.is_contiguous() and value.is_contiguous()) \
                or key.shape != expected or value.shape != expected:
            return None
        keys[index], values[index] = key.data_ptr(), value.data_ptr()
        mine = bias(block) if callable(bias) else bias
        if id(mine) not in held:  # blocks of one window share their mask: one float32 copy each
            per_query = mine.reshape(rows, mine.size(1), positions, -1).transpose(1, 2)
            held[id(mine)] = per_query.reshape(queries, mine.size(1), -1).float().contiguous()
        biases[index] = held[id(mine)].data_ptr()
    starts = cache.write_columns().to(torch.int64)
    columns = (starts[:, None] + torch.arange(positions, device=starts.device)).reshape(-1).contiguous()
    cache_rows = torch.arange(rows, device=starts.device).repeat_interleave(positions).contiguous()
    shapes = {tensor.shape for tensor in held.values()} or {(queries, 1, int(columns.max()) + 1)}
    if len(shapes) != 1:
        return None
    _, bias_heads, key_count = shapes.pop()
    if bias_heads not in (1, config.num_heads) or int(columns.max()) >= key_count:
        return None
    cross = None
    if step.cross != (cross_bias is not None):
        return None
    if cross_bias is not None:
        caches = _cross_caches(model, cache, rows)
        if caches is None:
            return None
        per_query = cross_bias.reshape(rows, 1, -1).expand(rows, positions, -1)
        cross = (*caches, per_query.reshape(queries, -1).float().contiguous())
    out = hidden.reshape(queries, -1).contiguous().clone()
    cos, sin = (None, None) if rotation is None else (t.reshape(queries, -1).float().contiguous() for t in rotation)
    shape = Step(rows=queries, dim=config.dim_model, heads=config.num_heads, kv_heads=kv_heads,
                 dim_head=config.dim_head, dim_ff=step.dim_ff, capacity=cache.capacity, keys=key_count,
                 bias_heads=bias_heads, rotary_dim=0 if cos is None else cos.size(-1), columns=columns.data_ptr(),
                 cache_rows=None if positions == 1 else cache_rows.data_ptr(),
                 cos=None if cos is None else cos.data_ptr(), sin=None if sin is None else sin.data_ptr(),
                 eps=step.eps, residual_scale=step.residual_scale if step.divisor == 1.0 else step.divisor,
                 threads=torch.get_num_threads(), divides=int(step.divisor != 1.0), scale=step.scale)
    if cross is not None:
        shape.cross_keys, shape.cross_bias = cross[2].size(1), cross[2].data_ptr()
    decode = native.decoder()
    stream = getattr(model, "weight_stream", None)

    def run(first: int, blocks: int) -> None:
        skip = first * ctypes.sizeof(ctypes.c_void_p)
        if cross is not None:
            shape.cross_key_caches, shape.cross_value_caches = (ctypes.addressof(c) + skip for c in cross[:2])
        decode(ctypes.addressof(step.blocks) + first * ctypes.sizeof(Block), blocks, ctypes.byref(shape),
               ctypes.addressof(keys) + skip, ctypes.addressof(values) + skip, ctypes.addressof(biases) + skip,
               out.data_ptr())

    if stream is None:
        run(0, count)
    else:  # block by block, so that streamed weights are fetched ahead and dropped after (model.streaming)
        for index in range(count):
            stream.before(index)
            run(index, 1)
            stream.after(index)
    return out.view_as(hidden)


def decode_step(model: nn.Module, hidden: Tensor, cache: object, norm_type: type, ffn_type: type, bias: Bias,
                rotation: tuple[Tensor, Tensor] | None = None, residual_scale: float = 1.0,
                cross_bias: Tensor | None = None) -> Tensor | None:
    """The blocks' output of this decoding step from one native call, the cache moved past it, or
    ``None`` (nothing done) when the step or a layer must run in PyTorch (see :func:`plan` and
    :func:`decode_blocks` for the arguments)."""
    if not applies(model, hidden, cache):
        return None
    step = plan(model, norm_type, ffn_type, residual_scale)
    decoded = None if step is None else decode_blocks(model, step, hidden, bias, cache, rotation, cross_bias)
    if decoded is not None:
        cache.advance(hidden.size(1))
    return decoded


__all__ = ["Plan", "STEP_MAX_ROWS", "applies", "decode_blocks", "decode_step", "plan"]
