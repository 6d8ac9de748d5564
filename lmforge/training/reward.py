"""Reward-model training: Bradley-Terry on preference pairs, from an SFT (or base) checkpoint.

`reward(cfg, out)` reads and validates the preference files, renders each pair with the chat
template (prompt + reply + `<|end_of_turn|>`, the token whose state the head reads), loads the
trunk of a decoder or encoder checkpoint, adds a scalar head and runs a plain loop: B pairs ->
one forward over the 2B right-padded sequences -> pairwise loss -> backward -> clip -> step ->
log -> eval -> checkpoint. Pairs are visited in a seeded order that is a pure function of the
step, so a killed run resumes exactly.

Evaluation: held-out pairwise accuracy and loss; with world records also agreement with the
gold reward, the annotators' noise-limited ceiling, a calibration table, and whether correct
answers outrank wrong ones on the world's test prompts (which no training pair used).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt, to_dict
from lmforge.data.instruction import Message, hold_out_tail
from lmforge.data.preference import Preference, load_preferences
from lmforge.data.sft_batches import pack_sequences
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.errors import UserError
from lmforge.feedback.simulated import ceiling
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel
from lmforge.models.transformer import Transformer
from lmforge.objectives.reward import bradley_terry_loss, pairwise_accuracy
from lmforge.runtime import DTYPES, Batch, autocast, call, seed_everything, to_device
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import render_chat
from lmforge.training.checkpoint import load_model, load_state
from lmforge.training.guard import StepGuard
from lmforge.training.loop import (
    Throughput,
    TrainConfig,
    due,
    end_step,
    epoch_order,
    saver,
    setup_device,
    step_bar,
    train_step,
)
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import on_sigterm
from lmforge.training.rundir import (
    check_resume_config,
    check_run_dir,
    final_row,
    open_run_files,
    run_dir,
)
from lmforge.training.trackers import check_trackers


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    model: str = opt("", "trunk checkpoint: an SFT (or base) decoder, or an encoder")
    data: tuple[str, ...] = opt((), "preference files (.jsonl/.json) or hf:NAME[:SPLIT]")
    val_data: tuple[str, ...] = opt((), "held-out preferences; empty: the last val_fraction")
    val_fraction: float = opt(0.1, "share of pairs held out when no val_data is given")
    margin: float = opt(0.0, "Bradley-Terry margin: r_chosen must beat r_rejected by this")
    likelihood: bool = opt(
        False,
        "add the trunk's log-likelihood of the reply, times a learned scale, to the head's "
        "score (decoder trunks; an encoder trunk scores with the head alone)",
    )
    layout: Literal["packed", "padded"] = opt(
        "packed", "training batches: sequences packed into rows (no padding) or one per row"
    )
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks, for the correct-vs-wrong check")
    world_check: bool = opt(True, "score correct vs wrong answers on the world's test prompts")
    optim: OptimConfig = opt(
        OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.0), "optimizer and schedule"
    )
    train: TrainConfig = opt(
        TrainConfig(max_steps=300, batch_size=16, eval_every=100, ckpt_every=100),
        "training loop (batch_size counts pairs)",
    )

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "give the trunk checkpoint (--model DIR)")
        check(len(self.data) > 0, "data", "give at least one preference file (--data FILE)")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")


@dataclass(frozen=True)
class Pairs:
    """Rendered pairs: ids of prompt + chosen and prompt + rejected, and the label."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_reply: list[list[bool]]  # per id: part of the reply (what the likelihood term sums)
    rejected_reply: list[list[bool]]
    label: np.ndarray  # (N,) float32: P(chosen preferred)
    p_annotator: list[float | None]  # the simulated annotator's own probability, when known
    gold: list[tuple[float, float] | None]  # gold rewards of (chosen, rejected), when known
    n_truncated: int = 0  # pairs with a side longer than the block: its prompt's start was cut

    def __len__(self) -> int:
        return len(self.chosen)


