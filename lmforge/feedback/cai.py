"""Constitutional AI's two kinds of AI feedback data (Bai et al., 2022).

- SL-CAI (`revise_records`): each sampled response is critiqued under a principle drawn at
  random (seeded), revised, and the revision critiqued again, `rounds` times. The final
  revisions become SFT records (prompt -> revision, the chat format `lmforge sft` reads) and
  preference records (revision chosen over the initial response, the `pair` format `lmforge
  reward` and `lmforge dpo` read). A revision equal to the response it revised gives no pair.
- RLAIF (`label_ai`): every pair of distinct responses to a prompt is compared by the judge.
  With position-swap debiasing it is asked twice, (a, b) and (b, a), and the soft label is the
  mean of P(a) and 1 - P'(b): a judge that always prefers the first position gives 0.5. The
  label (the probability that `chosen` is better) is kept soft, optionally clamped into
  [lo, hi] so that no pair is trusted beyond what the judge deserves; the reward model's
  Bradley-Terry loss trains on it as it is (`objectives/reward.py`).

Simplifications: the judge sees the last user turn as the request; responses are judged as
finished (the well-formedness point of the gold reward assumes the reply stopped on its own).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.config import check, opt
from lmforge.data.corpora import read_jsonl
from lmforge.data.instruction import Message
from lmforge.data.preference import Preference, preference_record
from lmforge.data.world_tasks import TaskExample
from lmforge.errors import UserError
from lmforge.feedback.constitution import Constitution
from lmforge.feedback.judges import Judge, JudgeConfig
from lmforge.feedback.sampling import Prompt, SampleConfig
from lmforge.feedback.simulated import Annotator, gold_reward, gold_score
from lmforge.generation.generate import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class ReviseConfig:
    rounds: int = opt(2, "critique-revision rounds per response, a principle drawn for each")
    seed: int = opt(0, "seed of the principle draws")
    sample: SampleConfig = opt(
        SampleConfig(n=1, sampling=SamplingConfig(temperature=1.0, max_new_tokens=32)),
        "the responses to revise: K per prompt, world split and limit, sampling",
    )
    judge: JudgeConfig = opt(JudgeConfig(), "the feedback model and its constitution")

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "rounds", f"must be >= 1 (got {self.rounds})")


def parse_clamp(text: str) -> tuple[float, float] | None:
    """ "0.2..0.8" -> (0.2, 0.8); "" -> None. ValueError says what is wrong."""
    if not text:
        return None
    lo_s, sep, hi_s = text.partition("..")
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        sep = ""
    if not sep:
        raise ValueError(f"expected LO..HI such as 0.2..0.8 (got {text!r})")
    if not 0 <= lo <= 0.5 <= hi <= 1:
        raise ValueError(f"expected 0 <= LO <= 0.5 <= HI <= 1 (got {text!r})")
    return lo, hi


@dataclass(frozen=True, kw_only=True)
class AILabelConfig:
    judge: JudgeConfig = opt(JudgeConfig(), "the feedback model and its constitution")
    swap: bool = opt(True, "ask each pair both ways round and average (position debiasing)")
    clamp: str = opt("", "clamp soft labels into LO..HI, e.g. 0.2..0.8 (empty: keep them)")

    def __post_init__(self) -> None:
        try:
            parse_clamp(self.clamp)
        except ValueError as e:
            check(False, "clamp", str(e))


# ---------------------------------------------------------------------------------------------
# SL-CAI: critique -> revision


def _prompt(rec: dict[str, Any]) -> tuple[Message, ...]:
    return tuple(Message(m["role"], m["content"]) for m in rec["messages"])


def _example(rec: dict[str, Any]) -> TaskExample | None:
    if rec.get("task") is None or rec.get("answer") is None:
        return None
    return TaskExample(rec["task"], rec["messages"][-1]["content"], rec["answer"])


def record_examples(records: Sequence[dict[str, Any]]) -> list[TaskExample]:
    """The task examples of world records (those with `task` and `answer`): what the
    rule-based judge needs to know."""
    return [ex for rec in records if (ex := _example(rec)) is not None]


def prompt_examples(prompts: Sequence[Prompt]) -> list[TaskExample]:
    """The task examples of world prompts, for the rule-based judge."""
    return [
        TaskExample(p.task, p.messages[-1].content, p.answer)
        for p in prompts
        if p.task is not None and p.answer is not None
    ]


def revise_records(
    records: Sequence[dict[str, Any]],
    judge: Judge,
    constitution: Constitution,
    rounds: int,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(SFT records, preference records, summary row) from responses.jsonl records."""
    rng = random.Random(f"cai:{seed}")
    provenance = {
        "kind": "cai-revision",
        "judge": judge.settings(),
        "constitution": constitution.settings(),
        "rounds": rounds,
    }
    sft, prefs = [], []
    gold_before, gold_after = [], []
    total = sum(len(r["responses"]) for r in records)
    bar = tqdm(total=total, desc="cai revise", unit="response", disable=not progress)
    for rec in records:
        prompt, ex = _prompt(rec), _example(rec)
        request = prompt[-1].content
        stopped = rec.get("stopped") or [True] * len(rec["responses"])
        for initial, done in zip(rec["responses"], stopped, strict=True):
            text, trail = initial, []
            for _ in range(rounds):
                principle = rng.choice(constitution.principles)
                critique = judge.critique(request, text, principle)
                text = judge.revise(request, text, critique, principle)
                trail.append({"principle": principle.name, "critique": critique, "revision": text})
            bar.update(1)
            if not text.strip():
                continue  # a judge that answered nothing gives nothing to learn
            world = {"task": ex.task, "answer": ex.answer} if ex else {}
            sft.append(
                {
                    "messages": [*rec["messages"], {"role": "assistant", "content": text}],
                    "id": rec.get("id"),
                    **world,
                    "initial": initial,
                    "critiques": trail,
                }
            )
            gold = {}
            if ex is not None:
                gold = {
                    "gold_chosen": gold_reward(ex, text),
                    "gold_rejected": gold_reward(ex, initial, done),
                }
                gold_before.append(gold_score(ex, initial, done))
                gold_after.append(gold_score(ex, text))
            if text != initial and initial.strip():
                pair = Preference(prompt, text, initial)
                prefs.append(
                    preference_record(pair, annotator=provenance, id=rec.get("id"), **world, **gold)
                )
    bar.close()
    row: dict[str, Any] = {
        "responses": total,
        "sft_records": len(sft),
        "pairs": len(prefs),
        "revised_share": len(prefs) / max(1, total),
    }
    if gold_before:
        row["gold_initial"] = sum(gold_before) / len(gold_before)
        row["gold_revised"] = sum(gold_after) / len(gold_after)
    return sft, prefs, row


