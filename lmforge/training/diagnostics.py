"""Plain-words warnings for the known pathologies of RL on language models.

`pathologies(history)` reads the metrics rows an RL run has logged so far (oldest first) and
names what looks wrong. Each check is a small rule on the logged series; thresholds are
options because what is "too much" KL depends on the run.

- KL runaway: the policy's KL to the reference keeps growing past a bound.
- Clipping everywhere: most tokens hit PPO's ratio clip, so the updates are too large.
- Entropy collapse: the policy became (nearly) deterministic; exploration is over.
- Reward hacking: the reward model's score rises while the gold reward falls (Gao et al.,
  2022, "Scaling laws for reward model overoptimization"). Needs the gold reward, so world
  prompts only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.config import check, opt


@dataclass(frozen=True, kw_only=True)
class DiagnosticsConfig:
    max_kl: float = opt(20.0, "warn when KL to the reference (nats per response) exceeds this")
    max_clipfrac: float = opt(0.5, "warn when the share of clipped tokens exceeds this")
    min_entropy_ratio: float = opt(0.1, "warn when entropy falls below this share of its start")
    window: int = opt(20, "iterations whose halves compare reward and gold (reward hacking)")
    hacking_drop: float = opt(0.03, "gold-reward fall (0-1 scale) that counts as a real drop")

    def __post_init__(self) -> None:
        check(self.window >= 2 and self.window % 2 == 0, "window", "must be even and >= 2")


def _series(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in history if isinstance(r.get(key), int | float)]


def pathologies(
    history: Sequence[dict[str, Any]], cfg: DiagnosticsConfig, score: str = "score"
) -> dict[str, str]:
    """{name: message} for each pathology the history shows now."""
    found: dict[str, str] = {}
    kl = _series(history, "kl")
    if kl and kl[-1] > cfg.max_kl:
        found["kl_runaway"] = (
            f"KL to the reference is {kl[-1]:.1f} nats (> {cfg.max_kl:g}): the policy is drifting "
            "far from the SFT model; raise the KL coefficient or use adaptive KL"
        )
    clip = _series(history, "clipfrac")
    if clip and clip[-1] > cfg.max_clipfrac:
        found["clipping"] = (
            f"{clip[-1]:.0%} of tokens hit the ratio clip: updates are too large; lower the "
            "learning rate or the number of PPO epochs"
        )
    ent = _series(history, "entropy")
    if ent and ent[0] > 0 and ent[-1] < cfg.min_entropy_ratio * ent[0]:
        found["entropy_collapse"] = (
            f"entropy fell from {ent[0]:.3f} to {ent[-1]:.3f} nats per token: the policy has "
            "collapsed to near-deterministic answers"
        )
    rows = [r for r in history if score in r and "gold" in r][-cfg.window :]
    if len(rows) == cfg.window:
        # Halves of the window, not single iterations: each rollout's mean is noisy.
        half = cfg.window // 2
        s0, s1 = (
            sum(float(r[score]) for r in part) / len(part) for part in (rows[:half], rows[half:])
        )
        g0, g1 = (
            sum(float(r["gold"]) for r in part) / len(part) for part in (rows[:half], rows[half:])
        )
        if s1 > s0 and g0 - g1 > cfg.hacking_drop:
            found["reward_hacking"] = (
                f"reward hacking: over the last {cfg.window} iterations the reward-model score "
                f"rose ({s0:.3f} -> {s1:.3f}, means of each half) while the gold reward fell "
                f"({g0:.3f} -> {g1:.3f}); stop earlier, raise the KL coefficient, or improve "
                "the reward model"
            )
    return found
