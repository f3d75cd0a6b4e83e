"""The alignment objectives, as functions of log-probabilities, scores and values (no model).

Every formula is TRL's (``tests/test_align_losses.py`` runs TRL's own code on the same inputs):

* DPO (Rafailov et al. 2023): ``Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))``;
  ``sigmoid``: ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)`` (ε, label smoothing, is conservative DPO);
  ``robust`` (rDPO): the same two terms debiased by ``1/(1−2ε)``; ``ipo``: the per-token
  average ``Δ̄`` in ``(Δ̄ − 1/(2β))²``. The implicit rewards are ``β·(log π − log π_ref)``.
* Reward model: ``−log σ(s_c − s_r − margin)``, optionally ``+ λ·mean((s_c + s_r)²)`` to centre.
* PPO: per-token reward ``−kl_coef·KL`` with the reward model's score added on the last
  token; GAE; advantages whitened over the valid tokens; clipped policy and value losses.
* GRPO (Shao et al. 2024): advantages ``(r − mean_group) / (std_group + 1e-4)`` over the k
  samples of a prompt; the clipped surrogate averaged per sequence, plus ``β·k3`` KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "robust", "ipo")
KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PreferenceLoss:
    """Per-pair losses and the implicit rewards TRL logs as ``rewards/chosen`` and ``rewards/rejected``."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    def metrics(self) -> dict[str, float]:
        margins = self.chosen_rewards - self.rejected_rewards
        return {"rewards/chosen": self.chosen_rewards.mean().item(),
                "rewards/rejected": self.rejected_rewards.mean().item(),
                "rewards/accuracies": (margins > 0).float().mean().item(),
                "rewards/margins": margins.mean().item()}


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None) -> PreferenceLoss:
    """DPO's loss from summed completion log-probabilities ``[B]``; ``ipo`` also needs each
    completion's token count."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completions' token counts")
        average = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (average - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSSES)}")
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def reward_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None,
                center_coefficient: float | None = None) -> Tensor:
    """The pairwise logistic (Bradley-Terry) loss of a reward model, batch mean."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen_scores + rejected_scores) ** 2)
    return loss


# ---- PPO --------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Values scaled to unit variance (unbiased) over ``mask``; centred unless ``shift_mean`` is false."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_per_token(logprobs: Tensor, reference_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Schulman's estimators of KL(π‖π_ref) from samples of π: k1 = log π − log π_ref, k3 = (r − 1) − log r."""
    log_ratio = reference_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}")


def shaped_rewards(scores: Tensor, logprobs: Tensor, reference_logprobs: Tensor, mask: Tensor, kl_coef: float,
                   estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards ``[B, T]``: ``−kl_coef·KL`` on every valid token and the sequence's score
    on its last one; also the per-token KL (0 off the mask)."""
    kl = kl_per_token(logprobs, reference_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(rewards.size(0)), last] += scores
    return rewards * mask, kl


def generalized_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                           lam: float) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016) over each row's valid tokens: ``(whitened advantages, returns)``.
    Tokens after a row's end have value 0, so its last token bootstraps from nothing."""
    values = values * mask
    length = rewards.size(1)
    running = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        following = values[:, t + 1] if t < length - 1 else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    return masked_whiten(advantages, mask) * mask, returns


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, token mean over the mask; also the share of tokens clipped."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float) -> tuple[Tensor, Tensor]:
    """Half the larger of the plain and clipped squared errors, token mean; also the share clipped."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(plain, clipped), mask), masked_mean((clipped > plain).float(), mask)


# ---- GRPO -------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """Each reward minus its group's mean (groups of ``group_size`` consecutive samples), divided
    by the group's standard deviation (unbiased) + 1e-4 when ``scale``."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True))
    if scale:
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + 1e-4)
    return centred.reshape(-1)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, reference_logprobs: Tensor | None, advantages: Tensor,
              mask: Tensor, epsilon: float, beta: float) -> tuple[Tensor, Tensor]:
    """GRPO's loss: the clipped surrogate with each sequence's advantage on all its tokens plus
    ``β·k3``, averaged over each sequence's tokens and then over sequences; also the mean KL."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    per_token = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantage)
    kl = torch.zeros_like(per_token)
    if beta != 0.0 and reference_logprobs is not None:
        kl = kl_per_token(logprobs, reference_logprobs, "k3")
        per_token = per_token + beta * kl
    tokens = mask.sum(-1).clamp(min=1.0)
    loss = ((per_token * mask).sum(-1) / tokens).mean()
    return loss, ((kl * mask).sum(-1) / tokens).mean().detach()


__all__ = ["DPO_LOSSES", "KL_ESTIMATORS", "PreferenceLoss", "clipped_policy_loss", "clipped_value_loss", "dpo_loss",
           "generalized_advantages", "group_advantages", "grpo_loss", "kl_per_token", "masked_mean", "masked_whiten",
           "reward_loss", "shaped_rewards"]