# ---------------------------------------------------------------------------------------------
# RLAIF: pairwise AI labels


def debiased(
    judge: Judge, prompt: str, a: str, b: str, swap: bool = True
) -> tuple[float, float, float | None]:
    """(P(a better than b), the judge's P(a) with a shown first, its P'(b) with b shown first
    (None when `swap` is off)): with the swap, the mean of P(a) and 1 - P'(b)."""
    p = judge.compare(prompt, a, b)
    if not swap:
        return p, p, None
    q = judge.compare(prompt, b, a)
    return (p + 1 - q) / 2, p, q


def label_ai(
    records: Sequence[dict[str, Any]],
    judge: Judge,
    cfg: AILabelConfig,
    constitution: Constitution,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Preference records for responses.jsonl records: each pair of distinct non-empty
    responses once, `chosen` the one the judge prefers and `label` its soft probability."""
    clamp = parse_clamp(cfg.clamp)
    provenance = {
        "kind": "ai",
        "judge": judge.settings(),
        "constitution": constitution.settings(),
        "swap": cfg.swap,
        "clamp": cfg.clamp,
    }
    out = []
    bar = tqdm(total=len(records), desc="label (ai)", unit="prompt", disable=not progress)
    for rec in records:
        prompt, ex = _prompt(rec), _example(rec)
        responses = rec["responses"]
        stopped = rec.get("stopped") or [True] * len(responses)
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                a, b = responses[i], responses[j]
                if a == b or not (a.strip() and b.strip()):
                    continue  # nothing to compare
                p, p_first, p_swapped = debiased(judge, prompt[-1].content, a, b, cfg.swap)
                if clamp is not None:
                    p = min(max(p, clamp[0]), clamp[1])
                first = p >= 0.5
                c, r = (i, j) if first else (j, i)
                label = p if first else 1 - p
                extra: dict[str, Any] = {"p_first": p_first, "p_swapped": p_swapped}
                if ex is not None:
                    extra |= {
                        "task": ex.task,
                        "answer": ex.answer,
                        "gold_chosen": gold_reward(ex, responses[c], stopped[c]),
                        "gold_rejected": gold_reward(ex, responses[r], stopped[r]),
                    }
                pair = Preference(prompt, responses[c], responses[r], label)
                out.append(
                    preference_record(
                        pair, annotator=provenance, id=rec.get("id"), p_chosen=label, **extra
                    )
                )
        bar.update(1)
    bar.close()
    return out


def label_summary(
    prefs: Sequence[dict[str, Any]], annotator: Annotator | None = None
) -> dict[str, Any]:
    """How AI labels relate to the world's truth, where it is known (default annotator settings):

    - `gold_agreement`: over the pairs the gold reward decides, the share where the label sides
      with it (what the simulated label stage reports; a 0.5 label counts a half);
    - `annotator_agreement`: the expected agreement of a simulated annotator's draws (the
      stand-in for people) with the AI's choices, over every pair with known gold rewards;
    - `annotator_gold_agreement`: the simulated annotators' own expected `gold_agreement` on
      the same decided pairs, the baseline the AI labels are compared with."""
    annotator = annotator or Annotator()
    row: dict[str, Any] = {
        "pairs": len(prefs),
        "mean_label": sum(p["label"] for p in prefs) / max(1, len(prefs)),
    }
    known = [p for p in prefs if "gold_chosen" in p]
    decided = [p for p in known if p["gold_chosen"] != p["gold_rejected"]]

    def p_ann(p: dict[str, Any], flip: bool = False) -> float:
        a, b = ("rejected", "chosen") if flip else ("chosen", "rejected")
        return annotator.p_first(p[f"gold_{a}"], p[f"gold_{b}"], len(p[a]), len(p[b]))

    if decided:
        better = [p["gold_chosen"] > p["gold_rejected"] for p in decided]
        # A label of exactly 0.5 takes no side: half agreement, whichever response is `chosen`.
        sides = [
            0.5 if p["label"] == 0.5 else float(b) for p, b in zip(decided, better, strict=True)
        ]
        row["gold_agreement"] = sum(sides) / len(decided)
        row["annotator_gold_agreement"] = sum(
            p_ann(p, flip=not b) for p, b in zip(decided, better, strict=True)
        ) / len(decided)
    if known:
        row["annotator_agreement"] = sum(map(p_ann, known)) / len(known)
    return row


def read_responses(path: Path) -> list[dict[str, Any]]:
    """responses.jsonl records (what `lmforge sample` writes), each checked."""
    records: list[dict[str, Any]] = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("responses"), list):
            raise UserError(f"{path}:{line}: expected a responses record (see lmforge sample)")
        if not isinstance(rec.get("messages"), list) or not rec["messages"]:
            raise UserError(f"{path}:{line}: field 'messages': expected the prompt's messages")
        records.append(rec)
    return records
