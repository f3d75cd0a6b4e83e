"""A short name for a model's weights, used to tell whether an adapter belongs to a model.

16 hex digits over the config (without its storage dtype) and, per tensor, its name, shape and a
fixed sample of ``HASH_SAMPLES`` values rounded to float16: the same weights stored in fp16 or
fp32 hash alike, and reading ~1k values per tensor keeps it fast on a 10B model. Weights that
differ only outside the samples are not told apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from cpmlive.errors import CpmliveError

HASH_SAMPLES = 1024


def weights_fingerprint(config: dict[str, Any], state: dict[str, Tensor]) -> str:
    described = {k: v for k, v in config.items() if k != "half"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for key, tensor in sorted(state.items()):
        digest.update(f"{key}:{list(tensor.shape)};".encode())
        digest.update(_sample(tensor))
    return digest.hexdigest()[:16]


def _sample(tensor: Tensor) -> bytes:
    if tensor.is_meta:
        raise CpmliveError("cannot hash a model on the meta device (it has no weights)")
    flat = tensor.detach().reshape(-1)
    if flat.numel() > HASH_SAMPLES:
        index = torch.arange(HASH_SAMPLES, dtype=torch.int64) * (flat.numel() - 1) // (HASH_SAMPLES - 1)
        flat = flat[index.to(flat.device)]
    return flat.to(torch.float16).cpu().numpy().tobytes()


__all__ = ["HASH_SAMPLES", "weights_fingerprint"]
