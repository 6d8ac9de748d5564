"""What the alignment stages (PPO, GRPO, DPO) share: loading the policy with its frozen
reference and the reward model, their prompts, and the held-out evaluation they log.

Held-out evaluation of a policy (`eval_policy`), on the world's validation prompts:
- exact match of greedy answers (what `lmforge eval` reports for every model);
- on samples at the rollout temperature, what RL optimises: mean gold reward (0-1), reward-model
  score, KL to the reference (nats per response), length and stop rate.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import to_dict
from lmforge.data.world_tasks import TaskConfig, TaskExample, make_splits
from lmforge.errors import UserError
from lmforge.evaluation.tasks import EvalConfig, evaluate_tasks, limit_per_task
from lmforge.feedback.sampling import (
    Prompt,
    check_room,
    file_prompts,
    fitting,
    prompt_ids,
    task_prompts,
)
from lmforge.generation.generate import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel
from lmforge.objectives.rl import masked_mean
from lmforge.runtime import seed_everything
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import jinja_template
from lmforge.training.checkpoint import load_model, load_reward_model
from lmforge.training.diagnostics import DiagnosticsConfig, pathologies
from lmforge.training.loop import epoch_order, setup_device
from lmforge.training.metrics import MetricsWriter, read_metrics
from lmforge.training.rollout import (
    Rollout,
    rollout,
    sample_metrics,
)
from lmforge.training.rundir import check_resume_config, check_run_dir, open_run_files
from lmforge.training.trackers import check_trackers


@dataclass(frozen=True)
class AlignData:
    train: list[Prompt]  # rollout prompts
    eval: list[Prompt]  # held-out world prompts
    dropped: int = 0  # world prompts left out: longer than the model's context allows


def load_align_data(
    source: str,
    tasks: TaskConfig,
    eval_per_task: int,
    tok: Tokenizer,
    sampling: SamplingConfig,
    context: int,
    rollouts: bool = True,
) -> AlignData:
    """Rollout prompts (the world's rl split, or a prompt file) and held-out world prompts.

    World prompts too long for the model's context (long stories, for a small model) are left
    out and counted; a prompt file's must all fit."""
    room = context - sampling.max_new_tokens
    splits = make_splits(tasks)
    held = (
        task_prompts(limit_per_task(splits["val"], eval_per_task), "val") if eval_per_task else []
    )
    if not rollouts:
        train: list[Prompt] = []
    elif source == "world":
        train = task_prompts(splits["rl"], "rl")
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"prompts: {source}: no such file (or give 'world')")
        train = file_prompts(path)
        check_room(train, prompt_ids(tok, train), context, room, sampling.max_new_tokens)
    fits, held_fits = fitting(tok, train, room), fitting(tok, held, room)
    if rollouts and not fits:
        raise UserError(f"prompts: none fits the model's context of {context} tokens")
    return AlignData(fits, held_fits, len(train) - len(fits) + len(held) - len(held_fits))


@dataclass(frozen=True)
class RLStart:
    """What an RL stage has once its input is validated and its models are loaded."""

    state: Path | None  # the checkpoint to resume from, if any
    device: torch.device
    dtype: torch.dtype
    policy: Decoder
    reference: Decoder
    tok: Tokenizer
    rm: RewardModel | None
    data: AlignData


def start_rl(
    cfg: Any,
    out: Path,
    resume: bool,
    overwrite: bool,
    rollouts: bool = True,
    multi_process: bool = False,
) -> RLStart:
    """The shared start of PPO, GRPO and DPO (configs with policy, reward_model, prompts, tasks,
    eval_prompts, sampling, train): check the run folder, then load everything, seeded.
    `multi_process`: the stage runs under torchrun (see `setup_device`)."""
    if rollouts and (cfg.train.dist.sharded or cfg.train.dist.activation_checkpointing):
        # rollouts generate with the whole policy on every rank, through its own blocks
        raise UserError(
            "train.dist: PPO and GRPO run with strategy=ddp and without activation_checkpointing"
        )
    state = check_run_dir(out, resume=resume, overwrite=overwrite)
    check_trackers(cfg.train.trackers)
    if state is not None:
        check_resume_config(to_dict(cfg), out)
    device, dtype = setup_device(cfg.train, multi_process=multi_process)
    seed_everything(cfg.train.seed)
    policy, reference, tok, _ = load_policy_pair(Path(cfg.policy), out, device)
    rm = load_reward(cfg.reward_model, tok, device) if cfg.reward_model else None
    source = getattr(cfg, "prompts", "world")
    data = load_align_data(
        source, cfg.tasks, cfg.eval_prompts, tok, cfg.sampling, policy.cfg.max_seq_len, rollouts
    )
    return RLStart(state, device, dtype, policy, reference, tok, rm, data)


