"""Group-relative advantages (Shao et al. 2024) against hand-computed values."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from lmforge.objectives.grpo import group_advantages

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 2.5]], dtype=torch.float64)


def test_group_advantages_by_hand_with_unbiased_std() -> None:
    # Row 0: mean 0.5, centred +-0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3).
    # (A population std would be 0.5 and give exactly +-1.)
    s0 = math.sqrt(1 / 3) + 1e-4
    # Row 1: mean 1.0, centred -1, -0.5, 0, 1.5; squares sum 3.5 -> std sqrt(3.5 / 3).
    s1 = math.sqrt(3.5 / 3) + 1e-4
    want = torch.tensor(
        [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [-1 / s1, -0.5 / s1, 0.0, 1.5 / s1]],
        dtype=torch.float64,
    )
    assert_close(group_advantages(REWARDS), want)
    assert abs(float(group_advantages(REWARDS)[0, 0]) - 0.8660) < 1e-3


def test_all_equal_group_gets_zero_advantage() -> None:
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert adv[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert_close(adv[1], group_advantages(REWARDS)[0])  # groups are independent


def test_unscaled_advantages_only_centre() -> None:
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-1.0, -0.5, 0.0, 1.5]], dtype=torch.float64)
    assert_close(group_advantages(REWARDS, scale=False), want)