def render_replies(
    tok: Tokenizer, prompt: Sequence[Message], replies: Sequence[str]
) -> list[tuple[list[int], list[bool]]]:
    """Per reply: ids of prompt + reply, whole (`render_pairs` cuts them to the block), and per
    id whether it belongs to the reply (the last turn only: a prompt may hold earlier assistant
    turns). The prompt alone is rendered once, for its length."""
    n = len(render_chat(tok, prompt, add_generation_prompt=True)[0])
    out = []
    for reply in replies:
        ids, mask = render_chat(tok, [*prompt, Message("assistant", reply)])
        out.append((ids, [False] * n + mask[n:]))
    return out


def render_pairs(tok: Tokenizer, prefs: Sequence[Preference], block: int) -> Pairs:
    """Both sides of each pair; a side longer than `block` loses the start of its prompt (the
    reply and its end, which the reward reads, stay) and the pair is counted in n_truncated."""
    sides = [render_replies(tok, p.prompt, (p.chosen, p.rejected)) for p in prefs]
    chosen, rejected = [c for c, _ in sides], [r for _, r in sides]  # (ids, reply) each
    cut = sum(max(len(c), len(r)) > block for (c, _), (r, _) in zip(chosen, rejected, strict=True))
    label = np.array([p.label for p in prefs], dtype=np.float32)
    meta = [getattr(p, "meta", None) or {} for p in prefs]
    p_ann = [m.get("p_chosen") for m in meta]
    gold = [(m["gold_chosen"], m["gold_rejected"]) if "gold_chosen" in m else None for m in meta]

    def part(side: list[tuple[list[int], list[bool]]], k: int) -> list:
        return [x[k][-block:] for x in side]

    return Pairs(
        part(chosen, 0),
        part(rejected, 0),
        part(chosen, 1),
        part(rejected, 1),
        label,
        p_ann,
        gold,
        n_truncated=cut,
    )


def collate_pairs(
    pairs: Pairs, idx: Sequence[int], layout: str = "padded", block: int = 0, causal: bool = True
) -> tuple[Batch, torch.Tensor]:
    """((model inputs), labels (B,)) for pairs idx; the model returns 2B rewards, chosen first.

    padded: (ids (2B, T), last (2B,), None, None, reply (2B, T)), one sequence per row.
    packed: (ids (R, block), last, positions, mask, reply), sequences packed into R rows as SFT
    packs examples (no padding to pay for). `reply` marks the replies' tokens.
    """
    seqs = [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx]
    replies = [pairs.chosen_reply[i] for i in idx] + [pairs.rejected_reply[i] for i in idx]
    labels = torch.from_numpy(pairs.label[list(idx)])
    positions = mask = None
    if layout == "packed":
        (ids, positions, mask), last = pack_sequences(seqs, block, causal=causal)
    else:
        T = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        last = torch.arange(len(seqs)) * T + torch.tensor([len(s) for s in seqs]) - 1
    reply = torch.zeros(ids.numel(), dtype=torch.bool)
    for end, r in zip(last.tolist(), replies, strict=True):
        reply[end - len(r) + 1 : end + 1] = torch.tensor(r)
    # the padded layout leaves positions and mask out (None), which `to_device` and `call` pass on
    return cast(Batch, (ids, last, positions, mask, reply.view_as(ids))), labels


