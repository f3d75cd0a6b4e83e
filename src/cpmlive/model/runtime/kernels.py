"""CPU product paths for the model: how a projection and attention are computed, never what.

* :func:`project`: one bias-free linear product followed by a named :data:`Epilogue`.
  Outside autograd and autocast, a product of at most ``native.MAX_ROWS`` rows (a decoding
  step) goes to our own matrix-vector loops (:mod:`cpmlive.model.runtime.native`) when they are built;
  otherwise a float32 product of at most ``ONEDNN_MAX_ROWS`` rows goes to oneDNN's inner
  product, which streams a plain ``[out, in]`` weight faster than the BLAS call behind
  ``F.linear`` on CPU and applies the epilogue in the same call; everything else (training,
  bf16 autocast, prompts) stays on ``F.linear``.
* :func:`pack_weights` / :func:`unpack_weights`: the mechanism of oneDNN-blocked weight copies,
  which products of ``BLOCKED_MIN_ROWS``..``ONEDNN_MAX_ROWS`` rows read while the weight is
  unchanged. When to make them is inference policy (``cpmlive.infer.packing``).
* :func:`attention`: ``softmax(q kᵀ / sqrt(d_head) + bias) v``, fused or as explicit products.

Every path computes the same values as the plain PyTorch expression; measurements behind the
choices are in ``benchmarks/README.md`` ("What the model code does for speed").
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cpmlive.model.runtime.native as native

Epilogue = Literal["none", "gelu", "silu", "gate", "residual"]
# Whether each epilogue takes the ``other`` tensor, and the oneDNN binary op of those that do.
_TAKES_OTHER = {"none": False, "gelu": False, "silu": False, "gate": True, "residual": True}
_ONEDNN_UNARY = {"gelu": "gelu", "silu": "swish"}
_ONEDNN_BINARY = {"gate": "mul", "residual": "add"}

_ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                  if torch.backends.mkldnn.is_available() else None)
_ONEDNN_REORDER = (getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
                   if _ONEDNN_LINEAR is not None else None)
# oneDNN compiles and keeps a kernel per shape (~1 MB each): rows are capped so that decoding
# steps (one row per sequence) use it and prompts, whose lengths vary, do not.
ONEDNN_MAX_ROWS = 16
# The blocked copy beats the plain weight from this many rows on; with fewer it is slower.
BLOCKED_MIN_ROWS = 3
_PACKED = "_cpmlive_packed"  # attribute of a weight tensor: (its version when packed, the copy)

# The explicit attention path makes its scores in pieces of at most this many elements (2 MB in
# bf16): pieces that small are served again and again from the same heap memory, where one
# [B, H, Lq, Lk] tensor would be mapped and page-faulted afresh by every layer.
SCORE_PIECE_ELEMENTS = 1 << 20


# ---- projections --------------------------------------------------------------------------------


def project(x: Tensor, layer: nn.Linear | Tensor, epilogue: Epilogue = "none",
            other: Tensor | None = None) -> Tensor:
    """``layer(x)`` (a bias-free ``nn.Linear`` or a bare ``[out, in]`` weight), then the epilogue:

    * ``"none"``: the product itself;
    * ``"gelu"``: GELU (erf form) of it;
    * ``"silu"``: SiLU (swish) of it;
    * ``"gate"``: ``other * product`` (the FFN's gating);
    * ``"residual"``: ``other + product`` (the residual sum).

    Anything but a plain, hook-free, bias-free ``Linear`` (a tuned layer) is simply called.
    """
    _check_epilogue(epilogue, other)
    weight = _plain_weight(layer)
    if weight is not None and _native(x, weight):
        return _apply_epilogue(native.matvec(x, weight).to(x.dtype), epilogue, other, in_place=True)
    if weight is not None and _onednn(x, weight):
        out = _onednn_project(x, _blocked(x, weight), epilogue, other)
        if out is not None:
            return out
    if weight is not None and weight.dtype != x.dtype and weight.is_floating_point():
        layer = weight.to(x.dtype)  # weights kept in their stored half dtype, computed in x's (exact)
    out = F.linear(x, layer) if isinstance(layer, Tensor) else layer(x)
    # Outside autograd our own fresh product takes the GELU or the gate in place, so a prompt's
    # FFN holds one fewer [rows, d_ff] tensor at its peak.
    return _apply_epilogue(out, epilogue, other, in_place=weight is not None and not torch.is_grad_enabled())


def _check_epilogue(epilogue: str, other: Tensor | None) -> None:
    takes_other = _TAKES_OTHER.get(epilogue)
    if takes_other is None:
        raise ValueError(f"unknown epilogue {epilogue!r}; one of {', '.join(_TAKES_OTHER)}")
    if takes_other != (other is not None):
        raise ValueError(f"epilogue {epilogue!r} {'needs' if takes_other else 'takes no'} other tensor")


def _plain_weight(layer: nn.Linear | Tensor) -> Tensor | None:
    """The weight a product may read directly, or ``None`` when the layer must be called."""
    if isinstance(layer, Tensor):
        return layer
    plain = (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
             and not layer._forward_pre_hooks)
    return layer.weight if plain else None


def _native(x: Tensor, weight: Tensor) -> bool:
    return (native.applies(x) and weight.dtype in native.FLOAT_WEIGHTS and weight.is_contiguous()
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


def _onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN: float32 on CPU, few rows, no autograd or autocast."""
    return (_ONEDNN_LINEAR is not None and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.device.type == "cpu" and weight.is_contiguous()
            and 0 < x.numel() <= ONEDNN_MAX_ROWS * x.size(-1) and not torch.is_autocast_enabled("cpu"))


def _onednn_project(x: Tensor, weight: Tensor, epilogue: Epilogue, other: Tensor | None) -> Tensor | None:
    """The fused oneDNN product, or ``None`` when ``other`` is not a float32 contiguous tensor of
    the output's shape (the caller then computes it with ``F.linear``)."""
    if epilogue in _ONEDNN_UNARY:
        return _ONEDNN_LINEAR(x, weight, None, _ONEDNN_UNARY[epilogue], [], "none" if epilogue == "gelu" else "")
    if other is None:
        return _ONEDNN_LINEAR(x, weight, None, "none", [], "")
    fits = other.dtype == torch.float32 and other.shape == (*x.shape[:-1], weight.size(0))
    if fits and other.is_contiguous():
        return _ONEDNN_LINEAR.binary(x, other, weight, None, _ONEDNN_BINARY[epilogue])
    return None


def _apply_epilogue(out: Tensor, epilogue: Epilogue, other: Tensor | None, in_place: bool) -> Tensor:
    if epilogue == "gelu":
        return torch.ops.aten.gelu_(out) if in_place else F.gelu(out)
    if epilogue == "silu":
        return F.silu(out, inplace=in_place)
    if epilogue == "gate":
        return out.mul_(other) if in_place and other.dtype == out.dtype else other * out
    return out if other is None else other + out


# ---- blocked weight copies ----------------------------------------------------------------------


def packable(weight: Tensor) -> bool:
    """Whether ``weight`` can get a blocked copy (a contiguous float32 CPU tensor)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()


@torch.no_grad()
def pack_weights(weights: Iterable[Tensor]) -> None:
    """Attach to each weight a copy in oneDNN's blocked layout for ``ONEDNN_MAX_ROWS`` rows (as
    large as the weight; nothing happens without oneDNN). :func:`project` reads the copy for
    products of ``BLOCKED_MIN_ROWS`` rows or more while the weight is unchanged in place."""
    if _ONEDNN_REORDER is None:
        return
    for weight in weights:
        setattr(weight, _PACKED, (weight._version, _ONEDNN_REORDER(weight, ONEDNN_MAX_ROWS)))


def unpack_weights(weights: Iterable[Tensor]) -> None:
    """Drop the blocked copies :func:`pack_weights` attached."""
    for weight in weights:
        if hasattr(weight, _PACKED):
            delattr(weight, _PACKED)


def _blocked(x: Tensor, weight: Tensor) -> Tensor:
    """The packed copy of ``weight`` when one is current and ``x`` has enough rows."""
    packed = getattr(weight, _PACKED, None)
    if packed is not None and packed[0] == weight._version and x.numel() >= BLOCKED_MIN_ROWS * x.size(-1):
        return packed[1]
    return weight


# ---- attention ----------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ * scale + bias) v`` over ``[B, H, L, d_head]``; ``bias`` is ``[B, H, Lq, Lk]``;
    ``scale`` is ``1 / sqrt(d_head)`` unless given.

    On CPU two cases beat the fused kernel with explicit batched products: one query row
    (decoding), where the fused kernel's setup dominates, and bf16 (autocast), where the fused
    kernel is no faster than in float32 and, when the bias needs a gradient (training: the
    position bias learns), falls back to a float32 path slower than bf16 products.
    The explicit path keeps scores and probabilities in the inputs' dtype, as Megatron's fused
    softmax does. Float32 prompts and training keep the fused kernel, which is exact and faster.
    """
    bias = bias.to(q.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    single_row = q.size(2) == 1 and not needs_grad and dropout_p == 0.0
    if q.device.type != "cpu" or not (single_row or q.dtype in (torch.bfloat16, torch.float16)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    batch, heads, length, dim = q.shape
    rows, keys = batch * heads, k.size(2)
    q, k, v = q.reshape(rows, length, dim), k.reshape(rows, keys, dim), v.reshape(rows, keys, v.size(-1))
    bias = bias.reshape(rows, length, keys)
    scale = dim**-0.5 if scale is None else scale
    if needs_grad or dropout_p > 0.0:  # autograd keeps every piece anyway: one piece
        out = _explicit_attention(q, k, v, bias, dropout_p, scale)
    else:
        out = _pieced_attention(q, k, v, bias, scale)
    return out.view(batch, heads, length, -1)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, scale: float) -> Tensor:
    """Attention over ``[rows, L, d_head]`` in one piece (the autograd and dropout path)."""
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p > 0.0 else scores.softmax(dim=-1)
    return torch.bmm(probs, v)


def _pieced_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Attention over ``[rows, L, d_head]`` with scores of at most ``SCORE_PIECE_ELEMENTS``."""
    rows, length, dim = q.shape
    out = q.new_empty(rows, length, v.size(-1))
    step = max(1, SCORE_PIECE_ELEMENTS // (length * k.size(1)))
    for first in range(0, rows, step):
        piece = slice(first, first + step)
        scores = torch.baddbmm(bias[piece], q[piece], k[piece].transpose(1, 2), alpha=scale)
        torch.bmm(scores.softmax(dim=-1), v[piece], out=out[piece])
    return out


__all__ = ["BLOCKED_MIN_ROWS", "Epilogue", "ONEDNN_MAX_ROWS", "attention", "pack_weights", "packable",
           "project", "unpack_weights"]
