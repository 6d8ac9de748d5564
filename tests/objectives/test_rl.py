"""PPO / GAE / KL maths against hand-computed values (Schulman et al. 2016, 2017; Schulman 2020)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmforge.objectives.rl import (
    adaptive_beta,
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)


def t(data: list) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float64)


# --- masked statistics ----------------------------------------------------------------------

X = t([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
M = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_masked_mean_ignores_padding() -> None:
    assert float(masked_mean(X, M)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert_close(masked_mean(X, M, dim=1), t([2.0, 4.0]))


def test_masked_var_is_unbiased() -> None:
    # mean 2.5, deviations -1.5 -0.5 0.5 1.5 -> squares sum to 5, over n - 1 = 3.
    assert float(masked_var(X, M)) == pytest.approx(5 / 3)


def test_masked_whiten_zero_mean_unit_variance_zero_padding() -> None:
    w = masked_whiten(X, M)
    sd = math.sqrt(5 / 3)
    want = t([[-1.5 / sd, -0.5 / sd, 0.5 / sd], [1.5 / sd, 0.0, 0.0]])
    assert_close(w, want)
    assert float(masked_mean(w, M)) == pytest.approx(0.0, abs=1e-12)
    assert float(masked_var(w, M)) == pytest.approx(1.0)


def test_masked_whiten_without_shift_keeps_the_mean() -> None:
    w = masked_whiten(X, M, shift_mean=False)
    sd = math.sqrt(5 / 3)
    want = t([[2.5 - 1.5 / sd, 2.5 - 0.5 / sd, 2.5 + 0.5 / sd], [2.5 + 1.5 / sd, 0.0, 0.0]])
    assert_close(w, want)
    assert float(masked_mean(w, M)) == pytest.approx(2.5)
    assert float(masked_var(w, M)) == pytest.approx(1.0)


# --- KL estimators ----------------------------------------------------------------------------


def test_kl_estimators_at_known_log_probs() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -1.0, -0.5])
    assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0]))
    # k3 = exp(ref - logp) - 1 - (ref - logp): ref - logp = -1, 1, 0.
    want_k3 = [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0]
    assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(want_k3))
    assert kl_penalty(logp, ref).tolist() == kl_penalty(logp, ref, "k1").tolist()  # default k1


def test_k3_is_never_negative() -> None:
    logp = torch.linspace(-8, 0, 41)
    ref = logp.flip(0)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k1_and_k3_are_unbiased_exactly_in_expectation() -> None:
    # Expectation over the policy p of a 3-way categorical, summed exactly (no sampling).
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.5)
    logp, ref = t(p).log(), t(q).log()
    for kind in ("k1", "k3"):
        assert float((t(p) * kl_penalty(logp, ref, kind)).sum()) == pytest.approx(kl)


# --- per-token rewards ------------------------------------------------------------------------


def test_token_rewards_kl_everywhere_score_at_last_real_token() -> None:
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    score = t([1.0, -2.0])
    got = token_rewards(score, kl, beta=0.5, mask=mask)
    want = t([[-0.05, -0.10, -0.15 + 1.0], [-0.20, -0.25 - 2.0, 0.0]])
    assert_close(got, want)


# --- GAE --------------------------------------------------------------------------------------

ONE = t([[1.0, 1.0, 1.0]])


def test_gae_undiscounted_known_trajectory() -> None:
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, ONE, gamma=1.0, lam=0.95)
    # delta_t = r_t + V_{t+1} - V_t, with V_3 = 0.
    d2 = 1.0 + 0.0 - 0.7  # 0.3
    d1 = 0.0 + 0.7 - 0.6  # 0.1
    d0 = 0.0 + 0.6 - 0.5  # 0.1
    a2 = d2  # 0.3
    a1 = d1 + 0.95 * a2  # 0.385
    a0 = d0 + 0.95 * a1  # 0.46575
    assert_close(adv, t([[a0, a1, a2]]))
    assert_close(ret, t([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))  # 0.96575, 0.985, 1.0


def test_gae_discounted_known_trajectory() -> None:
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, ONE, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.7  # 0.3
    d1 = 0.9 * 0.7 - 0.6  # 0.03
    d0 = 0.9 * 0.6 - 0.5  # 0.04
    a2 = d2
    a1 = d1 + 0.45 * a2  # 0.165
    a0 = d0 + 0.45 * a1  # 0.11425
    assert_close(adv, t([[a0, a1, a2]]))
    assert_close(ret, adv + values)


def test_gae_lambda_one_gives_discounted_monte_carlo_returns() -> None:
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    _, ret = gae(rewards, values, ONE, gamma=0.9, lam=1.0)
    assert_close(ret, t([[0.81, 0.9, 1.0]]))


def test_gae_padded_batch_rows_are_independent() -> None:
    # Row 1 has 2 real tokens; its padding holds junk that must not leak in.
    rewards = t([[0.0, 0.0, 1.0], [2.0, 0.5, 5.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.25, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 1 by hand: d1 = 0.5 + 0 - 0.25 = 0.25, d0 = 2 + 0.25 - 1 = 1.25.
    a1 = 0.25
    a0 = 1.25 + 0.95 * a1  # 1.4875
    assert_close(adv[1], t([a0, a1, 0.0]))
    assert_close(ret[1], t([a0 + 1.0, a1 + 0.25, 0.0]))
    assert_close(adv[0], t([0.46575, 0.385, 0.3]))
    # Each row alone gives the same answer as in the batch.
    for i in range(2):
        a, r = gae(rewards[i : i + 1], values[i : i + 1], mask[i : i + 1], 1.0, 0.95)
        assert_close(a[0], adv[i])
        assert_close(r[0], ret[i])
    # Changing the other row changes nothing in this one.
    other = rewards.clone()
    other[0] = t([7.0, -3.0, 4.0])
    assert_close(gae(other, values, mask, 1.0, 0.95)[0][1], adv[1])


# --- PPO losses -------------------------------------------------------------------------------

# clip = 0.2; (ratio, advantage) per token, the last one padding.
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]]
ADV = t([[1.0, 1.0, 1.0], [-2.0, -2.0, 5.0]])
PMASK = t([[1, 1, 1], [1, 1, 0]])


def _policy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])
    logp = (old + t(RATIOS).log()).requires_grad_(True)
    return logp, old


def test_clipped_policy_loss_by_hand() -> None:
    logp, old = _policy_inputs()
    loss, stats = clipped_policy_loss(logp, old, ADV, PMASK, clip=0.2)
    # Per token max(-A r, -A clip(r, 0.8, 1.2)):
    per_token = [
        max(-1.1, -1.1),  # in range: -1.1
        max(-1.5, -1.2),  # A > 0, r above range: clipped, -1.2
        max(-0.5, -0.8),  # A > 0, r below range: unclipped (pessimistic), -0.5
        max(1.0, 1.6),  # A < 0, r below range: clipped, 1.6
        max(3.0, 2.4),  # A < 0, r above range: unclipped, 3.0
    ]
    assert float(loss.detach()) == pytest.approx(sum(per_token) / 5)  # 0.36
    assert float(stats["clipfrac"]) == pytest.approx(2 / 5)
    real = [1.1, 1.5, 0.5, 0.5, 1.5]
    approx_kl = sum(r - 1 - math.log(r) for r in real) / 5
    assert float(stats["approx_kl"]) == pytest.approx(approx_kl)


def test_clipped_tokens_get_no_gradient() -> None:
    logp, old = _policy_inputs()
    loss, _ = clipped_policy_loss(logp, old, ADV, PMASK, clip=0.2)
    loss.backward()
    # d/dlogp of -A r is -A r, over 5 real tokens; clipped and padding tokens give 0.
    want = t([[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 2.0 * 1.5 / 5, 0.0]])
    assert logp.grad is not None
    assert_close(logp.grad, want)


def test_clipped_value_loss_by_hand() -> None:
    values = t([[1.0, 0.6, 0.0], [0.0, 42.0, 0.0]])
    old = t([[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]])
    returns = t([[1.0, 1.0, 1.0], [-0.5, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, frac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # V_clipped = 0.7, 0.6, 0.3, 0.3; (err, err_clipped) = (0, .09) (.16, .16) (1, .49) (.25, .64)
    assert float(loss) == pytest.approx(0.5 * (0.09 + 0.16 + 1.0 + 0.64) / 4)  # 0.23625
    assert float(frac) == pytest.approx(2 / 4)


def test_explained_variance() -> None:
    returns = t([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(
        0.0, abs=1e-12
    )
    # Residuals 0, 0, 0, 1: unbiased var 0.25; Var(returns) = 5/3 -> 1 - 0.15.
    values = t([[1.0, 2.0, 3.0, 3.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))


@pytest.mark.parametrize(
    ("kl", "want"),
    [
        (6.0, 0.1),  # on target: no change
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # error +0.1
        (9.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # error +0.5 clipped to +0.2
        (5.4, 0.1 * (1 - 0.1 * 256 / 10000)),  # error -0.1
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # error -1 clipped to -0.2
    ],
)
def test_adaptive_beta(kl: float, want: float) -> None:
    assert adaptive_beta(0.1, kl, target=6.0, horizon=10000, n=256) == pytest.approx(want)


def test_entropy() -> None:
    assert_close(entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    assert_close(entropy(torch.full((4, 5), 3.0)), torch.full((4,), math.log(5)))
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert float(entropy(probs.log())) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
