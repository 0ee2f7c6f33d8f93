"""The math of PPO for language models, as pure functions of tensors.

In the order a PPO step uses it:

1. `response_mask`: which generated tokens count (up to and including the first EOS;
   a response that never ends is truncated and marked unfinished).
2. `logprobs_from_logits`, `entropy_from_logits`: per-token quantities of the policy.
3. `kl_penalty` and `token_rewards`: a per-token penalty `-kl_coef * KL(policy || reference)`,
   with the sequence's scalar score added at its last valid token (Ziegler et al. 2019).
4. `gae_advantages`: generalised advantage estimation, computed backwards over the response;
   `masked_whiten` then normalises the advantages over the valid tokens of the batch.
5. `policy_loss` and `value_loss`: the clipped surrogate objectives (Schulman et al. 2017),
   averaged over valid tokens.
6. `FixedKLController` / `AdaptiveKLController`: the KL coefficient between rollouts.

Shapes: `[batch, response_len]` for per-token tensors, `[batch]` for per-sequence ones.
Masks are 1 for tokens that count and 0 elsewhere. Values at masked positions are never
read (they may hold padding garbage, even inf or NaN), so callers need not clean them first.
No function here knows about models, devices or distribution: the PPO stage does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ---------------------------------------------------------------- masked statistics


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() if mask.dtype == torch.bool else mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set; 0 where nothing is set (an all-masked row)."""
    valid = _valid(mask)
    total = torch.where(valid, x, torch.zeros_like(x))
    count = valid.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the valid positions (no Bessel correction: one valid token gives 0, not NaN)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid positions; masked positions come back as 0.

    `shift_mean=False` adds the mean back: the spread is normalised but the sign of the
    average is kept (used for rewards, whose mean carries information; advantages are
    centred).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_valid(mask), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------- responses and per-token quantities


def response_mask(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, finished) for generated tokens `[batch, len]`.

    The mask covers every token up to and including the first EOS; what generation
    wrote after it (padding, or more EOS when pad == eos) is excluded. A row without
    EOS ran out of `max_new_tokens`: all its tokens count and `finished` is False, so
    the reward can penalise it (`token_rewards(unfinished_penalty=...)`).
    """
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                          device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    finished = is_eos.any(dim=1)
    length = response_ids.shape[1]
    no_eos = torch.full_like(finished, length - 1, dtype=torch.long)
    first_eos = torch.where(finished, is_eos.int().argmax(dim=1), no_eos)
    positions = torch.arange(length, device=response_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long(), finished


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position in each row `[batch]`, -1 for a row with none."""
    valid = _valid(mask)
    length = mask.shape[1]
    from_end = valid.flip(dims=[1]).int().argmax(dim=1)  # first valid position, counted from the end
    return torch.where(valid.any(dim=1), length - 1 - from_end, torch.full_like(from_end, -1))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position: logits `[batch, len, vocab]`, labels `[batch, len]` -> `[batch, len]`.

    Callers align them: the logits that predict response token t come from position t-1.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: H = logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    With d = logp - logp_ref (tokens sampled from the policy), following Schulman's
    "Approximating KL divergence":
      k1 = d                        unbiased, can be negative per token
      k2 = d^2 / 2                  biased, low variance, never negative
      k3 = exp(-d) - 1 + d          unbiased, never negative
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    finished: torch.Tensor | None = None,
    unfinished_penalty: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both `[batch, len]` and 0 at masked positions.

    Every valid token earns `-kl_coef * kl`; the sequence score (from the reward model or a
    reward function) is added at the last valid token, i.e. where the response ended (its
    EOS) or was cut off. A response that did not finish (`finished` False) has
    `unfinished_penalty` subtracted from its score. A row with no valid token gets nothing.
    """
    valid = _valid(mask)
    kl = torch.where(valid, kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    score = scores.to(rewards.dtype)
    if finished is not None and unfinished_penalty:
        score = score - unfinished_penalty * (~finished.bool()).to(score.dtype)
    last = last_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards = rewards.index_put((rows, last[rows]), score[rows], accumulate=True)
    return rewards, kl


# ---------------------------------------------------------------- advantages


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation, computed backwards.

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last valid token is 0: the episode ended)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (the critic's regression target)

    Masked positions hold 0 and pass nothing on, so a response that ended early
    bootstraps from 0, not from the padding's values. Advantages are not whitened
    here; callers do `masked_whiten(advantages, mask)` over the batch.
    """
    valid = _valid(mask)
    zeros = torch.zeros_like(values)
    rewards = torch.where(valid, rewards.to(values.dtype), zeros)
    values = torch.where(valid, values, zeros)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    returns = torch.where(valid, advantages + values, zeros)
    return advantages, returns


# ---------------------------------------------------------------- losses


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # differentiable
    clip_fraction: torch.Tensor  # share of valid tokens whose ratio the clip bound
    approx_kl: torch.Tensor  # KL(old || new) on this minibatch, k3 estimator


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over valid tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)),
    with r = exp(logp - logp_old). Taking the larger loss is the pessimistic bound: a token
    gains nothing from moving its ratio beyond the clip range in the direction A favours."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of valid tokens where the clipped error was the larger one


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> ValueLoss:
    """0.5 * mean over valid tokens of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps).

    The max keeps the critic from moving further than `clip_eps` from the rollout's values
    in one PPO epoch when that move would reduce the loss."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss, clip_fraction)


# ---------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: steer the observed KL towards `target`.

        error  = clip(KL / target - 1, -0.2, 0.2)
        coef  *= 1 + error * n_steps / horizon

    The clip bounds how fast the coefficient moves on one noisy estimate; `horizon`
    (in samples) sets how many samples it takes to correct a given error.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
