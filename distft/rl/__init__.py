"""Reinforcement-learning math for RLHF, Ray-free and torch-only (see `ppo.py`)."""

from distft.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyLoss,
    ValueLoss,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyLoss",
    "ValueLoss",
    "entropy_from_logits",
    "gae_advantages",
    "kl_penalty",
    "last_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "token_rewards",
    "value_loss",
]
