"""The maths of policy optimisation on token sequences: pure functions shared by PPO and GRPO.

Every tensor is (B, R): B responses, R response positions, right-padded; `mask` is 1 on real
response tokens. References: Schulman et al. 2017 (PPO, clipped surrogate), Schulman et al.
2016 (GAE), Ziegler et al. 2019 and Ouyang et al. 2022 (per-token KL penalty, adaptive KL
controller), Huang et al. 2024 ("The N+ implementation details of RLHF with PPO": whitening,
clipped value loss), Schulman 2020 ("Approximating KL divergence": the k1/k2/k3 estimators).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


# Sums a tensor of partial sums over the processes that hold the rest of the batch (under
# torchrun, `distributed.total`); the identity when one process holds it all.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of x over the masked positions of the whole batch: the
    counts and sums are reduced before dividing, so split batches get the one-process result."""
    mask = mask.to(x.dtype)
    count = reduce(mask.sum())
    mean = reduce((x * mask).sum()) / count.clamp_min(1)
    var = reduce(((x - mean) ** 2 * mask).sum()) / (count.clamp_min(2) - 1)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """Unbiased variance of x over the masked positions."""
    return masked_moments(x, mask, reduce)[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce = _local,
) -> torch.Tensor:
    """x scaled to unit variance over the masked positions (and zero mean if shift_mean);
    padding comes out as 0."""
    mean, var = masked_moments(x, mask, reduce)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


# Estimators of KL(policy || reference) from one sample's log-probs (Schulman 2020):
# k1 is unbiased but can be negative, k3 is unbiased and never negative, k2 is biased, low-variance.
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": lambda logp, ref: logp - ref,
    "k2": lambda logp, ref: 0.5 * (logp - ref) ** 2,
    "k3": lambda logp, ref: torch.expm1(ref - logp) - (ref - logp),
}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens."""
    return KL_ESTIMATORS[kind](logp, ref_logp)


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor
) -> torch.Tensor:
    """InstructGPT's per-token reward: -beta * KL at every response token, plus the sequence's
    score (B,) at its last token."""
    rewards = -beta * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp_min(0)  # (B,)
    return rewards.index_put((torch.arange(len(score)), last), score, accumulate=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages, returns), both (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and r
    taken as 0 past the end of each response (the episode ends at its last token).
    """
    rewards, values = rewards * mask, values * mask
    R = rewards.size(1)
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over tokens: loss and (clip fraction, approx KL).

    approx_kl is k3 of the old policy against the new, the estimate most implementations log.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped kept within `clip` of the rollout's
    values; returns (loss, share of tokens where the clipped term won)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).float(), mask).detach()


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local
) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a
    constant, negative worse."""
    var = masked_var(returns, mask, reduce)
    unexplained = masked_var(returns - values, mask, reduce)
    return float(1 - unexplained / var) if var > 0 else float("nan")


def adaptive_beta(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: move beta toward keeping the per-sequence KL at
    `target`, by at most 20% of the error per `horizon` samples (n samples just seen)."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n / horizon)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
