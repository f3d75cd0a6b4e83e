"""A MoEfied FFN (``config.moe``): the gated-GELU FFN's neurons in ``experts`` equal, contiguous
blocks, a router that scores the blocks from the FFN's input, and the ``top_k`` best per token.

How a dense FFN becomes one (clustering its neurons, training the router) is
``cpmlive.compress.moefy``'s business; this module only runs it. With every expert on, it
computes exactly what the dense FFN did (its neurons are only permuted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.config import StackConfig


class MoEFeedForward(nn.Module):
    def __init__(self, config: StackConfig) -> None:
        super().__init__()
        moe = config.moe
        self.experts, self.top_k, self.router_kind = moe.experts, moe.top_k, moe.router
        self.size = config.dim_ff // moe.experts
        # the dense FFN's layer names, so the checkpoint keys are the same (and export as the dense FFN)
        self.w_0 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_1 = nn.Linear(config.dim_model, config.dim_ff, bias=False)
        self.w_out = nn.Linear(config.dim_ff, config.dim_model, bias=False)
        self.register_buffer("centroids", torch.zeros(moe.experts, config.dim_model))
        self.router = nn.Sequential(nn.Linear(config.dim_model, moe.router_hidden), nn.ReLU(),
                                    nn.Linear(moe.router_hidden, moe.experts))

    def activations(self, x: Tensor) -> Tensor:
        return F.gelu(self.w_0(x)) * self.w_1(x)

    def expert_norms(self, x: Tensor) -> Tensor:
        """The true activation norm of every expert, ``[..., experts]`` (the oracle's score)."""
        h = self.activations(x)
        return h.view(*h.shape[:-1], self.experts, self.size).norm(dim=-1)

    def scores(self, x: Tensor) -> Tensor:
        if self.router_kind == "oracle":
            return self.expert_norms(x)
        if self.router_kind == "similarity":
            return F.linear(x, self.centroids.to(x.dtype))
        return self.router(x)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        chosen = self.scores(x).topk(self.top_k, dim=-1).indices
        if x.numel() == x.size(-1):  # one row (decoding): compute only the chosen experts' neurons
            rows = (chosen.reshape(-1, 1) * self.size + torch.arange(self.size, device=x.device)).reshape(-1)
            h = F.gelu(F.linear(x, self.w_0.weight[rows])) * F.linear(x, self.w_1.weight[rows])
            return residual + F.linear(h, self.w_out.weight[:, rows])
        mask = torch.zeros(*x.shape[:-1], self.experts, dtype=x.dtype, device=x.device)
        mask.scatter_(-1, chosen, 1.0)
        h = self.activations(x) * mask.repeat_interleave(self.size, dim=-1)
        return residual + self.w_out(h)


__all__ = ["MoEFeedForward"]