def policy_run_config(stage: str, objective: str, cfg: Any, s: RLStart) -> dict[str, Any]:
    """run_config.json / config.json of an aligned policy: a chat decoder like the SFT model."""
    return {
        "stage": stage,
        "family": "decoder",
        "objective": objective,
        "base_model": cfg.policy,
        "chat_template": jinja_template(s.tok),
        "run": to_dict(cfg),
        "model": to_dict(s.policy.cfg),
        "tokenizer_fingerprint": s.tok.fingerprint,
    }


def open_run(
    out: Path, s: RLStart, run_config: dict[str, Any], start: int, trackers: Sequence[str]
) -> tuple[MetricsWriter, list[dict[str, Any]]]:
    """`rundir.open_run_files` for a policy run, and the iteration rows logged so far."""
    fresh = s.state is None
    metrics = open_run_files(out, s.tok, run_config, start, fresh=fresh, trackers=trackers)
    history = [r for r in read_metrics(out / "metrics.jsonl") if "score" in r] if s.state else []
    return metrics, history


def load_policy_pair(
    policy_dir: Path, out: Path, device: torch.device
) -> tuple[Decoder, Decoder, Tokenizer, dict[str, Any]]:
    """The trainable policy and its frozen copy, the reference, both from `policy_dir`."""
    if policy_dir.resolve() == out.resolve():
        raise UserError(f"policy: {policy_dir} is the output folder; write elsewhere")
    policy, tok, config = load_model(policy_dir, device=device)
    if not isinstance(policy, Decoder):
        raise UserError(
            f"policy: {policy_dir} holds a '{config['family']}'; alignment needs a decoder"
        )
    if config.get("stage") == "pretrain":
        raise UserError(
            f"policy: {policy_dir} is a base model; fine-tune it first (lmforge sft) so it "
            "follows the chat template"
        )
    reference, _, _ = load_model(policy_dir, device=device)
    assert isinstance(reference, Decoder)
    reference.requires_grad_(False)
    return policy.train(), reference.eval(), tok, config


def load_reward(rm_dir: str, tok: Tokenizer, device: torch.device) -> RewardModel:
    rm, rm_tok, _ = load_reward_model(Path(rm_dir), device)
    if rm_tok.fingerprint != tok.fingerprint:
        raise UserError(
            f"reward_model: {rm_dir} uses another tokenizer than the policy; train the reward "
            "model from the same SFT model"
        )
    rm.requires_grad_(False)
    return rm.eval()


def eval_policy(
    policy: Decoder,
    reference: Decoder | None,
    rm: RewardModel | None,
    tok: Tokenizer,
    data: AlignData,
    sampling: SamplingConfig,
) -> tuple[dict[str, Any], Rollout]:
    """The held-out row (see the module docstring) and the sampled rollout behind it."""
    examples = [
        TaskExample(p.task or "", p.messages[-1].content, p.answer or "") for p in data.eval
    ]
    greedy, _ = evaluate_tasks(
        policy, tok, examples, EvalConfig(max_new_tokens=sampling.max_new_tokens), chat=True
    )
    row, ro = sample_metrics(policy, tok, data.eval, sampling, reference=reference, rm=rm)
    policy.train()
    return {"em": greedy["em"], **row}, ro


