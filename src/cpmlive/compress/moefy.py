"""MoEfication (Zhang et al., 2022): split each FFN into experts and run only the top-k per token.

* **Experts** by balanced clustering: each intermediate neuron is the unit vector of its two
  input rows ``[w_0; w_1]``; balanced spherical k-means groups neurons that respond to the same
  inputs into ``experts`` clusters of equal size, and the FFN's neurons are permuted so that each
  expert is a contiguous block (a permutation of FFN neurons changes nothing the FFN computes).
* **Routers** score the experts from the FFN's input ``x``:
  ``similarity``: ``x`` against each expert's mean ``w_0`` row (no training);
  ``mlp``: a small predictor (``x -> hidden -> experts``) trained on calibration inputs to pick the
  experts with the largest activation norm;
  ``oracle``: the true activation norm of every expert (the whole FFN computed: an upper bound for
  the analysis, not a speed-up).
* **Inference**: the ``top_k`` experts per token; a single row computes only their neurons.

CPM-Ant's FFN is gated GELU, ``gelu(w_0 x) * (w_1 x)``, which is not ReLU-sparse: hardly any
activation is exactly zero. :func:`activation_sparsity` reports how sparse it actually is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmlive.compress.quantize import feed_inputs
from cpmlive.model.ant.config import AntConfig
from cpmlive.config import MoEConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.ant.model import CpmAnt
from cpmlive.model.runtime.moe import MoEFeedForward
from cpmlive.model.stack import FeedForward


def balanced_clusters(vectors: Tensor, experts: int, iterations: int = 15, seed: int = 0) -> Tensor:
    """Cluster of every row of ``vectors`` (cosine similarity), every cluster the same size."""
    count = vectors.size(0)
    if experts < 1 or count % experts:
        raise CpmliveError(f"moefy: {experts} experts do not split {count} FFN neurons evenly")
    size = count // experts
    units = F.normalize(vectors.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = units[torch.randperm(count, generator=generator)[:experts]].clone()
    assignment = torch.zeros(count, dtype=torch.long)
    for _ in range(iterations):
        order = (units @ centroids.T).flatten().argsort(descending=True).tolist()
        chosen, filled, placed = [-1] * count, [0] * experts, 0
        for flat in order:  # the best remaining (neuron, cluster) pair first, clusters capped at `size`
            neuron, cluster = divmod(flat, experts)
            if chosen[neuron] < 0 and filled[cluster] < size:
                chosen[neuron] = cluster
                filled[cluster] += 1
                placed += 1
                if placed == count:
                    break
        assignment = torch.tensor(chosen)
        for cluster in range(experts):
            centroids[cluster] = F.normalize(units[assignment == cluster].mean(dim=0), dim=0)
    return assignment


def moe_from_dense(ffn: FeedForward, config: AntConfig, seed: int = 0) -> MoEFeedForward:
    """The MoE form of a dense FFN: its neurons clustered and permuted into expert blocks, each
    expert's mean ``w_0`` row as the similarity router's centroid (the MLP router untrained)."""
    moe = config.moe
    assignment = balanced_clusters(torch.cat([ffn.w_0.weight, ffn.w_1.weight], dim=1).detach(), moe.experts, seed=seed)
    order = assignment.argsort(stable=True)
    layer = MoEFeedForward(config)
    with torch.no_grad():
        layer.w_0.weight.copy_(ffn.w_0.weight[order])
        layer.w_1.weight.copy_(ffn.w_1.weight[order])
        layer.w_out.weight.copy_(ffn.w_out.weight[:, order])
        layer.centroids.copy_(layer.w_0.weight.view(moe.experts, -1, layer.w_0.in_features).mean(dim=1))
    layer.requires_grad_(False)
    layer.router.requires_grad_(True)
    return layer


def moefy(model: CpmAnt, experts: int, top_k: int, router: str = "similarity",
          router_hidden: int = 128) -> list[MoEFeedForward]:
    """Replace every FFN of ``model`` (in place) by its MoE form (the config gains ``moe``);
    returns the new FFNs."""
    if model.config.moe is not None:
        raise CpmliveError("moefy: the model is already MoEfied")
    if model.config.quantization is not None:
        raise CpmliveError("moefy: the model is quantized; moefy its float checkpoint (and quantize after, "
                           "when that is supported)")
    moe = MoEConfig(experts=experts, top_k=top_k, router=router, router_hidden=router_hidden)
    config = dataclasses.replace(model.config, moe=moe)  # validates dim_ff against experts
    layers = []
    for block in model.layers:
        if hasattr(block, "ffn"):
            block.ffn = moe_from_dense(block.ffn, config)
            layers.append(block.ffn)
    model.config = config
    return layers


@torch.no_grad()
def ffn_inputs(model: CpmAnt, batches: list) -> list[Tensor]:
    """The (normalised) input rows of every FFN over the batches' valid positions."""
    collected: list[list[Tensor]] = [[] for _ in model.layers]
    ffns = {str(index): block.ffn for index, block in enumerate(model.layers) if hasattr(block, "ffn")}
    feed_inputs(model, ffns, batches, lambda name, rows: collected[int(name)].append(rows.float()))
    return [torch.cat(rows) if rows else torch.empty(0) for rows in collected]


def train_router(layer: MoEFeedForward, inputs: Tensor, steps: int = 300, lr: float = 3e-3, seed: int = 0) -> float:
    """Fit the MLP router to pick each row's ``top_k`` experts by true activation norm (a
    multi-label target); returns the share of the oracle's top-k experts it then picks."""
    torch.manual_seed(seed)
    with torch.no_grad():
        target_index = layer.expert_norms(inputs).topk(layer.top_k, dim=-1).indices
        target = torch.zeros(inputs.size(0), layer.experts).scatter_(-1, target_index, 1.0)
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(layer.router(inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        picked = torch.zeros_like(target).scatter_(-1, layer.router(inputs).topk(layer.top_k, dim=-1).indices, 1.0)
    return float((picked * target).sum() / target.sum())


@torch.no_grad()
def activation_sparsity(model: CpmAnt, batches: list, thresholds: tuple[float, ...] = (0.01, 0.1)) -> dict[str, float]:
    """How sparse the gated-GELU activations really are: the share exactly zero, and the share
    below each threshold times the row's largest absolute activation."""
    inputs = ffn_inputs(model, batches)
    counts = {"exactly 0": 0.0, **{f"< {t:g} x row max": 0.0 for t in thresholds}}
    total = 0
    for block, rows in zip(model.layers, inputs):
        if not hasattr(block, "ffn") or rows.numel() == 0:
            continue
        ffn = block.ffn
        h = (F.gelu(F.linear(rows, ffn.w_0.weight)) * F.linear(rows, ffn.w_1.weight)).abs()
        peak = h.amax(dim=-1, keepdim=True)
        counts["exactly 0"] += float((h == 0).sum())
        for t in thresholds:
            counts[f"< {t:g} x row max"] += float((h < t * peak).sum())
        total += h.numel()
    return {name: value / max(total, 1) for name, value in counts.items()}


__all__ = ["activation_sparsity", "balanced_clusters", "ffn_inputs", "moe_from_dense", "moefy", "train_router"]
