"""Gold reward and simulated annotators: correctness first, style second, known noise."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.data.world_tasks import TaskExample
from lmforge.feedback.simulated import Annotator, ceiling, gold_reward, judge_all

EX = TaskExample("arithmetic", "What is 3 plus 4?", "7")


def test_gold_reward_orders_correctness_before_style() -> None:
    good = gold_reward(EX, "7")
    assert good == 1.75
    assert gold_reward(EX, "7.") == 1.75
    assert gold_reward(EX, "7. I hope this helps. Feel free to ask me another question.") == 1.5
    assert gold_reward(EX, "7. Stop wasting my time.") == 1.25  # rude and not concise
    assert gold_reward(EX, "7", stopped=False) == 1.5  # never ended its turn
    assert gold_reward(EX, "8") == 0.75  # wrong but tidy: still below every correct answer
    assert max(gold_reward(EX, r) for r in ("8", "9.", "")) < min(
        gold_reward(EX, r, s) for r in ("7", "7. Stop wasting my time.") for s in (True, False)
    )


def test_annotator_probability_bradley_terry_with_noise() -> None:
    a = Annotator(noise=0.1, beta=2.0)
    assert a.p_first(1.0, 1.0) == pytest.approx(0.5)
    assert a.p_first(1.5, 1.0) == pytest.approx(0.05 + 0.9 / (1 + math.exp(-1.0)))
    assert Annotator(noise=1.0).p_first(5.0, 0.0) == pytest.approx(0.5)  # pure coin flips
    assert Annotator(noise=0.0, beta=100).p_first(1.0, 0.0) == pytest.approx(1.0)
    biased = Annotator(noise=0.0, beta=1.0, length_bias=1.0)
    assert biased.p_first(1.0, 1.0, len_a=30, len_b=10) == pytest.approx(1 / (1 + math.exp(-2)))


def test_judgments_follow_the_annotator_probability() -> None:
    a = Annotator(noise=0.2)
    rng = random.Random(0)
    wins = sum(
        next(judge_all(a, EX, ["7", "8"], [True, True], rng)).chosen == 0 for _ in range(4000)
    )
    p = a.p_first(gold_reward(EX, "7"), gold_reward(EX, "8"))
    assert abs(wins / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000)


def test_identical_responses_are_not_compared_and_ceiling_is_exact() -> None:
    js = list(judge_all(Annotator(), EX, ["7", "7", "8", " "], [True] * 4, random.Random(0)))
    assert len(js) == 2  # (0, 2) and (1, 2); the identical pair and the empty reply are skipped
    assert ceiling([0.9, 0.1, 0.5]) == pytest.approx((0.9 + 0.9 + 0.5) / 3)
