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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.errors import CpmliveError
from cpmlive.model.ant import CpmAnt, FeedForward

ROUTERS = ("similarity", "mlp", "oracle")


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


class MoEFeedForward(nn.Module):
    """A dense FFN's weights regrouped into experts, with a router and top-k selection."""

    def __init__(self, ffn: FeedForward, experts: int, top_k: int, router: str = "similarity",
                 seed: int = 0, hidden: int = 128) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise CpmliveError(f"moefy: router must be one of {', '.join(ROUTERS)}, got {router!r}")
        if not 1 <= top_k <= experts:
            raise CpmliveError(f"moefy: top_k must be in [1, {experts}], got {top_k}")
        assignment = balanced_clusters(torch.cat([ffn.w_0.weight, ffn.w_1.weight], dim=1).detach(), experts, seed=seed)
        order = assignment.argsort(stable=True)
        self.experts, self.top_k, self.router_kind = experts, top_k, router
        self.size = ffn.w_0.out_features // experts
        self.w_0 = nn.Parameter(ffn.w_0.weight.detach()[order].clone(), requires_grad=False)
        self.w_1 = nn.Parameter(ffn.w_1.weight.detach()[order].clone(), requires_grad=False)
        self.w_out = nn.Parameter(ffn.w_out.weight.detach()[:, order].clone(), requires_grad=False)
        self.register_buffer("centroids", self.w_0.view(experts, self.size, -1).mean(dim=1))
        self.router = nn.Sequential(nn.Linear(self.w_0.size(1), hidden), nn.ReLU(), nn.Linear(hidden, experts))
        self.last_kept: float | None = None  # share of FFN neurons the last call computed

    def activations(self, x: Tensor) -> Tensor:
        return F.gelu(F.linear(x, self.w_0)) * F.linear(x, self.w_1)

    def expert_norms(self, x: Tensor) -> Tensor:
        """The true activation norm of every expert, ``[..., experts]`` (the oracle's score)."""
        h = self.activations(x)
        return h.view(*h.shape[:-1], self.experts, self.size).norm(dim=-1)

    def scores(self, x: Tensor) -> Tensor:
        if self.router_kind == "oracle":
            return self.expert_norms(x)
        if self.router_kind == "similarity":
            return F.linear(x, self.centroids)
        return self.router(x)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        chosen = self.scores(x).topk(self.top_k, dim=-1).indices
        self.last_kept = self.top_k / self.experts
        if x.numel() == x.size(-1):  # one row: compute only the chosen experts' neurons
            rows = (chosen.reshape(-1, 1) * self.size + torch.arange(self.size)).reshape(-1)
            h = F.gelu(F.linear(x, self.w_0[rows])) * F.linear(x, self.w_1[rows])
            return residual + F.linear(h, self.w_out[:, rows])
        mask = torch.zeros(*x.shape[:-1], self.experts, dtype=x.dtype, device=x.device)
        mask.scatter_(-1, chosen, 1.0)
        h = self.activations(x) * mask.repeat_interleave(self.size, dim=-1)
        return residual + F.linear(h, self.w_out)


def moefy(model: CpmAnt, experts: int, top_k: int, router: str = "similarity") -> list[MoEFeedForward]:
    """Replace every FFN of ``model`` (in place) by its MoE form; returns the new FFNs."""
    layers = []
    for block in model.layers:
        if hasattr(block, "ffn"):
            block.ffn = MoEFeedForward(block.ffn, experts, top_k, router)
            layers.append(block.ffn)
    return layers


@torch.no_grad()
def ffn_inputs(model: CpmAnt, batches: list) -> list[Tensor]:
    """The (normalised) input rows of every FFN over the batches' valid positions."""
    collected: list[list[Tensor]] = [[] for _ in model.layers]
    valid: list[Tensor] = []
    handles = []
    for index, block in enumerate(model.layers):
        if hasattr(block, "ffn"):
            def hook(_module: nn.Module, inputs: tuple, index: int = index) -> None:
                x = inputs[0]
                collected[index].append(x[valid[0][:, -x.size(1):]].float())
            handles.append(block.ffn.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            valid[:] = [batch.valid]
            model(**batch.as_inputs())
    finally:
        for handle in handles:
            handle.remove()
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


__all__ = ["MoEFeedForward", "ROUTERS", "activation_sparsity", "balanced_clusters", "ffn_inputs", "moefy",
           "train_router"]
