"""Simulated annotators for the task world: a gold reward and noisy Bradley-Terry judges.

The stand-in for human raters, as in studies of reward-model overoptimisation (Gao et al.,
2022): the world knows the truth, so every response has a gold reward, and an annotator compares
two responses by sampling from a Bradley-Terry model on that reward, with noise.

Gold reward (`gold_reward`): correctness first, then the style the annotators prefer.

    gold = 1.0 * correct + 0.25 * well_formed + 0.25 * concise + 0.25 * polite

The style terms sum to at most 0.75, so any correct answer outranks any wrong one. well_formed:
the reply ended on its own (at end-of-turn) and has a non-empty answer; concise: nothing after
the answer beyond a full stop; polite: none of the world's rude sentences.

Annotator (`Annotator.p_first`): the probability of preferring response a over b is

    p = noise / 2 + (1 - noise) * sigmoid(beta * (gold_a - gold_b) + bias)

`noise` is the share of judgments made at random (a coin flip), `beta` how sharply the gold
reward decides the rest, and `length_bias` an optional systematic preference for longer answers
(bias = length_bias * (len_a - len_b) / 10 characters), to study reward hacking. Since p is known
for each pair, the noise-limited ceiling of any reward model's agreement with these labels is
computable exactly: the mean of max(p, 1 - p).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.config import check, opt, to_dict
from lmforge.data.world_tasks import TaskExample, extract_answer, is_correct, is_impolite
from lmforge.errors import UserError

STYLE_WEIGHT = 0.25
GOLD_MAX = 1.0 + 3 * STYLE_WEIGHT


def gold_reward(example: TaskExample, response: str, stopped: bool = True) -> float:
    """Correctness (1.0) plus three style points (0.25 each), see the module docstring."""
    answer = extract_answer(response)
    rest = response.strip()[len(answer) :].strip()
    well_formed = stopped and bool(answer)
    concise = rest in ("", ".")
    polite = not is_impolite(response)
    style = sum((well_formed, concise, polite)) * STYLE_WEIGHT
    return float(is_correct(example, response)) + style


def gold_score(example: TaskExample, response: str, stopped: bool = True) -> float:
    """The gold reward on a 0-1 scale (divided by its maximum), as alignment reports it."""
    return gold_reward(example, response, stopped) / GOLD_MAX


@dataclass(frozen=True, kw_only=True)
class Annotator:
    noise: float = opt(0.1, "share of judgments made by a coin flip")
    beta: float = opt(10.0, "how sharply the gold-reward difference decides a judgment")
    length_bias: float = opt(0.0, "extra log-odds per 10 characters of length difference")
    seed: int = opt(0, "seed of the annotator's random draws")

    def __post_init__(self) -> None:
        check(0 <= self.noise <= 1, "noise", f"must be in [0, 1] (got {self.noise})")
        check(self.beta >= 0, "beta", f"must be >= 0 (got {self.beta})")

    def p_first(self, gold_a: float, gold_b: float, len_a: int = 0, len_b: int = 0) -> float:
        """Probability that this annotator prefers a over b."""
        logit = self.beta * (gold_a - gold_b) + self.length_bias * (len_a - len_b) / 10
        return self.noise / 2 + (1 - self.noise) / (1 + math.exp(-logit))

    def settings(self) -> dict[str, Any]:
        return {"kind": "simulated", **to_dict(self)}


@dataclass(frozen=True)
class Judgment:
    chosen: int  # index of the preferred response
    rejected: int
    p_chosen: float  # the annotator's probability of preferring chosen over rejected
    gold_chosen: float
    gold_rejected: float


def judge_all(
    annotator: Annotator,
    example: TaskExample,
    responses: Sequence[str],
    stopped: Sequence[bool],
    rng: random.Random,
) -> Iterator[Judgment]:
    """One judgment per unordered pair of distinct, non-empty responses (preference files
    refuse empty replies, so a sample that ended at once is left out of the pairs)."""
    golds = [gold_reward(example, r, s) for r, s in zip(responses, stopped, strict=True)]
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j] or not (responses[i].strip() and responses[j].strip()):
                continue  # nothing to compare
            p = annotator.p_first(golds[i], golds[j], len(responses[i]), len(responses[j]))
            a, b = (i, j) if rng.random() < p else (j, i)
            p_ab = p if a == i else 1 - p
            yield Judgment(a, b, p_ab, golds[a], golds[b])


def ceiling(p_chosen: Sequence[float]) -> float:
    """The best agreement any predictor can expect with labels drawn at these probabilities."""
    return sum(max(p, 1 - p) for p in p_chosen) / max(len(p_chosen), 1)


def label_simulated(
    records: Sequence[dict[str, Any]], annotator: Annotator
) -> list[dict[str, Any]]:
    """Preference records (the canonical prefs.jsonl form) for responses.jsonl records of world
    prompts: every pair of distinct responses judged once, with the annotator's settings, its
    probability of the recorded outcome and both gold rewards kept on the record."""
    rng = random.Random(f"annotator:{annotator.seed}")
    settings = annotator.settings()
    out = []
    for n, rec in enumerate(records, start=1):
        if "task" not in rec or "answer" not in rec:
            raise UserError(
                f"record {n} ({rec.get('id', '?')}): simulated annotators judge world prompts "
                "only (the record has no 'task' and 'answer'); use the ranking page or AI labels"
            )
        prompt = rec["messages"][-1]["content"]
        example = TaskExample(rec["task"], prompt, rec["answer"])
        responses = rec["responses"]
        stopped = rec.get("stopped") or [True] * len(responses)
        for j in judge_all(annotator, example, responses, stopped, rng):
            out.append(
                {
                    "prompt": rec["messages"],
                    "chosen": responses[j.chosen],
                    "rejected": responses[j.rejected],
                    "label": 1.0,
                    "annotator": settings,
                    "id": rec.get("id"),
                    "task": rec["task"],
                    "answer": rec["answer"],
                    "p_chosen": j.p_chosen,
                    "gold_chosen": j.gold_chosen,
                    "gold_rejected": j.gold_rejected,
                }
            )
    return out
