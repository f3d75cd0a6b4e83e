"""Alignment: instruction tuning, reward models, DPO, PPO and GRPO over delta tuning."""