def pair_loss(margin: float):  # noqa: ANN201 - a loss closure for train_step
    def loss(rewards: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        B = label.size(0)
        return bradley_terry_loss(rewards[:B], rewards[B:], label, margin)

    return loss


@torch.no_grad()
def score_pairs(
    model: RewardModel, pairs: Pairs, device: torch.device, dtype: torch.dtype, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every (chosen, rejected) pair: two (N,) tensors."""
    was = model.training
    model.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch):
        idx = list(range(i, min(i + batch, len(pairs))))
        x, _ = collate_pairs(pairs, idx)
        with autocast(device, dtype):
            r = call(model, to_device(x, device)).cpu()
        rc.append(r[: len(idx)])
        rr.append(r[len(idx) :])
    model.train(was)
    return torch.cat(rc), torch.cat(rr)


def held_out_metrics(
    model: RewardModel, pairs: Pairs, device: torch.device, dtype: torch.dtype, margin: float
) -> dict[str, Any]:
    rc, rr = score_pairs(model, pairs, device, dtype)
    label = torch.from_numpy(pairs.label)
    row: dict[str, Any] = {
        "val_loss": float(bradley_terry_loss(rc, rr, label, margin)),
        "val_acc": pairwise_accuracy(rc, rr),
    }
    known = [i for i, p in enumerate(pairs.p_annotator) if p is not None]
    if known:
        row["val_ceiling"] = ceiling([float(pairs.p_annotator[i]) for i in known])  # type: ignore[arg-type]
    gold = [(i, g) for i, g in enumerate(pairs.gold) if g is not None and g[0] != g[1]]
    if gold:
        agree = [(float(rc[i] - rr[i]) > 0) == (g[0] > g[1]) for i, g in gold]
        row["val_gold_agreement"] = sum(agree) / len(agree)
    row["val_calibration"] = calibration(rc, rr)
    return row


def calibration(rc: torch.Tensor, rr: torch.Tensor, bins: int = 5) -> list[list[float]]:
    """[mean predicted P(first preferred), observed share, count] per probability bin, with
    every other pair shown the other way round so both outcomes occur."""
    flip = torch.arange(len(rc)) % 2 == 1
    p = torch.sigmoid(torch.where(flip, rr - rc, rc - rr))
    outcome = (~flip).float()
    table = []
    for b in range(bins):
        sel = (p >= b / bins) & ((p < (b + 1) / bins) if b < bins - 1 else (p <= 1))
        if sel.any():
            table.append([float(p[sel].mean()), float(outcome[sel].mean()), int(sel.sum())])
    return table


@torch.no_grad()
def correct_over_wrong(
    model: RewardModel,
    tok: Tokenizer,
    tasks: TaskConfig,
    device: torch.device,
    dtype: torch.dtype,
    block: int,
) -> float:
    """Share of the world's test prompts where the canonical answer outscores a wrong one."""
    world = World.from_seed(tasks.seed)
    rng = random.Random(f"reward-check:{tasks.seed}")
    prefs = [
        Preference((Message("user", ex.prompt),), ex.answer, FLAWS["wrong"](ex, rng, world))
        for ex in make_splits(tasks)["test"]
    ]
    rc, rr = score_pairs(model, render_pairs(tok, prefs, block), device, dtype)
    return float((rc > rr).float().mean())


def reward(
    cfg: RewardConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a reward model into `out`; return the final metrics row."""
    state = check_run_dir(out, resume=resume, overwrite=overwrite)
    check_trackers(cfg.train.trackers)
    if state is not None:
        check_resume_config(to_dict(cfg), out)
    train_prefs = load_preferences(cfg.data)
    if cfg.val_data:
        val_prefs = load_preferences(cfg.val_data)
    else:
        train_prefs, val_prefs = hold_out_tail(train_prefs, cfg.val_fraction, "pair(s)")
    device, dtype = setup_device(cfg.train, multi_process=True)
    world, rank = distributed.world_size(), distributed.rank()
    share = distributed.batch_share(cfg.train.batch_size, cfg.train.grad_accum, world, rank)
    progress = progress and distributed.is_main()
    trunk, tok, base_config = load_model(Path(cfg.model))
    if not isinstance(trunk, Transformer):
        raise UserError(f"model: {cfg.model} is an encoder-decoder; use a decoder or encoder")
    seed_everything(cfg.train.seed)
    likelihood = cfg.likelihood and isinstance(trunk, Decoder)
    if cfg.likelihood and not likelihood and progress:
        tqdm.write("reward: an encoder trunk has no reply likelihood; the head alone scores")
    model = RewardModel(trunk, likelihood).to(device).train()
    block = cfg.train.block_size or trunk.cfg.max_seq_len
    train_pairs = render_pairs(tok, train_prefs, block)
    val_pairs = render_pairs(tok, val_prefs, block)
    # without the likelihood term the head reads hidden states only, so an LM head not tied to
    # the embedding gets no gradient and DDP must not wait for one
    unused = not trunk.cfg.tie_embeddings and not likelihood
    ddp = distributed.wrap(model, device, cfg.train.dist, dtype, unused_params=unused)
    optimizer = build_optimizer(model, cfg.optim)  # after wrap: FSDP replaces the parameters
    run_config: dict[str, Any] = {
        "stage": "reward",
        "family": base_config["family"],
        "head": "reward",
        "likelihood": likelihood,
        "extra_vocab": base_config.get("extra_vocab", 0),
        "base_model": cfg.model,
        "run": to_dict(cfg),
        "model": to_dict(trunk.cfg),
        "tokenizer_fingerprint": tok.fingerprint,
    }
    loss_fn = pair_loss(cfg.margin)

    guard = StepGuard(cfg.train)
    with run_dir(out, fresh=state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start = 0
        if state is not None:
            saved = load_state(state, model, optimizer)
            start, dtype = saved["step"], DTYPES[saved["autocast"]]
            guard.load_state_dict(saved.get("guard"))
        metrics = open_run_files(
            out, tok, run_config, start, fresh=state is None, trackers=cfg.train.trackers
        )
        if state is None:
            n_cut = train_pairs.n_truncated + val_pairs.n_truncated
            metrics.log({"step": 0, "n_train": len(train_pairs), "n_val": len(val_pairs),
                         "truncated": n_cut})  # fmt: skip
            if progress and n_cut:
                tqdm.write(f"reward: {n_cut} pairs longer than {block} tokens lost their start")
        if start >= cfg.train.max_steps:
            metrics.close()
            return final_row(out)

        save = saver(out, model, optimizer, run_config, dtype, cfg.train, guard)

        bar = step_bar("reward", cfg.train.max_steps, start, progress)
        last: dict[str, Any] = {}
        meter = Throughput()
        B, accum = cfg.train.batch_size, cfg.train.grad_accum
        for step in range(start, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim)
            set_lr(optimizer, lr, cfg.optim.lr)
            micro = []  # this rank's pairs, taken before collating: a batch holds both sides
            for m in share.micro:
                idx = epoch_order(len(train_pairs), cfg.train.seed, (step * accum + m) * B, B)
                idx = idx[share.rows]
                micro.append(collate_pairs(train_pairs, idx, cfg.layout, block, model.causal))
            loss, grad_norm = train_step(
                ddp,
                optimizer,
                micro,
                loss_fn,
                n_micro=accum,
                device=device,
                dtype=dtype,
                grad_clip=cfg.optim.grad_clip,
                step=step + 1,
                guard=guard,
                row_share=share.fraction(B),
            )
            meter.add(sum(len(labels) for _, labels in micro))  # pairs
            done = step + 1
            bar.update(1)
            row: dict[str, Any] = {}
            if due(done, cfg.train.log_every, cfg.train.max_steps):
                (pairs_per_s,) = distributed.all_sum(meter.rate())
                row = {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    **guard.counts(),
                    "pairs_per_s": pairs_per_s,
                }
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            t_pause = time.perf_counter()
            if due(done, cfg.train.eval_every, cfg.train.max_steps):
                # every rank evaluates the same pairs, so none waits on rank 0 in the next step
                row.setdefault("step", done)
                row.update(held_out_metrics(model, val_pairs, device, dtype, cfg.margin))
                if cfg.world_check:
                    row["test_correct_over_wrong"] = correct_over_wrong(
                        model, tok, cfg.tasks, device, dtype, block
                    )
                if progress:
                    bar.write(f"step {done}: val_acc {row['val_acc']:.3f}")
            if row:
                metrics.log(row)
                last.update(row)
            end_step(done, cfg.train, sigterm, metrics, save)
            meter.exclude(time.perf_counter() - t_pause)
        bar.close()
        metrics.close()
    return last