def iteration_rollout(
    policy: Decoder,
    tok: Tokenizer,
    data: AlignData,
    sampling: SamplingConfig,
    *,
    seed: int,
    iteration: int,
    prompts: int,
    group: int = 1,
) -> tuple[Rollout, slice]:
    """This rank's part of iteration `iteration`'s rollout, and which of the iteration's
    `prompts * group` rows it holds.

    The iteration takes the next `prompts` training prompts of a seeded order that visits them
    all once per epoch, each sampled `group` times (consecutive rows); under torchrun each rank
    samples an equal, contiguous part of them (whole groups). Every row has a sampling seed of
    its own, drawn from (sampling seed, iteration, row), so the rollout is a pure function of
    the iteration whatever the number of ranks: resuming repeats it, and 1 or N processes
    sample the same responses."""
    order = epoch_order(len(data.train), seed, iteration * prompts, prompts)
    part = distributed.rank_part(prompts, "rollout prompts per iteration (batch_size / group)")
    rows = range(part.start * group, part.stop * group)
    chosen = [data.train[order[r // group]] for r in rows]
    row_seeds = [
        int(np.random.SeedSequence([sampling.seed % 2**32, iteration, r]).generate_state(1)[0])
        for r in rows
    ]
    ro = rollout(policy, tok, chosen, sampling, batch_size=len(chosen), row_seeds=row_seeds)
    return ro, slice(rows.start, rows.stop)


def minibatches(
    n: int, size: int, epochs: int, seed: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Row indices for `epochs` passes over n rollout rows in shuffled minibatches of `size`;
    the shuffles are seeded, so a resumed iteration updates exactly as the first try did."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, size):
            yield perm[i : i + size]


def rank_minibatches(
    mask: torch.Tensor, n: int, part: slice, size: int, epochs: int, seed: int
) -> Iterator[tuple[torch.Tensor, float]]:
    """`minibatches` of an iteration's n rows, of which this rank holds rows `part` (response
    mask (len(part), R)): per minibatch, the indices of this rank's rows in it and their
    weight, the part of the minibatch's response tokens they hold times the number of ranks.

    A rank's token mean times its weight makes DDP's average over ranks the minibatch's token
    mean, as one process computes it (weight 1). A rank holding no row of a minibatch gets row
    0 with weight 0: it must still join the gradient all-reduce."""
    world = distributed.world_size()
    for rows in minibatches(n, size, epochs, seed, mask.device):
        mine = rows[(rows >= part.start) & (rows < part.stop)] - part.start
        tokens = mask[mine].sum()
        weight = float(tokens / distributed.total(tokens).clamp_min(1)) * world
        yield (mine if len(mine) else mine.new_zeros(1)), weight


def policy_stats(
    pg_loss: torch.Tensor, pg_stats: dict[str, torch.Tensor], ent: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What PPO and GRPO log of a minibatch's clipped surrogate: token means over its rows
    (scalar tensors: `reduced_stats` reads them all at once)."""
    return {
        "policy_loss": pg_loss.detach(),
        "entropy": masked_mean(ent.detach(), mask),
        "clipfrac": pg_stats["clipfrac"],
        "approx_kl": pg_stats["approx_kl"],
    }


def reduced_stats(stats: dict[str, torch.Tensor], weight: float) -> dict[str, float]:
    """Token means over this rank's rows of a minibatch (scalar tensors), with the weight
    `rank_minibatches` gave them -> the token means over the whole minibatch (summed over
    ranks, not a mean of each rank's means). One read from the device for them all, not one
    per statistic."""
    w = weight / distributed.world_size()
    mine = torch.stack([v.detach().double().reshape(()) for v in stats.values()]).tolist()
    return dict(zip(stats, distributed.all_sum(*(v * w for v in mine)), strict=True))


def rollout_means(**per_row: torch.Tensor) -> dict[str, float]:
    """The mean of each per-row statistic (B,) over the iteration's rows on every rank."""
    n = len(next(iter(per_row.values())))
    *sums, count = distributed.all_sum(*(float(v.sum()) for v in per_row.values()), n)
    return {k: v / count for k, v in zip(per_row, sums, strict=True)}


def mean_stats(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each statistic over the minibatch steps of an iteration."""
    return {k: sum(step[k] for step in steps) / len(steps) for k in steps[0]}


def warn(
    history: list[dict[str, Any]], row: dict[str, Any], cfg: DiagnosticsConfig, warned: set[str]
) -> None:
    """Append `row` to the history; print each pathology it newly shows once, naming it in the
    row's `warnings`."""
    history.append(row)
    for name, message in pathologies(history, cfg).items():
        if name not in warned:
            warned.add(name)
            row.setdefault("warnings", []).append(name)
            if distributed.is_main():  # every rank holds the same (reduced) rows
                tqdm.write(f"warning (iteration {row['step']}): {message}", file=sys.stderr)


def eval_row(
    policy: Decoder,
    reference: Decoder,
    rm: RewardModel | None,
    tok: Tokenizer,
    data: AlignData,
    sampling: SamplingConfig,
    progress: bool,
    step: int,
) -> dict[str, Any]:
    """`eval_policy` as `val_*` metrics plus one sample conversation, printed when verbose."""
    ev, sample = eval_policy(policy, reference, rm, tok, data, sampling)
    row: dict[str, Any] = {f"val_{k}": v for k, v in ev.items()}
    row["sample"] = {"prompt": sample.prompts[0].messages[-1].content, "response": sample.texts[0]}
    if progress:
        tqdm.write(
            f"step {step}: held-out gold {ev.get('gold', float('nan')):.3f} "
            f"kl {ev['kl']:.2f} exact match {ev['em']:.3f}"
        )
    return row
