"""GRPO (Shao et al., 2024): group-relative policy optimisation, no critic.

Each iteration samples G responses for each of P prompts, scores them (the world's task
checker by default: RL with verifiable rewards; or the gold reward, or a reward model), turns
the scores into advantages by standardising within each prompt's group, and takes `epochs`
passes of minibatch updates on PPO's clipped token-level surrogate plus beta * k3 KL to the
frozen reference. Same skeleton, seeding, resume guarantees and torchrun split as
`training/ppo.py`; under torchrun each rank samples whole groups, so group advantages are local.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt
from lmforge.data.world_tasks import TaskConfig
from lmforge.generation.generate import SamplingConfig
from lmforge.objectives.grpo import group_advantages
from lmforge.objectives.rl import clipped_policy_loss, kl_penalty, masked_mean
from lmforge.runtime import autocast
from lmforge.training.align import (
    eval_row,
    iteration_rollout,
    mean_stats,
    open_run,
    policy_run_config,
    policy_stats,
    rank_minibatches,
    reduced_stats,
    rollout_means,
    start_rl,
    warn,
)
from lmforge.training.checkpoint import load_state, save_checkpoint
from lmforge.training.diagnostics import DiagnosticsConfig
from lmforge.training.guard import check_stop_only
from lmforge.training.loop import TrainConfig, check_finite, due, step_bar
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import Preempted, on_sigterm
from lmforge.training.rollout import REWARDS, Rollout, UpdateForward, response_logprobs
from lmforge.training.rundir import final_row, run_dir


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    policy: str = opt("", "SFT checkpoint: the starting policy and the frozen reference")
    reward: Literal["checker", "gold", "model"] = opt(
        "checker",
        "checker: 1 if the world's task checker accepts the answer (verifiable); gold: the "
        "world's gold reward; model: a reward model's score",
    )
    reward_model: str = opt("", "reward-model folder; needed for reward=model")
    prompts: str = opt("world", "'world' (the tasks' rl split) or a .jsonl of prompts")
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks (prompts and held-out eval)")
    eval_prompts: int = opt(10, "held-out world prompts per task at each evaluation (0: none)")
    group_size: int = opt(8, "G: responses sampled per prompt")
    sampling: SamplingConfig = opt(
        SamplingConfig(temperature=1.0, max_new_tokens=32), "rollout sampling"
    )
    epochs: int = opt(1, "passes over each rollout batch (1: plain on-policy)")
    minibatch_size: int = opt(32, "responses per gradient step")
    clip: float = opt(0.2, "policy ratio clip (epsilon)")
    kl_coef: float = opt(0.04, "beta: weight of the k3 KL to the reference (0 disables)")
    scale_advantages: bool = opt(True, "divide by the group's standard deviation")
    optim: OptimConfig = opt(
        OptimConfig(lr=3e-5, warmup_steps=0, weight_decay=0.0, schedule="constant"),
        "optimizer and schedule",
    )
    train: TrainConfig = opt(
        TrainConfig(
            max_steps=60, batch_size=64, log_every=1, eval_every=20, ckpt_every=20, dtype="float32"
        ),
        "max_steps counts iterations; batch_size is responses per rollout (P * G); dtype "
        "applies to the log-prob and update passes (fp32 by default, as PPO)",
    )
    diagnostics: DiagnosticsConfig = opt(DiagnosticsConfig(), "pathology warnings")

    def __post_init__(self) -> None:
        check(bool(self.policy), "policy", "give the SFT checkpoint (--policy DIR)")
        check_stop_only(self.train, "GRPO")
        check(
            self.reward != "model" or bool(self.reward_model),
            "reward_model",
            "reward=model needs a reward model (--reward RM_DIR)",
        )
        check(self.group_size >= 2, "group_size", "must be >= 2 (advantages are relative)")
        check(
            self.train.batch_size % self.group_size == 0,
            "group_size",
            f"must divide train.batch_size={self.train.batch_size}",
        )
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.minibatch_size >= 1, "minibatch_size", "must be >= 1")
        check(self.clip > 0, "clip", "must be > 0")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.sampling.temperature > 0, "sampling.temperature", "GRPO samples: must be > 0")


def grpo(
    cfg: GRPOConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Optimise the policy in `out` with GRPO; return the final metrics row."""
    s = start_rl(cfg, out, resume, overwrite, multi_process=True)
    policy, reference, tok, rm, data = s.policy, s.reference, s.tok, s.rm, s.data
    progress = progress and distributed.is_main()
    optimizer = build_optimizer(policy, cfg.optim)
    forward = distributed.wrap(UpdateForward(policy), s.device, cfg.train.dist, s.dtype)
    run_config = policy_run_config("grpo", f"grpo-{cfg.reward}", cfg, s)
    T, G = cfg.train.max_steps, cfg.group_size
    P = cfg.train.batch_size // G

    with run_dir(out, fresh=s.state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start = load_state(s.state, policy, optimizer)["step"] if s.state is not None else 0
        metrics, history = open_run(out, s, run_config, start, cfg.train.trackers)
        if progress:
            tqdm.write(
                f"grpo: {len(data.train)} prompts, {P} x {G} responses per iteration, reward="
                f"{cfg.reward} ({data.dropped} world prompts too long for the context left out) | "
                f"{s.device} | "
                + (f"resuming at iteration {start}" if start else f"from {cfg.policy}")
            )
        if s.state is None and data.eval:
            metrics.log(
                {"step": 0, **eval_row(policy, reference, rm, tok, data, cfg.sampling, False, 0)}
            )
        if start >= T:
            metrics.close()
            distributed.print0(
                f"{out}: already complete at iteration {start} (raise train.max_steps)"
            )
            return final_row(out)

        bar = step_bar("grpo", T, start, progress)
        warned: set[str] = set()
        last: dict[str, Any] = {}
        for it in range(start, T):
            set_lr(optimizer, lr_at(it, T, cfg.optim), cfg.optim.lr)
            t0 = time.perf_counter()
            ro, part = iteration_rollout(
                policy,
                tok,
                data,
                cfg.sampling,
                seed=cfg.train.seed,
                iteration=it,
                prompts=P,
                group=G,
            )
            t_gen = time.perf_counter() - t0
            with torch.no_grad(), autocast(s.device, s.dtype):
                raw = REWARDS[cfg.reward](ro, rm)
                groups = raw.view(-1, G)  # this rank's whole groups
                adv = group_advantages(groups, cfg.scale_advantages).view(-1)
                old_logp, _ = response_logprobs(policy, ro, cfg.sampling.temperature)
                ref_logp, _ = response_logprobs(reference, ro, cfg.sampling.temperature)
            stats = _update(cfg, forward, optimizer, ro, part, old_logp, ref_logp, adv, it, s.dtype)
            done = it + 1
            bar.update(1)
            per_row = {
                "score": raw,
                "kl": (old_logp - ref_logp).sum(1),
                "response_len": ro.mask.sum(1),
                "stop_rate": ro.stopped.float(),
            }
            if cfg.reward != "gold" and all(p.task is not None for p in ro.prompts):
                per_row["gold"] = REWARDS["gold"](ro, None)
            row: dict[str, Any] = {
                "step": done,
                **rollout_means(**per_row),
                **rollout_means(solved_groups=(groups.std(dim=1) == 0).float()),
                **stats,
                "gen_s": t_gen,
                "iter_s": time.perf_counter() - t0,
            }
            warn(history, row, cfg.diagnostics, warned)
            bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.2f}")
            if due(done, cfg.train.eval_every, T) and data.eval:
                row.update(eval_row(policy, reference, rm, tok, data, cfg.sampling, progress, done))
            if due(done, cfg.train.log_every, T):
                metrics.log(row)
                last.update(row)
            preempted = sigterm.requested()
            if preempted or due(done, cfg.train.ckpt_every, T):
                save_checkpoint(
                    out, done, policy, optimizer, run_config, s.dtype, cfg.train.keep_checkpoints
                )
            if preempted:
                metrics.close()
                raise Preempted(done)
        bar.close()
        metrics.close()
    return last


