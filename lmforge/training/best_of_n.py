"""Best-of-n: the baseline every RL method should beat. No training: sample n responses per
held-out prompt from the SFT policy, keep the one the reward model scores highest.

Reported beside the plain samples (n = 1, the same draws' first response): gold reward (0-1),
exact match, reward-model score of the kept responses, and the KL of the best-of-n policy to
the SFT policy, which has the closed form log n - (n - 1) / n (Stiennon et al., 2020; exact
when the n samples are distinct).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import check, opt, to_dict
from lmforge.data.world_tasks import TaskConfig, make_splits
from lmforge.evaluation.tasks import limit_per_task
from lmforge.feedback.sampling import check_room, prompt_ids, task_prompts
from lmforge.generation.generate import SamplingConfig
from lmforge.io import atomic_dir
from lmforge.training.align import load_policy_pair, load_reward
from lmforge.training.rollout import (
    checker_rewards,
    gold_rewards,
    model_rewards,
    rollout,
)
from lmforge.training.rundir import check_new_output


@dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    policy: str = opt("", "the policy to sample from (the SFT model)")
    reward_model: str = opt("", "the reward model that picks the best response")
    n: int = opt(8, "responses sampled per prompt")
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks")
    split: Literal["val", "test"] = opt("test", "held-out split (the one `lmforge eval` scores)")
    limit: int = opt(0, "prompts per task (0: the whole split)")
    sampling: SamplingConfig = opt(SamplingConfig(temperature=1.0, max_new_tokens=32), "sampling")

    def __post_init__(self) -> None:
        check(bool(self.policy), "policy", "give the policy (--policy DIR)")
        check(bool(self.reward_model), "reward_model", "give the reward model (--reward DIR)")
        check(self.n >= 1, "n", "must be >= 1")


def best_of_n(cfg: BestOfNConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `out/metrics.jsonl` (one row) and `out/answers.jsonl`; return the row."""
    check_new_output(out, overwrite=overwrite)
    device = torch.device("cpu")
    policy, _, tok, _ = load_policy_pair(Path(cfg.policy), out, device)
    rm = load_reward(cfg.reward_model, tok, device)
    held_out = task_prompts(limit_per_task(make_splits(cfg.tasks)[cfg.split], cfg.limit), cfg.split)
    context, new = policy.cfg.max_seq_len, cfg.sampling.max_new_tokens
    check_room(held_out, prompt_ids(tok, held_out), context, context - new, new)
    prompts = [p for p in held_out for _ in range(cfg.n)]
    ro = rollout(policy.eval(), tok, prompts, cfg.sampling)
    score = model_rewards(rm, ro).view(-1, cfg.n)
    gold, em = gold_rewards(ro).view(-1, cfg.n), checker_rewards(ro).view(-1, cfg.n)
    pick = score.argmax(dim=1)
    rows = torch.arange(len(pick))
    row = {
        "stage": "best_of_n",
        "n": cfg.n,
        "n_prompts": len(held_out),
        "gold": float(gold[rows, pick].mean()),
        "sample_em": float(em[rows, pick].mean()),
        "rm_score": float(score[rows, pick].mean()),
        "kl": math.log(cfg.n) - (cfg.n - 1) / cfg.n,
        "gold_n1": float(gold[:, 0].mean()),
        "sample_em_n1": float(em[:, 0].mean()),
        "rm_score_n1": float(score[:, 0].mean()),
        "config": to_dict(cfg),
    }
    with atomic_dir(out) as tmp:
        (tmp / "metrics.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        lines = [
            json.dumps(
                {
                    "prompt": held_out[i].messages[-1].content,
                    "response": ro.texts[i * cfg.n + int(k)],
                    "rm_score": float(score[i, k]),
                    "gold": float(gold[i, k]),
                }
            )
            + "\n"
            for i, k in enumerate(pick.tolist())
        ]
        (tmp / "answers.jsonl").write_text("".join(lines), encoding="utf-8")
    return row
