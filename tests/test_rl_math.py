"""PPO math (distft/rl) against values computed by hand on tiny tensors.

Each expected number is worked out in the comment beside it, so a failure
points at the formula, not at another implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from distft.rl import (
    AdaptiveKLController,
    FixedKLController,
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

INF, NAN = float("inf"), float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(got, want, tol=1e-6):
    want = torch.as_tensor(want, dtype=torch.float64)
    assert torch.allclose(got.double(), want, atol=tol, rtol=0), f"{got} != {want}"


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_masked_positions_even_inf_and_nan():
    x = t([1, 2, INF], [4, NAN, 6])
    mask = t([1, 1, 0], [1, 0, 0])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1
    assert masked_mean(x, mask.bool()).item() == pytest.approx(7 / 3)  # boolean masks work too


def test_masked_mean_of_an_all_masked_row_is_zero_not_nan():
    x = t([1, 2, 3], [5, 6, 7])
    mask = t([1, 1, 0], [0, 0, 0])
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])
    close(masked_mean(x, torch.zeros_like(x)), 0.0)


def test_masked_var_and_whiten():
    x = t([1, 2, 3, 100])
    mask = t([1, 1, 1, 0])
    # mean = 2, population variance = ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3
    close(masked_var(x, mask), 2 / 3)
    # (x - 2) / sqrt(2/3): 1 / 0.8164966 = 1.2247449; the masked 100 comes back as 0
    close(masked_whiten(x, mask), [[-1.2247449, 0.0, 1.2247449, 0.0]])
    # shift_mean=False adds the mean (2) back: spread normalised, level kept
    close(masked_whiten(x, mask, shift_mean=False), [[0.7752551, 2.0, 3.2247449, 0.0]])
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0, tol=1e-6)


def test_whiten_all_masked_and_single_token_are_finite():
    x = t([3, 4])
    assert torch.equal(masked_whiten(x, torch.zeros_like(x)), torch.zeros_like(x))
    # one valid token: variance 0, so (3 - 3) / sqrt(0 + eps) = 0
    close(masked_whiten(x, t([1, 0])), [[0.0, 0.0]])


# ---------------------------------------------------------------- responses


def test_response_mask_stops_after_the_first_eos_and_flags_unfinished_rows():
    eos = 2
    ids = torch.tensor(
        [
            [5, 7, 2, 0, 0],  # ends at position 2: the EOS itself counts, the padding after it not
            [5, 2, 2, 2, 2],  # pad == eos: only the first EOS counts
            [5, 6, 7, 8, 9],  # no EOS: ran out of max_new_tokens, every token counts, unfinished
            [2, 0, 0, 0, 0],  # empty answer: just the EOS
        ]
    )
    mask, finished = response_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, True, False, True]
    # several EOS ids (chat models often have an end-of-turn token too): 9 ends row 2 at its last token
    mask, finished = response_mask(ids, [2, 9])
    assert mask[2].tolist() == [1, 1, 1, 1, 1] and finished.tolist() == [True, True, True, True]
    mask, _ = response_mask(torch.tensor([[5, 9, 7, 2, 2]]), [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0, 0]]


def test_last_index():
    mask = t([1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0])
    assert last_index(mask).tolist() == [2, 3, -1, 2]


def test_logprobs_and_entropy_from_logits():
    # position 0: logits (0, 0) -> p = (1/2, 1/2); position 1: logits (0, ln 3) -> p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[0, 1]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.5), math.log(0.75)]])  # -0.693147, -0.287682
    # H = ln 2 = 0.693147;  H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(logits), [[0.6931472, 0.5623351]])


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # d = logp - ref = (0.5, -1.0)
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.125, 0.5]])  # d^2 / 2
    # exp(ref - logp) - 1 - (ref - logp): e^-0.5 - 1 + 0.5 = 0.1065307;  e^1 - 1 - 1 = 0.7182818
    close(kl_penalty(logp, ref, "k3"), [[0.1065307, 0.7182818]])
    close(kl_penalty(ref, ref, "k3"), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_token_rewards_put_the_score_on_the_last_valid_token():
    scores = torch.tensor([2.0, -1.0, 5.0], dtype=torch.float64)
    logp = t([-1, -1, -1, -1], [-2, -2, -2, -2], [-1, -1, -1, -1])
    ref = t([-1.5, -1, -0.5, 9], [-1, 7, 7, 7], [0, 0, 0, 0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    rewards, kl = token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # row 0: k1 = (0.5, 0, -0.5), rewards -0.1 * k1 = (-0.05, 0, 0.05), + score 2 at index 2 -> 2.05
    # row 1 ends after one token: k1 = -1 -> 0.1, + score -1 -> -0.9; the padding's garbage is ignored
    # row 2 has no valid token: nothing, not even its score
    close(rewards, [[-0.05, 0.0, 2.05, 0.0], [-0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(kl, [[0.5, 0.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_unfinished_responses_are_penalised():
    scores = torch.tensor([2.0, -1.0], dtype=torch.float64)
    logp, ref = t([-1, -1], [-2, -2]), t([-1, -1], [-1, -1])
    mask = t([1, 1], [1, 1])
    finished = torch.tensor([True, False])
    rewards, _ = token_rewards(scores, logp, ref, mask, kl_coef=0.1, finished=finished, unfinished_penalty=1.0)
    # row 0 finished: (0, 2); row 1 did not: k1 = -1 each -> +0.1 each, score -1 - 1 = -2 -> (0.1, -1.9)
    close(rewards, [[0.0, 2.0], [0.1, -1.9]])
    rewards, _ = token_rewards(scores, logp, ref, mask, kl_coef=0.0, estimator="k2")
    close(rewards, [[0.0, 2.0], [0.0, -1.0]])  # no penalty unless asked, and no KL term at kl_coef 0


# ---------------------------------------------------------------- GAE


def test_gae_by_hand():
    rewards, values, mask = t([1, 0, 2]), t([0.5, 1.0, 1.5]), t([1, 1, 1])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 2 + 0.9 * 0 - 1.5 = 0.5                  A2 = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35               A1 = 0.35 + 0.72 * 0.5  = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4                A0 = 1.4  + 0.72 * 0.71 = 1.9112
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])  # A + V


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    adv, ret = gae_advantages(t([1, 0, 2]), t([0.5, 1.0, 1.5]), t([1, 1, 1]), gamma=1.0, lam=1.0)
    close(adv, [[3 - 0.5, 2 - 1.0, 2 - 1.5]])  # rewards to go: 3, 2, 2
    close(ret, [[3.0, 2.0, 2.0]])


def test_gae_for_a_response_that_ends_early_ignores_the_padding():
    rewards, values, mask = t([1, 2, 99]), t([0.5, 1.0, 7.0]), t([1, 1, 0])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2 is padding: A2 = 0 and it bootstraps nothing (V after the end is 0, not 7)
    # t=1: delta = 2 + 0.9 * 0 - 1.0 = 1.0                  A1 = 1.0
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4                A0 = 1.4 + 0.72 * 1.0 = 2.12
    close(adv, [[2.12, 1.0, 0.0]])
    close(ret, [[2.62, 2.0, 0.0]])
    short, _ = gae_advantages(t([1, 2]), t([0.5, 1.0]), t([1, 1]), gamma=0.9, lam=0.8)
    close(adv[:, :2], short)  # the same as the unpadded response


def test_gae_all_masked_row_is_zero():
    adv, ret = gae_advantages(t([1, 2], [3, 4]), t([1, 1], [1, 1]), t([1, 1], [0, 0]), gamma=1.0, lam=1.0)
    close(adv[1], [0.0, 0.0])
    close(ret[1], [0.0, 0.0])
    close(adv[0], [2.0, 1.0])  # rewards to go 3, 2 minus V = 1


# ---------------------------------------------------------------- losses


def test_clipped_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7, 50.0]], dtype=torch.float64)
    old = torch.zeros_like(ratios)
    logp = ratios.log().requires_grad_()
    adv = t([1, 1, -1, -1, 1])
    mask = t([1, 1, 1, 1, 0])  # the fifth token (ratio 50) is padding
    out = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token  r    A   -A*r   -A*clip(r)   max     clipped?
    #   0   1.5   1   -1.5   -1.2         -1.2    yes (gains nothing beyond 1.2)
    #   1   0.5   1   -0.5   -0.8         -0.5    no  (the pessimistic unclipped term)
    #   2   1.1  -1    1.1    1.1          1.1    no  (inside the range)
    #   3   0.7  -1    0.7    0.8          0.8    yes
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    close(out.loss, 0.05)
    close(out.clip_fraction, 0.5)
    # approx KL (k3 of old vs new) = mean((r - 1) - ln r):
    #   0.5 - 0.405465 = 0.094535; -0.5 + 0.693147 = 0.193147; 0.1 - 0.095310 = 0.004690; -0.3 + 0.356675 = 0.056675
    close(out.approx_kl, (0.0945349 + 0.1931472 + 0.0046898 + 0.0566749) / 4)
    out.loss.backward()
    # clipped tokens get no gradient; token 1: d(-A * r / 4)/d logp = -A * r / 4 = -0.125; padding none
    close(logp.grad[0, [0, 1, 3, 4]], [0.0, -0.125, 0.0, 0.0])


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logp = t([-1.0, -2.0, -3.0])
    out = policy_loss(logp, logp.clone(), t([2.0, -1.0, 4.0]), t([1, 1, 0]))
    close(out.loss, -(2.0 - 1.0) / 2)
    close(out.clip_fraction, 0.0)
    close(out.approx_kl, 0.0)


def test_clipped_value_loss_by_hand():
    values = t([2.0, 0.0, 1.05, 3.0, 100.0])
    old = t([1.0, 0.5, 1.0, 3.0, 0.0])
    returns = t([3.0, 0.2, 1.0, 0.0, 0.0])
    mask = t([1, 1, 1, 1, 0])
    out = value_loss(values, old, returns, mask, clip_eps=0.2)
    # token  V     V_old  V_clip  (V-R)^2            (V_clip-R)^2        max
    #   0   2.0    1.0    1.2     (2-3)^2 = 1        (1.2-3)^2 = 3.24    3.24  clipped is larger
    #   1   0.0    0.5    0.3     (0-0.2)^2 = 0.04   (0.3-0.2)^2 = 0.01  0.04
    #   2   1.05   1.0    1.05    0.0025             0.0025              0.0025
    #   3   3.0    3.0    3.0     9                  9                   9
    # loss = 0.5 * (3.24 + 0.04 + 0.0025 + 9) / 4 = 0.5 * 3.070625 = 1.5353125; padding ignored
    close(out.loss, 1.5353125)
    close(out.clip_fraction, 0.25)


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9 is 50% over target; the error is clipped to +0.2: coef *= 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    # KL 3 is 50% under: clipped to -0.2: coef *= 0.99488 -> 0.1 * 1.00512 * 0.99488 = 0.1 * (1 - 0.00512^2)
    assert ctl.update(3.0, 256) == pytest.approx(0.1 * (1 - 0.00512**2))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 6.6: error 0.1, inside the clip: coef *= 1 + 0.1 * 1000 / 10000 = 1.01
    assert ctl.update(6.6, 1000) == pytest.approx(0.101)
    assert ctl.update(6.0, 1000) == pytest.approx(0.101)  # on target: unchanged
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ---------------------------------------------------------------- together


def test_one_rollout_end_to_end_early_ending_response_matches_its_unpadded_self():
    """response_mask -> token_rewards -> GAE -> whitening: padding after EOS changes nothing."""
    eos = 2
    padded = torch.tensor([[5, 6, 2, 0, 0]])
    mask, finished = response_mask(padded, eos)
    logp = t([-1.0, -0.5, -0.2, 3.0, 3.0])
    ref = t([-1.2, -0.4, -0.2, 0.0, 0.0])
    values = t([0.3, 0.6, 0.9, 5.0, 5.0])
    score = torch.tensor([1.0], dtype=torch.float64)
    rewards, _ = token_rewards(score, logp, ref, mask, kl_coef=0.2, finished=finished, unfinished_penalty=1.0)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)

    unpadded_mask = torch.ones(1, 3)
    r2, _ = token_rewards(score, logp[:, :3], ref[:, :3], unpadded_mask, kl_coef=0.2)
    adv2, ret2 = gae_advantages(r2, values[:, :3], unpadded_mask, gamma=1.0, lam=0.95)
    close(adv[:, :3], adv2)
    close(ret[:, :3], ret2)
    close(adv[:, 3:], [[0.0, 0.0]])
    # rewards by hand: k1 = (0.2, -0.1, 0) -> -0.2 * k1 = (-0.04, 0.02, 0) and +1 at the EOS
    close(rewards, [[-0.04, 0.02, 1.0, 0.0, 0.0]])