def _update(
    cfg: GRPOConfig,
    forward: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ro: Rollout,
    part: slice,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    it: int,
    dtype: torch.dtype,
) -> dict[str, float]:
    """`epochs` passes of minibatches over the iteration's rows (this rank's: `part`), as in
    `ppo.ppo_update` (under `dtype` autocast); the mean of each statistic over them."""
    steps = []
    seed = cfg.train.seed * 1_000_003 + it
    n, size = cfg.train.batch_size, cfg.minibatch_size
    for rows, weight in rank_minibatches(ro.mask, n, part, size, cfg.epochs, seed):
        mb = ro.select(rows)
        with autocast(mb.ids.device, dtype):
            logp, ent, _ = forward(mb, cfg.sampling.temperature)
        token_adv = adv[rows, None].expand_as(logp)
        pg_loss, pg_stats = clipped_policy_loss(logp, old_logp[rows], token_adv, mb.mask, cfg.clip)
        kl = masked_mean(kl_penalty(logp, ref_logp[rows], "k3"), mb.mask)
        ((pg_loss + cfg.kl_coef * kl) * weight).backward()
        mine = {**policy_stats(pg_loss, pg_stats, ent, mb.mask), "kl_term": kl.detach()}
        stats = reduced_stats(mine, weight)
        loss = stats["policy_loss"] + cfg.kl_coef * stats["kl_term"]
        check_finite(torch.tensor(loss), it + 1, "loss")  # before any update reaches the weights
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(forward.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(stats)
    return mean_stats(steps)
