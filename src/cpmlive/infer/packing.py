"""When decoding reads oneDNN-blocked copies of the model's weights.

Batched and beam decoding multiply a few rows per step by every weight; from
``BLOCKED_MIN_ROWS`` rows on, a copy of each weight in oneDNN's blocked layout computes those
products faster (``model.kernels`` makes and reads the copies). A copy is as large as its
weight, so the copies exist only inside :func:`packed_weights`, which a generation enters when
it is worth it (:func:`packing_for`).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

from torch import Tensor, nn

from cpmlive.model.registry import families
from cpmlive.model.runtime.kernels import BLOCKED_MIN_ROWS, pack_weights, packable, unpack_weights
from cpmlive.model.stack import Attention, FeedForward

# A generation with fewer rows would never read the copies.
PACK_MIN_ROWS = BLOCKED_MIN_ROWS
# Packing costs about as much as a dozen batched steps save, so shorter generations skip it.
PACK_MIN_NEW_TOKENS = 16

_DEPTH = "_cpmlive_packing_depth"  # attribute of a model: how many ``packed_weights`` are open on it
_packing_lock = threading.Lock()


def packing_for(model: nn.Module, rows: int, max_new_tokens: int) -> AbstractContextManager:
    """``packed_weights(model)`` for a generation of ``rows`` rows and up to ``max_new_tokens``
    new tokens when packing pays for itself, else a context that does nothing."""
    worth = rows >= PACK_MIN_ROWS and max_new_tokens >= PACK_MIN_NEW_TOKENS
    return packed_weights(model) if worth else nullcontext()


@contextmanager
def packed_weights(model: nn.Module) -> Iterator[None]:
    """Inside, float32 CPU products of ``BLOCKED_MIN_ROWS``..``ONEDNN_MAX_ROWS`` rows read blocked
    copies of the model's plain ``Linear`` weights and of the tied head: one more copy of those
    weights in memory for as long as the outermost ``with`` lasts.

    Nested and interleaved uses (beam search inside ``generate_ids``, several streaming
    generators open at once) share one set of copies: the outermost entry packs, the last exit
    drops them. One model may also decode on several threads at once (nothing in the Python API
    binds it to one), so the count of open uses and the packing or dropping that goes with it
    happen under one lock: without it two threads could both pack (twice the memory for a
    while), and a lost update of the count could keep the copies for good or drop them while a
    generation still runs (it would go on correctly, but slower).
    """
    weights = _projection_weights(model)
    with _packing_lock:
        depth = getattr(model, _DEPTH, 0)
        if depth == 0:
            pack_weights(weights)
        setattr(model, _DEPTH, depth + 1)
    try:
        yield
    finally:
        with _packing_lock:
            setattr(model, _DEPTH, getattr(model, _DEPTH) - 1)
            if getattr(model, _DEPTH) == 0:
                unpack_weights(weights)


def _projection_weights(model: nn.Module) -> list[Tensor]:
    """The weights ``project`` reads directly (a tuned layer's inner base is not one) and the
    tied head of a family that packs it (``Family.packs_head``), those that can be packed."""
    weights = [child.weight for module in model.modules() if _packed_kind(module)
               for child in module.children() if type(child) is nn.Linear and child.bias is None]
    packs_head = tuple(entry.model for entry in families().values() if entry.packs_head)
    weights += [module.input_embedding.weight for module in model.modules() if isinstance(module, packs_head)]
    return [weight for weight in weights if packable(weight)]


def _packed_kind(module: nn.Module) -> bool:
    """Whether ``module``'s products read blocked copies: the bias-free attention and the gated FFN
    (CPM-1's biased attention and MLP keep their plain weights)."""
    return isinstance(module, FeedForward) or (isinstance(module, Attention) and not module.biased)


__all__ = ["PACK_MIN_NEW_TOKENS", "PACK_MIN_ROWS", "packed_weights", "packing_for"]
