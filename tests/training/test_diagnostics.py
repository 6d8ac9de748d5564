"""Each pathology warning fires on a history built to show it, and none on a clean one."""

from __future__ import annotations

from typing import Any

from lmforge.training.diagnostics import DiagnosticsConfig, pathologies

CFG = DiagnosticsConfig()  # max_kl 20, max_clipfrac 0.5, min_entropy_ratio 0.1, window 20


def clean(n: int = 20) -> list[dict[str, Any]]:
    """Steady KL well below the bound, few clipped tokens, entropy easing slowly, and the
    reward-model score and the gold reward rising together."""
    return [
        {
            "kl": 5.0 + 0.1 * i,
            "clipfrac": 0.1,
            "entropy": 2.0 - 0.02 * i,
            "score": 0.1 + 0.01 * i,
            "gold": 0.2 + 0.01 * i,
        }
        for i in range(n)
    ]


def with_last(key: str, value: float) -> list[dict[str, Any]]:
    rows = clean()
    rows[-1] = {**rows[-1], key: value}
    return rows


def test_clean_history_raises_nothing() -> None:
    assert pathologies(clean(), CFG) == {}
    assert pathologies([], CFG) == {}


def test_kl_runaway() -> None:
    rows = clean()
    for i, r in enumerate(rows):
        r["kl"] = 5.0 + 1.2 * i  # 5 -> 27.8
    found = pathologies(rows, CFG)
    assert set(found) == {"kl_runaway"}
    assert "27.8" in found["kl_runaway"]
    # The bound is on the latest value: a run whose KL came back below it is not flagged.
    assert pathologies(with_last("kl", 19.9), CFG) == {}
    assert "kl_runaway" in pathologies(clean(), DiagnosticsConfig(max_kl=6.0))


def test_clipping_everywhere() -> None:
    found = pathologies(with_last("clipfrac", 0.8), CFG)
    assert set(found) == {"clipping"}
    assert "80%" in found["clipping"]
    assert pathologies(with_last("clipfrac", 0.5), CFG) == {}  # at the bound, not over it


def test_entropy_collapse() -> None:
    found = pathologies(with_last("entropy", 0.1), CFG)  # 0.1 < 0.1 * 2.0
    assert set(found) == {"entropy_collapse"}
    assert pathologies(with_last("entropy", 0.25), CFG) == {}  # 0.25 > 0.2


def test_reward_hacking_fires_when_score_rises_and_gold_falls() -> None:
    rows = clean()
    for i, r in enumerate(rows):
        r["score"] = 0.1 + 0.02 * i
        r["gold"] = 0.8 - 0.01 * i
    # Half means: gold 0.8 - 0.045 = 0.755 -> 0.8 - 0.145 = 0.655, a fall of 0.1 > 0.03.
    found = pathologies(rows, CFG)
    assert set(found) == {"reward_hacking"}
    assert "0.755 -> 0.655" in found["reward_hacking"]


def test_reward_hacking_needs_a_real_gold_drop_and_a_full_window() -> None:
    rows = clean()
    for i, r in enumerate(rows):
        r["score"] = 0.1 + 0.02 * i
        r["gold"] = 0.8 - 0.002 * i  # half means fall by 0.02 < hacking_drop
    assert pathologies(rows, CFG) == {}
    falling = [{"score": 0.1 + 0.02 * i, "gold": 0.8 - 0.01 * i} for i in range(19)]
    assert pathologies(falling, CFG) == {}  # 19 rows < window
    # Both falling: the score did not rise, so this is not hacking.
    both = [{"score": 0.5 - 0.02 * i, "gold": 0.8 - 0.01 * i} for i in range(20)]
    assert pathologies(both, CFG) == {}


def test_reward_hacking_reads_the_named_score() -> None:
    rows = [{"reward": 0.1 + 0.02 * i, "gold": 0.8 - 0.01 * i} for i in range(20)]
    assert pathologies(rows, CFG) == {}  # no "score" key
    assert set(pathologies(rows, CFG, score="reward")) == {"reward_hacking"}
