"""Structured pruning with learned hard-concrete masks (CoFi / Sheared-LLaMA, as BMCook does it).

Four kinds of mask, each a :class:`HardConcrete` gate per unit:

* ``heads`` ``[num_kv_heads]``: one gate per attention head *index*, shared by every layer: CPM-Ant
  has one position-bias table for all layers, one column per head, so a head can only be removed
  everywhere or nowhere (and every layer of a config has the same head count). Grouped attention
  (fewer key/value heads than query heads, GQA) is gated by group: a key/value head and the query
  heads that read it go together;
* ``attention`` ``[num_layers]`` and ``ffn`` ``[num_layers]``: whole sub-blocks;
* ``ffn_dims`` ``[num_layers, dim_ff]``: the FFN's intermediate dimensions, per layer.

The gates multiply the input of ``attention_out`` (per head and per layer) and of ``w_out`` (per
dimension and per layer) through forward pre-hooks, so the model code is untouched and a gate of
0 removes exactly that unit's contribution. The expected number of parameters the gates keep is
differentiable; :class:`Lagrangian` drives it to a target with the min-max penalty
``λ1 (E - T) + λ2 (E - T)²`` (the multipliers ascend while the model and gates descend).

:func:`pruned_model` binarises the gates into an ordinary architecture of the model's family (the
same head count and FFN width in every layer, removed sub-blocks in ``mask_modules``), folds the
deterministic gate values into ``attention_out`` / ``w_out`` and slices every weight (and the
q/k/v biases), so the pruned model computes what the gated one did. An attention without
per-head q/k/v products (multi-head latent attention) is refused.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from typing import Callable

import torch
from torch import Tensor, nn

from cpmlive.config import StackConfig
from cpmlive.errors import CpmliveError
from cpmlive.model.checkpoint import model_from_state_dict
from cpmlive.model.stack import Transformer

# Louizos et al.'s stretch interval and temperature, as CoFi and Sheared-LLaMA use them.
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
INITIAL_LOG_ALPHA = 3.0  # every gate starts (almost surely) open
# Short second-moment memory for the gates: once a gate saturates its gradient shrinks, and with
# Adam's usual 0.999 the large early gradients would keep its steps tiny when the multipliers turn.
MASK_BETAS = (0.0, 0.9)
TARGET_SLACK = 0.1  # a pruned model further than this from its target share is warned about


class HardConcrete(nn.Module):
    """Gates in [0, 1] that are exactly 0 or 1 with non-zero probability: sampled in training,
    their expected value (clamped) at evaluation."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, INITIAL_LOG_ALPHA))

    def forward(self) -> Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def keep_probability(self) -> Tensor:
        """P(gate != 0): the expected L0 norm of each gate."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


def head_groups(config: StackConfig) -> tuple[int, int]:
    """(number of head groups, query heads per group): a group is a key/value head and the query
    heads that read it (one head each where every head has its own keys and values)."""
    groups = getattr(config, "num_kv_heads", config.num_heads)
    return groups, config.num_heads // groups


class PruningMasks(nn.Module):
    """The four gate sets of one model, and the hooks that apply them."""

    def __init__(self, config: StackConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = HardConcrete(head_groups(config)[0])
        self.attention = HardConcrete(config.num_layers)
        self.ffn = HardConcrete(config.num_layers)
        self.ffn_dims = HardConcrete(config.num_layers, config.dim_ff)
        self._current: dict[str, Tensor] = {}
        self._handles: list = []

    def sample(self) -> None:
        """Draw this step's gates (or take the deterministic ones in eval mode)."""
        self._current = {"heads": self.heads(), "attention": self.attention(), "ffn": self.ffn(),
                         "ffn_dims": self.ffn_dims()}

    def attach(self, model: Transformer) -> None:
        """Hook every ``attention_out`` and ``w_out`` of ``model``; gates come from :meth:`sample`."""
        if model.config.mask_modules is not None:
            raise CpmliveError("the model already has removed sub-blocks: prune its full checkpoint")
        if model.config.moe is not None or model.config.quantization is not None:
            raise CpmliveError("prune a float, dense model (before quantizing or moefying it)")
        if not all(hasattr(block.attn, name) for block in model.layers for name in PER_HEAD):
            raise CpmliveError("prune: this model's attention has no per-head q/k/v products to remove heads "
                               "from (latent attention)")
        self.detach()
        for index, block in enumerate(model.layers):
            self._handles.append(block.attn.attention_out.register_forward_pre_hook(self._attention_hook(index)))
            self._handles.append(block.ffn.w_out.register_forward_pre_hook(self._ffn_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attention_hook(self, layer: int):
        dim_head = self.config.dim_head * head_groups(self.config)[1]  # the attention output's width per gate

        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            gate = (self._current["heads"] * self._current["attention"][layer]).repeat_interleave(dim_head)
            return (x * gate.to(x.dtype),)
        return hook

    def _ffn_hook(self, layer: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            gate = self._current["ffn_dims"][layer] * self._current["ffn"][layer]
            return (x * gate.to(x.dtype),)
        return hook

    def expected_fraction(self) -> Tensor:
        """Expected share of the prunable parameters (attention and FFN projections) kept."""
        c = self.config
        attention = self.attention.keep_probability().sum() * self.heads.keep_probability().sum()
        ffn = (self.ffn.keep_probability() * self.ffn_dims.keep_probability().sum(dim=1)).sum()
        per_group = 2 * head_groups(c)[1] + 2  # q and output rows of each query head, one k and one v head
        kept = attention * per_group * c.dim_model * c.dim_head + ffn * 3 * c.dim_model
        return kept / prunable_parameters(c)


def prunable_parameters(config: StackConfig) -> int:
    """Parameters of every attention and FFN projection (what the masks can remove)."""
    kv_width = head_groups(config)[0] * config.dim_head
    per_layer = (2 * config.dim_model * config.dim_attention + 2 * config.dim_model * kv_width
                 + 3 * config.dim_model * config.dim_ff)
    return config.num_layers * per_layer


class Lagrangian(nn.Module):
    """``λ1 (E - T) + λ2 (E - T)²`` with learnable multipliers: train them with an optimizer that
    maximises (``torch.optim.Adam(..., maximize=True)``) while everything else minimises."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected: Tensor, target: float) -> Tensor:
        gap = expected - target
        return self.lambda_1 * gap + self.lambda_2 * gap * gap


def check_target(target_fraction: float) -> None:
    if not isinstance(target_fraction, (int, float)) or isinstance(target_fraction, bool) \
            or not 0 < target_fraction < 1:
        raise CpmliveError(f"prune: target (the share of prunable parameters kept) must be in (0, 1), "
                           f"got {target_fraction!r}")


# ---- binarise and slice ---------------------------------------------------------------------------


@dataclasses.dataclass
class PrunedShape:
    """Which units survive: head (group) indices, FFN dimensions per layer, and the kept sub-blocks."""

    heads: list[int]
    ffn_dims: list[list[int]]
    attention: list[bool]
    ffn: list[bool]


@torch.no_grad()
def binarise(masks: PruningMasks, multiple_of: int = 1) -> PrunedShape:
    """Gates to an architecture CPM-Ant's config can describe. How many units survive is the
    gates' expected L0 norm (the sum of their keep probabilities, CoFi's rule), and which are
    the ones with the largest ``log_alpha``: as many heads as expected, the sub-blocks whose
    gate is open more often than not, and in every kept FFN the same number of dimensions (the
    mean expected over the kept FFNs, rounded to a multiple of ``multiple_of`` so that later
    kernels and int4 groups fit), each layer its own."""
    masks.eval()
    heads = masks.heads.keep_probability()
    head_count = max(1, int(round(heads.sum().item())))
    kept_heads = sorted(torch.topk(masks.heads.log_alpha, head_count).indices.tolist())
    keep_attention = (masks.attention.keep_probability() > 0.5).tolist()
    keep_ffn = (masks.ffn.keep_probability() > 0.5).tolist()
    if not any(keep_attention) and not any(keep_ffn):
        raise CpmliveError("prune: every sub-block's gate closed; nothing would be left (raise the target)")
    kept_layers = [i for i, keep in enumerate(keep_ffn) if keep] or list(range(masks.config.num_layers))
    dims = masks.ffn_dims.keep_probability()
    expected = dims[kept_layers].sum(dim=1).mean().item()
    width = min(masks.config.dim_ff, max(multiple_of, multiple_of * int(round(expected / multiple_of))))
    ffn_dims = [sorted(torch.topk(masks.ffn_dims.log_alpha[i], width).indices.tolist())
                for i in range(masks.config.num_layers)]
    return PrunedShape(kept_heads, ffn_dims, keep_attention, keep_ffn)


@torch.no_grad()
def sliced_state(model: Transformer, masks: PruningMasks,
                 shape: PrunedShape) -> tuple[dict[str, Tensor], StackConfig]:
    """The pruned model's weights and config: surviving units only, their gate values folded
    into ``attention_out`` / ``w_out`` (the deterministic gates are not all exactly 1)."""
    config = model.config
    masks.eval()
    heads, attention, ffn, dims = masks.heads(), masks.attention(), masks.ffn(), masks.ffn_dims()
    group = head_groups(config)[1]
    q_rows = _rows(shape.heads, config.dim_head * group)
    kv_rows = _rows(shape.heads, config.dim_head)
    head_gate = heads[shape.heads].repeat_interleave(config.dim_head * group)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    if "position_bias.weight" in state:  # one column per head, shared by every layer
        state["position_bias.weight"] = state["position_bias.weight"][:, shape.heads].clone()
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        if shape.attention[i]:
            state[prefix + "attn_norm.weight"] = block.attn_norm.weight.clone()
            for name, tensor in block.attn.state_dict().items():
                state[prefix + "attn." + name] = _sliced_attention(name, tensor, q_rows, kv_rows,
                                                                   head_gate * attention[i])
        if shape.ffn[i]:
            ff, index = block.ffn, torch.tensor(shape.ffn_dims[i])
            state[prefix + "ffn_norm.weight"] = block.ffn_norm.weight.clone()
            state[prefix + "ffn.w_0.weight"] = ff.w_0.weight[index].clone()
            state[prefix + "ffn.w_1.weight"] = ff.w_1.weight[index].clone()
            state[prefix + "ffn.w_out.weight"] = (ff.w_out.weight[:, index] * (dims[i, index] * ffn[i])).to(
                ff.w_out.weight.dtype)
    removed = [[not a, not f] for a, f in zip(shape.attention, shape.ffn)]
    heads_left = {"num_kv_heads": len(shape.heads)} if hasattr(config, "num_kv_heads") else {}
    pruned = dataclasses.replace(config, num_heads=len(shape.heads) * group, dim_ff=len(shape.ffn_dims[0]),
                                 mask_modules=removed if any(a or f for a, f in removed) else None, **heads_left)
    return state, pruned


PER_HEAD = ("project_q", "project_k", "project_v")
QUERY_ROWS = ("project_q.weight", "bias_q")  # rows per query head
KV_ROWS = ("project_k.weight", "project_v.weight", "bias_k", "bias_v")  # rows per key/value head


def _rows(groups: list[int], width: int) -> Tensor:
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups])


def _sliced_attention(name: str, tensor: Tensor, q_rows: Tensor, kv_rows: Tensor, gate: Tensor) -> Tensor:
    """One attention tensor of a kept sub-block: the rows of the kept heads (q, k, v and their
    biases), the kept columns of ``attention_out`` times their gates, anything else (q/k norms
    over a head's width, the output bias) as it is."""
    if name in QUERY_ROWS:
        return tensor[q_rows].clone()
    if name in KV_ROWS:
        return tensor[kv_rows].clone()
    if name == "attention_out.weight":
        return (tensor[:, q_rows] * gate).to(tensor.dtype)
    return tensor.clone()


def pruned_model(model: Transformer, masks: PruningMasks, multiple_of: int = 1) -> Transformer:
    """The physically smaller model the deterministic gates describe."""
    state, config = sliced_state(model, masks, binarise(masks, multiple_of))
    return model_from_state_dict(config, state, source="pruned model")


# ---- training the gates ----------------------------------------------------------------------------


@dataclasses.dataclass
class PruneConfig:
    """``target``: share of the prunable parameters to keep; it is approached linearly from 1 over
    ``target_warmup_steps`` (Sheared-LLaMA's schedule), then held."""

    target: float = 0.5
    steps: int = 200
    target_warmup_steps: int = 100
    lr: float = 1e-4
    mask_lr: float = 0.1
    lagrangian_lr: float = 0.1
    multiple_of: int = 16  # the pruned FFN width is a multiple of this (int4 groups must divide it)

    def __post_init__(self) -> None:
        check_target(self.target)
        if not isinstance(self.multiple_of, int) or isinstance(self.multiple_of, bool) or self.multiple_of < 1:
            raise CpmliveError(f"prune: multiple_of must be a positive integer, got {self.multiple_of!r}")
        for name in ("steps", "target_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "steps" else 0):
                raise CpmliveError(f"prune: {name} must be a {'positive' if name == 'steps' else 'non-negative'} "
                                   f"integer, got {value!r}")
        for name in ("lr", "mask_lr", "lagrangian_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise CpmliveError(f"prune: {name} must be a number >= 0, got {value!r}")

    def target_at(self, step: int) -> float:
        """The target of step ``step`` (from 1)."""
        if self.target_warmup_steps == 0:
            return self.target
        progress = min(step / self.target_warmup_steps, 1.0)
        return 1.0 - (1.0 - self.target) * progress


class GateTrainer:
    """One optimizer step of model + gates + multipliers: ``loss(model) + Lagrangian``.

    ``loss`` is any function of the gated model (the LM loss, or distillation from a teacher);
    the model's weights train at ``lr``, the gates at ``mask_lr``, the multipliers ascend at
    ``lagrangian_lr``."""

    def __init__(self, model: Transformer, config: PruneConfig) -> None:
        self.model, self.config = model, config
        self.masks = PruningMasks(model.config)
        self.masks.attach(model)
        self.lagrangian = Lagrangian()
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr, "weight_decay": 0.0},
            {"params": list(self.masks.parameters()), "lr": config.mask_lr, "weight_decay": 0.0,
             "betas": MASK_BETAS}])
        self.ascent = torch.optim.SGD(self.lagrangian.parameters(), lr=config.lagrangian_lr, maximize=True)
        self.step_count = 0

    def parameters(self) -> list[torch.nn.Parameter]:
        """Everything the step updates: the model's weights, the gates and the multipliers."""
        return [p for group in (*self.optimizer.param_groups, *self.ascent.param_groups) for p in group["params"]]

    def step(self, loss_fn, scale: float = 1.0, sync: Callable[[list], None] | None = None) -> dict[str, float]:
        """One step; ``scale`` multiplies the loss (a rank's share of the global batch) and
        ``sync`` averages the gradients over the ranks before they are applied."""
        self.step_count += 1
        self.model.train()
        self.masks.train()
        self.masks.sample()
        loss = loss_fn(self.model)
        expected = self.masks.expected_fraction()
        target = self.config.target_at(self.step_count)
        penalty = self.lagrangian(expected, target)
        (loss * scale + penalty).backward()
        if sync is not None:
            sync(self.parameters())
        self.optimizer.step()
        self.ascent.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ascent.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "expected_kept": float(expected.detach()), "target": target,
                "lambda_1": self.lagrangian.lambda_1.item(), "lambda_2": self.lagrangian.lambda_2.item()}

    def finish(self) -> Transformer:
        """Binarise the gates, slice the model, and drop the hooks."""
        self.model.eval()
        pruned = pruned_model(self.model, self.masks, self.config.multiple_of)
        self.masks.detach()
        warn_off_target(kept_share(self.model, pruned), self.config.target, self.config.steps)
        return pruned


def kept_share(original: nn.Module, pruned: nn.Module) -> float:
    """The share of the prunable projection weights (q, k, v, attention out, FFN) that ``pruned`` kept."""
    def prunable(model: nn.Module) -> int:
        return sum(p.numel() for name, p in model.named_parameters()
                   if ".attn.project_" in name or ".attn.attention_out." in name or ".ffn.w_" in name)

    return prunable(pruned) / prunable(original)


def warn_off_target(kept: float, target: float, steps: int) -> None:
    """A pruned model more than ``TARGET_SLACK`` away from its target is said so, in one line."""
    if abs(kept - target) > TARGET_SLACK:
        warnings.warn(f"prune kept {kept:.0%} of the prunable parameters against a target of {target:.0%} "
                      f"after {steps} steps (the gates had not reached it: give more steps or a larger mask_lr "
                      f"/ lagrangian_lr)", stacklevel=2)


__all__ = ["GateTrainer", "HardConcrete", "Lagrangian", "PruneConfig", "PrunedShape", "PruningMasks",
           "binarise", "check_target", "head_groups", "kept_share", "warn_off_target", "prunable_parameters",
           "pruned_model", "sliced_state"]
