"""2:4 semi-structured sparsity: in every group of four consecutive inputs of a row, two weights
are zero (the pattern NVIDIA's sparse tensor cores skip, sm80+).

The two kept weights of each group are those with the largest score: ``|w|`` (``magnitude``) or
``|w| * ||x_j||`` (``wanda``, Sun et al. 2023: the weight times the norm of its input channel
over calibration inputs). The mask is kept through fine-tuning by zeroing the masked weights and
their gradients after every step. The result is an ordinary float checkpoint whose zeros follow
the pattern; only a CUDA GPU with semi-structured kernels turns that into speed (none here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cpmlive.compress.quantize import feed_inputs
from cpmlive.errors import CpmliveError
from cpmlive.model.stack import Transformer

GROUP, KEPT = 4, 2
METHODS = ("magnitude", "wanda")


def mask_2of4(score: Tensor) -> Tensor:
    """Boolean mask keeping the ``KEPT`` largest scores of every ``GROUP`` consecutive columns."""
    rows, columns = score.shape
    if columns % GROUP:
        raise CpmliveError(f"2:4 sparsity needs layer widths divisible by {GROUP}, got {columns}")
    groups = score.reshape(rows, columns // GROUP, GROUP)
    kept = groups.topk(KEPT, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return mask.reshape(rows, columns)


def block_linears(model: Transformer) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and ".layers." in f".{name}"}


@torch.no_grad()
def input_norms(model: Transformer, batches: list) -> dict[str, Tensor]:
    """``||x_j||`` of every input channel of every block linear layer over the batches' valid rows."""
    squares: dict[str, Tensor] = {}

    def add(name: str, rows: Tensor) -> None:
        squares[name] = squares.get(name, 0) + rows.float().pow(2).sum(dim=0)

    feed_inputs(model, block_linears(model), batches, add)
    return {name: value.sqrt() for name, value in squares.items()}


@torch.no_grad()
def sparsify_2of4(model: Transformer, method: str = "magnitude", batches: list | None = None) -> dict[str, Tensor]:
    """Zero two weights of every group of four in every block linear layer; returns the masks."""
    if method not in METHODS:
        raise CpmliveError(f"2:4 sparsity: method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "wanda" and not batches:
        raise CpmliveError("2:4 sparsity: wanda needs calibration inputs (give the recipe data)")
    norms = input_norms(model, batches) if method == "wanda" else {}
    masks = {}
    for name, layer in block_linears(model).items():
        score = layer.weight.abs().float()
        if method == "wanda":
            score = score * norms[name][None, :]
        masks[name] = mask_2of4(score)
        layer.weight.mul_(masks[name].to(layer.weight.dtype))
    return masks


@torch.no_grad()
def apply_masks(model: Transformer, masks: dict[str, Tensor]) -> None:
    """Zero the masked weights again (after an optimizer step)."""
    layers = block_linears(model)
    for name, mask in masks.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def follows_2of4(weight: Tensor) -> bool:
    """Whether every group of four consecutive inputs of every row has at least two zeros."""
    rows, columns = weight.shape
    zeros = (weight.reshape(rows, columns // GROUP, GROUP) == 0).sum(dim=-1)
    return bool((zeros >= GROUP - KEPT).all())


__all__ = ["METHODS", "apply_masks", "follows_2of4", "input_norms", "mask_2of4", "sparsify_2of4"]
