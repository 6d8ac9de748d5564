"""PPO against a reward model (RLHF), following InstructGPT and the published implementation
details of RLHF with PPO (Huang et al., 2024).

The policy and the frozen reference both start from the SFT model. The critic estimates a value
at every response token; it is either a value head on the policy's own trunk (`critic=shared`,
as TRL and Huang et al.: one forward/backward per minibatch gives log-probs and values, and the
value loss trains the trunk too) or a network of its own (`critic=separate`, as InstructGPT:
twice the trunk passes, initialised from the SFT model or the reward model). One iteration,
read top to bottom in `ppo`:

1. rollout: B prompts from the training split, one sampled response each (KV cache);
2. score: reward-model score at the last token (or the world's gold reward), minus a penalty
   for responses that never ended; optional whitening/clipping of the scores;
3. per-token rewards: -beta * KL(policy || reference) at every token, plus the score at the
   last one; the critic's values (with a shared critic, from the same pass as the policy's
   log-probs); GAE advantages (whitened) and returns;
4. update: several epochs of shuffled minibatches of the clipped surrogate and the clipped
   value loss, on each minibatch's rows packed; the policy and critic sit in one AdamW (each
   with its own learning rate);
5. log the diagnostics, warn about pathologies, evaluate on held-out prompts, checkpoint.

Everything random in an iteration is seeded by (seed, iteration), so a killed run resumes
exactly from its last checkpoint (policy, critic, optimizer, KL coefficient and position).

Under torchrun each rank samples and scores its part of every rollout (`iteration_rollout`);
advantages are whitened with the whole batch's statistics, each minibatch's gradient is the
token mean over every rank's rows of it (DDP averages the ranks' weighted parts), and logged
numbers are reduced over ranks, so N processes follow one process's run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt
from lmforge.data.world_tasks import TaskConfig
from lmforge.errors import UserError
from lmforge.generation.generate import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel, ValueHead
from lmforge.objectives.rl import (
    adaptive_beta,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalty,
    masked_moments,
    masked_whiten,
    token_rewards,
)
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
from lmforge.training.checkpoint import load_state, save_model_dir, save_state
from lmforge.training.diagnostics import DiagnosticsConfig
from lmforge.training.guard import check_stop_only
from lmforge.training.loop import TrainConfig, check_finite, due, step_bar
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import Preempted, on_sigterm
from lmforge.training.rollout import (
    REWARDS,
    Rollout,
    UpdateForward,
    policy_and_values,
    response_logprobs,
)
from lmforge.training.rundir import final_row, run_dir


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    policy: str = opt("", "SFT checkpoint: the starting policy and the frozen reference")
    reward_model: str = opt("", "reward-model folder (lmforge reward); needed for reward=model")
    reward: Literal["model", "gold"] = opt(
        "model", "model: the reward model's score; gold: the world's gold reward (for study)"
    )
    prompts: str = opt("world", "'world' (the tasks' rl split) or a .jsonl of prompts")
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks (prompts and held-out eval)")
    eval_prompts: int = opt(10, "held-out world prompts per task at each evaluation (0: none)")
    sampling: SamplingConfig = opt(
        SamplingConfig(temperature=1.0, max_new_tokens=32), "rollout sampling"
    )
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    minibatch_size: int = opt(16, "responses per gradient step")
    clip: float = opt(0.2, "policy ratio clip (epsilon)")
    value_clip: float = opt(0.2, "value-prediction clip around the rollout's values")
    value_coef: float = opt(0.5, "weight of the value loss")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    kl_coef: float = opt(0.05, "beta: weight of the per-token KL penalty")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimate in the reward")
    adaptive_kl: bool = opt(False, "adapt beta toward target_kl (Ziegler et al., 2019)")
    target_kl: float = opt(6.0, "adaptive KL: target KL per response (nats)")
    kl_horizon: int = opt(10000, "adaptive KL: horizon in responses")
    no_eos_penalty: float = opt(1.0, "subtracted from the score of responses that never end")
    score_norm: Literal["none", "batch"] = opt("none", "whiten the scores of each rollout batch")
    score_clip: float = opt(0.0, "clip scores to +-this after normalisation; 0 disables")
    critic: Literal["separate", "shared"] = opt(
        "separate",
        "separate: a critic network of its own (twice the trunk passes); shared: a value head "
        "on the policy's trunk (one forward/backward per minibatch: faster, but its value loss "
        "moves the policy; see the README)",
    )
    critic_init: Literal["policy", "reward"] = opt(
        "policy", "critic=separate: its trunk from the SFT policy, or from the reward model"
    )
    critic_lr: float = opt(3e-4, "peak learning rate of the critic (shared: of its value head)")
    optim: OptimConfig = opt(
        OptimConfig(lr=3e-5, warmup_steps=0, weight_decay=0.0, schedule="constant"),
        "optimizer and schedule (lr is the policy's)",
    )
    train: TrainConfig = opt(
        TrainConfig(
            max_steps=60, batch_size=64, log_every=1, eval_every=20, ckpt_every=20, dtype="float32"
        ),
        "max_steps counts iterations; batch_size is responses per rollout; dtype applies to the "
        "log-prob, value and update passes (fp32 by default: on CPUs bf16 autocast measured "
        "slower at these sizes)",
    )
    diagnostics: DiagnosticsConfig = opt(DiagnosticsConfig(), "pathology warnings")

    def __post_init__(self) -> None:
        check(bool(self.policy), "policy", "give the SFT checkpoint (--policy DIR)")
        check_stop_only(self.train, "PPO")
        check(
            self.reward != "model" or bool(self.reward_model),
            "reward_model",
            "reward=model needs a reward model (--reward RM_DIR)",
        )
        check(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        check(self.minibatch_size >= 1, "minibatch_size", "must be >= 1")
        check(
            self.train.batch_size % self.minibatch_size == 0,
            "minibatch_size",
            f"must divide train.batch_size={self.train.batch_size}",
        )
        check(self.clip > 0, "clip", "must be > 0")
        check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.target_kl > 0, "target_kl", "must be > 0")
        check(self.sampling.temperature > 0, "sampling.temperature", "PPO samples: must be > 0")
        check(
            self.critic == "separate" or self.critic_init == "policy",
            "critic_init",
            "critic=shared reads values from the policy's trunk; critic_init=reward needs "
            "critic=separate",
        )


def ppo(
    cfg: PPOConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Optimise the policy in `out` with PPO; return the final metrics row."""
    s = start_rl(cfg, out, resume, overwrite, multi_process=True)
    policy, reference, tok, rm, data, device = s.policy, s.reference, s.tok, s.rm, s.data, s.device
    progress = progress and distributed.is_main()
    if rm is not None and rm.likelihood and cfg.score_norm == "none" and progress:
        tqdm.write(
            "ppo: this reward model adds the reply's log-likelihood (scores of tens of nats), "
            "which swamps kl_coef; consider score_norm=batch"
        )
    critic = _critic(cfg, policy, rm, device)
    optimizer = build_optimizer(policy, cfg.optim, also=[(critic, cfg.critic_lr)])
    both = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    model = UpdateForward(policy, critic)
    # a separate critic's LM head (or all of it, for a reward-model trunk) gets no gradient
    unused = cfg.critic == "separate"
    forward = distributed.wrap(model, device, cfg.train.dist, s.dtype, unused_params=unused)
    run_config = policy_run_config("ppo", "ppo", cfg, s)
    B, T = cfg.train.batch_size, cfg.train.max_steps

    with run_dir(out, fresh=s.state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start, beta = 0, cfg.kl_coef
        if s.state is not None:
            saved = load_state(s.state, both, optimizer)
            start, beta = saved["step"], saved["kl_coef"]
        metrics, history = open_run(out, s, run_config, start, cfg.train.trackers)
        if progress:
            tqdm.write(
                f"ppo: {len(data.train)} prompts, {B} responses per iteration, reward="
                f"{cfg.reward} ({data.dropped} world prompts too long for the context left out) | "
                f"{device} | "
                + (f"resuming at iteration {start}" if start else f"from {cfg.policy}")
            )
        if s.state is None and data.eval:
            ev0 = eval_row(policy, reference, rm, tok, data, cfg.sampling, False, 0)
            metrics.log({"step": 0, **ev0})
        if start >= T:
            metrics.close()
            distributed.print0(
                f"{out}: already complete at iteration {start} (raise train.max_steps)"
            )
            return final_row(out)

        bar = step_bar("ppo", T, start, progress)
        warned: set[str] = set()
        last: dict[str, Any] = {}
        for it in range(start, T):
            set_lr(optimizer, lr_at(it, T, cfg.optim), cfg.optim.lr)
            t0 = time.perf_counter()
            ro, part = iteration_rollout(
                policy, tok, data, cfg.sampling, seed=cfg.train.seed, iteration=it, prompts=B
            )
            t_gen = time.perf_counter() - t0

            # Score, per-token rewards and advantages: no gradients. Batch statistics are
            # those of the whole rollout, over every rank's rows.
            with torch.no_grad(), autocast(device, s.dtype):
                raw = REWARDS[cfg.reward](ro, rm)
                score = raw - cfg.no_eos_penalty * (~ro.stopped).float()
                if cfg.score_norm == "batch":
                    mean, var = masked_moments(score, torch.ones_like(score), distributed.total)
                    score = (score - mean) / (var.sqrt() + 1e-8)
                if cfg.score_clip:
                    score = score.clamp(-cfg.score_clip, cfg.score_clip)
                old_logp, old_values = rollout_outputs(policy, critic, ro, cfg)
                ref_logp, _ = response_logprobs(reference, ro, cfg.sampling.temperature)
                kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * ro.mask
                rewards = token_rewards(score, kl, beta, ro.mask)
                adv, returns = gae(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
                adv = masked_whiten(adv, ro.mask, reduce=distributed.total)

            stats = ppo_update(
                cfg, model, forward, optimizer, ro, part, old_logp, old_values, adv, returns, it,
                dtype=s.dtype,
            )  # fmt: skip
            done = it + 1
            bar.update(1)
            per_row = {
                "score": raw,
                # k1 summed over each response: an unbiased estimate of the sequences' KL
                "kl": (old_logp - ref_logp).sum(1),
                "response_len": ro.mask.sum(1),
                "stop_rate": ro.stopped.float(),
            }
            if all(p.task is not None for p in ro.prompts):
                per_row["gold"] = raw if cfg.reward == "gold" else REWARDS["gold"](ro, None)
            means = rollout_means(**per_row)
            seq_kl = means["kl"]
            row: dict[str, Any] = {
                "step": done,
                **means,
                "kl_coef": beta,
                "explained_var": explained_variance(
                    old_values, returns, ro.mask, distributed.total
                ),
                **stats,
                "gen_s": t_gen,
                "iter_s": time.perf_counter() - t0,
            }
            if cfg.adaptive_kl:
                beta = adaptive_beta(beta, seq_kl, cfg.target_kl, cfg.kl_horizon, B)
            warn(history, row, cfg.diagnostics, warned)
            bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{seq_kl:.2f}")
            if due(done, cfg.train.eval_every, T) and data.eval:
                row.update(eval_row(policy, reference, rm, tok, data, cfg.sampling, progress, done))
            if due(done, cfg.train.log_every, T):
                metrics.log(row)
                last.update(row)
            preempted = sigterm.requested()  # on every rank: it agrees across them
            if (preempted or due(done, cfg.train.ckpt_every, T)) and distributed.is_main():
                meta = {
                    "stage": "ppo",
                    "autocast": str(s.dtype).removeprefix("torch."),
                    "kl_coef": beta,
                }
                save_state(out, done, both, optimizer, meta, keep=cfg.train.keep_checkpoints)
                save_model_dir(out, policy, {**run_config, "step": done})
            if preempted:
                metrics.close()
                raise Preempted(done)
        bar.close()
        metrics.close()
    return last


def _critic(
    cfg: PPOConfig, policy: Decoder, rm: RewardModel | None, device: torch.device
) -> RewardModel | ValueHead:
    if cfg.critic == "shared":
        return ValueHead(policy.cfg.n_embd, policy.cfg.init_std).to(device).train()
    if cfg.critic_init == "reward":
        if rm is None:
            raise UserError("critic_init=reward needs a reward model; use critic_init=policy")
        if not rm.causal:
            raise UserError(
                "critic_init=reward: the reward model has an encoder trunk; a critic "
                "must be causal (use critic_init=policy)"
            )
        critic = RewardModel(copy.deepcopy(rm.trunk))  # the values read the head alone
        critic.head.load_state_dict(rm.head.state_dict())
        critic.requires_grad_(True)  # the loaded reward model is frozen; its copy must train
    else:
        critic = RewardModel(copy.deepcopy(policy))
    return critic.to(device).train()


def rollout_outputs(
    policy: Decoder, critic: RewardModel | ValueHead, ro: Rollout, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout policy's log-probs and the critic's values (B, R), without gradients: one
    trunk pass for a shared critic, two for a separate one."""
    logp, _, values = policy_and_values(policy, critic, ro, cfg.sampling.temperature)
    assert values is not None
    return logp, values * ro.mask


def ppo_update(
    cfg: PPOConfig,
    model: UpdateForward,
    forward: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ro: Rollout,
    part: slice,
    old_logp: torch.Tensor,
    old_values: torch.Tensor,
    adv: torch.Tensor,
    returns: torch.Tensor,
    it: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """ppo_epochs passes of shuffled minibatches of the iteration's rows, of which this rank
    holds `part` (its `ro`); `forward` is `model`, DDP-wrapped under torchrun, run under
    `dtype` autocast. Returns the mean of each statistic over the minibatches."""
    steps = []
    seed = cfg.train.seed * 1_000_003 + it
    n, size = cfg.train.batch_size, cfg.minibatch_size
    for rows, weight in rank_minibatches(ro.mask, n, part, size, cfg.ppo_epochs, seed):
        mb = ro.select(rows)
        with autocast(mb.ids.device, dtype):
            logp, ent, values = forward(mb, cfg.sampling.temperature)
        pg_loss, pg_stats = clipped_policy_loss(logp, old_logp[rows], adv[rows], mb.mask, cfg.clip)
        v_loss, v_clipfrac = clipped_value_loss(
            values, old_values[rows], returns[rows], mb.mask, cfg.value_clip
        )
        ((pg_loss + cfg.value_coef * v_loss) * weight).backward()
        mine = {
            **policy_stats(pg_loss, pg_stats, ent, mb.mask),
            "value_loss": v_loss.detach(),
            "value_clipfrac": v_clipfrac,
        }
        stats = reduced_stats(mine, weight)
        loss = stats["policy_loss"] + cfg.value_coef * stats["value_loss"]
        check_finite(torch.tensor(loss), it + 1, "loss")  # before any update reaches the weights
        if cfg.optim.grad_clip:  # on gradients DDP has already averaged: the same on every rank
            for part_model in (model.policy, model.critic):
                assert part_model is not None
                torch.nn.utils.clip_grad_norm_(part_model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(stats)
    return mean_stats(steps)
