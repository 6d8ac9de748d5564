"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.objectives.dpo import dpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pair(pc: float, pr: float, rc: float, rr: float, grad: bool = False) -> list[torch.Tensor]:
    out = [torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)]
    out[0].requires_grad_(grad)
    return out


def test_sigmoid_loss_and_implicit_rewards_at_known_log_probs() -> None:
    pc, pr, rc, rr = pair(-1.0, -3.0, -2.0, -2.0, grad=True)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; loss = -log sigmoid(0.1 * 2).
    assert float(loss.detach()) == pytest.approx(-math.log(sigmoid(0.2)))  # 0.598139
    assert float(chosen) == pytest.approx(0.1 * 1.0)
    assert float(rejected) == pytest.approx(0.1 * -1.0)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h); dh/d(policy chosen) = 1.
    assert pc.grad is not None
    assert float(pc.grad) == pytest.approx(-0.1 * sigmoid(-0.2))


def test_policy_equal_to_reference_gives_log_two() -> None:
    logps = torch.tensor([-4.0, -1.5, -7.0])
    others = torch.tensor([-2.0, -9.0, -0.5])
    loss, chosen, rejected = dpo_loss(logps, others, logps, others, beta=0.5)
    assert float(loss) == pytest.approx(math.log(2))
    assert chosen.tolist() == [0.0, 0.0, 0.0] and rejected.tolist() == [0.0, 0.0, 0.0]


def test_loss_is_the_batch_mean() -> None:
    # Pair 1: h = 2; pair 2: h = (0 - 0) - (-1 - -2) = -1.
    pc, pr = torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, 0.0]), torch.tensor([-2.0, -2.0])
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    want = (-math.log(sigmoid(0.2)) - math.log(sigmoid(-0.1))) / 2
    assert float(loss) == pytest.approx(want)


def test_soft_labels_are_a_cross_entropy() -> None:
    pc, pr, rc, rr = pair(-1.0, -3.0, -2.0, -2.0)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label=torch.tensor([0.8]))
    want = -(0.8 * math.log(sigmoid(0.2)) + 0.2 * math.log(sigmoid(-0.2)))
    assert float(loss) == pytest.approx(want)
    ones, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label=torch.tensor([1.0]))
    assert float(ones) == pytest.approx(-math.log(sigmoid(0.2)))


def test_half_label_is_symmetric_and_pulls_the_margin_to_zero() -> None:
    half = torch.tensor([0.5], dtype=torch.float64)
    pc, pr, rc, rr = pair(-1.0, -3.0, -2.0, -2.0, grad=True)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label=half)
    want = 0.5 * (-math.log(sigmoid(0.2)) - math.log(sigmoid(-0.2)))
    assert float(loss.detach()) == pytest.approx(want)
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.1, label=half)
    assert float(swapped.detach()) == pytest.approx(want)
    loss.backward()
    # d/dh = 0.5 beta (sigmoid(beta h) - sigmoid(-beta h)) > 0 at h = 2: descent lowers h.
    assert pc.grad is not None
    assert float(pc.grad) == pytest.approx(0.05 * (sigmoid(0.2) - sigmoid(-0.2)))
    # At h = 0 the half label is at its minimum: zero gradient, loss log 2.
    pc0, pr0, rc0, rr0 = pair(-2.0, -2.0, -2.0, -2.0, grad=True)
    loss0, _, _ = dpo_loss(pc0, pr0, rc0, rr0, beta=0.1, label=half)
    loss0.backward()
    assert float(loss0.detach()) == pytest.approx(math.log(2))
    assert pc0.grad is not None
    assert float(pc0.grad) == pytest.approx(0.0, abs=1e-12)


def test_ipo_loss_is_squared_distance_to_half_inverse_beta() -> None:
    # beta = 0.1 -> target margin 1 / (2 * 0.1) = 5. Pair 1: h = 2 -> 9. Pair 2: h = 5 -> 0.
    pc, pr = torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, -5.0])
    rc, rr = torch.tensor([-2.0, 0.0]), torch.tensor([-2.0, 0.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert float(loss) == pytest.approx(((2 - 5) ** 2 + (5 - 5) ** 2) / 2)  # 4.5
    assert chosen.tolist() == pytest.approx([0.1, 0.0])
    assert rejected.tolist() == pytest.approx([-0.1, -0.5])


def test_ipo_half_label_targets_zero_margin() -> None:
    pc, pr, rc, rr = pair(-1.0, -3.0, -2.0, -2.0)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="ipo", label=torch.tensor([0.5]))
    assert float(loss) == pytest.approx(2.0**2)
