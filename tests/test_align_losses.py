"""Our alignment losses against TRL's own code on the same log-probabilities, scores and values
(fp32). TRL computes its losses inside its trainers, so each trainer's loss method runs on a
stand-in ``self`` that holds only what the method reads; the model is replaced by outputs we give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cpmlive.align import losses

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402
from trl_stubs import trainer_stub  # noqa: E402


def completion_batch(seed: int, batch: int = 4, width: int = 7):
    """Per-token log-probabilities of chosen then rejected rows, with a completion mask of varied lengths."""
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * batch, width, generator=generator) * 3
    lengths = torch.randint(2, width + 1, (2 * batch,), generator=generator)
    mask = (torch.arange(width + 1)[None, :] <= lengths[:, None]).long()  # column 0 is the prompt's last token
    mask[:, 0] = 0
    logps = logps * mask[:, 1:]
    reference = -torch.rand(2 * batch, generator=generator) * 10
    return logps, mask, reference


def trl_dpo(loss_type: str, beta: float, label_smoothing: float, logps, mask, reference):
    width = logps.size(1)
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    ref_chosen, ref_rejected = reference.chunk(2)
    inputs = {"input_ids": torch.zeros(logps.size(0), width + 1, dtype=torch.long), "completion_mask": mask,
              "attention_mask": torch.ones(logps.size(0), width + 1, dtype=torch.long),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    stub = trainer_stub(beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type], loss_weights=[1.0],
                        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False)
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_equal_trl(loss_type, label_smoothing, beta):
    logps, mask, reference = completion_batch(seed=int(beta * 10) + len(loss_type))
    expected, metrics = trl_dpo(loss_type, beta, label_smoothing, logps, mask, reference)
    policy_chosen, policy_rejected = logps.sum(1).chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    tokens_chosen, tokens_rejected = mask.sum(1).chunk(2)
    ours = losses.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing,
                           loss_type, tokens_chosen, tokens_rejected)
    torch.testing.assert_close(ours.losses.mean(), expected, rtol=1e-6, atol=1e-6)
    for name, value in ours.metrics().items():
        assert value == pytest.approx(metrics[name], abs=1e-6), name


def test_conservative_dpo_is_trls_sigmoid_loss_mixed_with_the_swapped_pair():
    """Label smoothing ε on the sigmoid loss (cDPO): (1−ε)·TRL(chosen, rejected) + ε·TRL(rejected, chosen)."""
    logps, mask, reference = completion_batch(seed=3)
    beta, eps = 0.2, 0.15
    straight, _ = trl_dpo("sigmoid", beta, 0.0, logps, mask, reference)
    swap = lambda t: torch.cat(t.chunk(2)[::-1])  # noqa: E731
    swapped, _ = trl_dpo("sigmoid", beta, 0.0, swap(logps), swap(mask), swap(reference))
    chosen, rejected = logps.sum(1).chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    ours = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, eps, "sigmoid").losses.mean()
    torch.testing.assert_close(ours, (1 - eps) * straight + eps * swapped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01)])
def test_reward_loss_equals_trl(margin, center):
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(8, 1, generator=generator)
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.rand(4, generator=generator)
    stub = trainer_stub(args=SimpleNamespace(center_rewards_coefficient=center))
    expected = RewardTrainer.compute_loss(stub, lambda **kwargs: SimpleNamespace(logits=scores), dict(inputs))
    chosen, rejected = scores[:, 0].chunk(2)
    ours = losses.reward_loss(chosen, rejected, inputs.get("margin"), center)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(stub._metrics["train"]["accuracy"][-1])


def trl_policy_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, beta, loss_type):
    stub = trainer_stub(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
                        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
                        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, use_adaptive_entropy=False,
                        entropy_coef=0.0, max_completion_length=mask.size(1))
    stub._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = {"prompt_ids": torch.zeros(mask.size(0), 2, dtype=torch.long), "prompt_mask": torch.ones(mask.size(0), 2),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps}
    return GRPOTrainer._compute_loss(stub, None, inputs)


def rollout_tensors(seed: int, batch: int = 6, width: int = 9):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    logps = -torch.rand(batch, width, generator=generator) * 2
    old = logps + torch.randn(batch, width, generator=generator) * 0.3
    ref = logps + torch.randn(batch, width, generator=generator) * 0.5
    return logps, old, ref, mask, generator


def test_ppo_clipped_policy_loss_equals_trls_token_level_surrogate():
    """TRL 1.x has no PPO trainer; its GRPO loss takes token-level advantages, and with
    ``bnpo`` (token mean) and no KL term it is PPO's clipped surrogate."""
    logps, old, ref, mask, generator = rollout_tensors(11)
    advantages = torch.randn(*mask.shape, generator=generator)
    expected = trl_policy_loss(logps, old, ref, advantages, mask, 0.2, 0.0, "bnpo")
    ours, clipfrac = losses.clipped_policy_loss(logps, old, advantages, mask, 0.2)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert 0 < clipfrac.item() < 1


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(beta):
    logps, old, ref, mask, generator = rollout_tensors(5)
    advantages = losses.group_advantages(torch.randn(6, generator=generator), group_size=3)
    expected = trl_policy_loss(logps, old, ref, advantages, mask, 0.2, beta, "grpo")
    ours, _ = losses.grpo_loss(logps, old, ref, advantages, mask, 0.2, beta)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_group_advantages_follow_grpos_normalisation():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5])
    got = losses.group_advantages(rewards, 3)
    first = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(got[:3], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.all(got[3:] == 0)


def test_gae_matches_the_direct_sum_and_whitening_is_unbiased():
    """GAE equals Σ_l (γλ)^l δ_{t+l} computed directly; TRL's masked_whiten uses the unbiased variance."""
    generator = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 5, generator=generator)
    values = torch.randn(3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    masked_values = values * mask
    following = torch.cat([masked_values[:, 1:], torch.zeros(3, 1)], 1)
    delta = rewards + gamma * following - masked_values
    raw = torch.stack([sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, 5)) for t in range(5)], 1)
    advantages, returns = losses.generalized_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(returns, raw + masked_values)
    kept = raw[mask.bool()]
    torch.testing.assert_close(advantages[mask.bool()], (kept - kept.mean()) / (kept.var() + 1e-8).sqrt())


def test_clipped_value_loss_takes_the_larger_error():
    values, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0]]), torch.ones(1, 2)
    loss, clipfrac = losses.clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: plain (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24; token 1: both 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_shaped_rewards_put_the_score_on_the_last_token():
    logps, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = losses.shaped_rewards(torch.tensor([5.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 5.0, 0.0]]))
