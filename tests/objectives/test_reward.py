"""Pairwise losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.objectives.reward import bradley_terry_loss, pairwise_accuracy


def test_bradley_terry_loss_at_known_rewards() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    want = (-math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 2
    assert float(bradley_terry_loss(rc, rr)) == pytest.approx(want)
    # A margin shifts the difference: d = 1 - 1 = 0 -> log 2.
    assert float(bradley_terry_loss(rc[:1], rr[:1], margin=1.0)) == pytest.approx(math.log(2))


def test_soft_labels_are_a_cross_entropy_and_half_is_symmetric() -> None:
    rc, rr = torch.tensor([3.0]), torch.tensor([1.0])
    half = torch.tensor([0.5])
    assert float(bradley_terry_loss(rc, rr, half)) == pytest.approx(
        float(bradley_terry_loss(rr, rc, half))
    )
    ones = torch.tensor([1.0])
    assert float(bradley_terry_loss(rc, rr, ones)) == pytest.approx(
        float(bradley_terry_loss(rc, rr))
    )


def test_pairwise_accuracy_counts_ties_half() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])) == 0.5
