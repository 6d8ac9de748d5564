"""DPO (and IPO) from preference pairs, starting from the SFT model.

`dpo(cfg, out)` reads and validates the preference files, renders each side of each pair with
the chat template (prompt + reply + `<|end_of_turn|>`, loss mask on the reply), computes the
frozen reference's summed log-probs of every sequence once, then runs a plain loop: B pairs ->
one forward over the 2B right-padded sequences -> summed reply log-probs -> loss from the
`objectives/dpo.py` table -> backward -> clip -> step -> log -> eval -> checkpoint. Pairs are
visited in a seeded order that is a pure function of the step, so a killed run resumes exactly.

Evaluation: held-out pair loss, implicit-reward accuracy and margin; on the world also the
policy's held-out gold reward, exact match and KL to the reference (`training/align.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt
from lmforge.data.instruction import Message, hold_out_tail
from lmforge.data.preference import Preference, load_preferences
from lmforge.data.world_tasks import TaskConfig
from lmforge.generation.generate import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.objectives.dpo import DPO_LOSSES, dpo_loss
from lmforge.objectives.lm import token_logprobs
from lmforge.runtime import DTYPES, autocast, to_device
from lmforge.tokenizers import Tokenizer
from lmforge.tokenizers.chat import render_chat
from lmforge.training.align import eval_policy, open_run, policy_run_config, start_rl
from lmforge.training.checkpoint import load_state
from lmforge.training.guard import StepGuard
from lmforge.training.loop import (
    TrainConfig,
    due,
    end_step,
    epoch_order,
    saver,
    step_bar,
    train_step,
)
from lmforge.training.optim import OptimConfig, build_optimizer, lr_at, set_lr
from lmforge.training.preempt import on_sigterm
from lmforge.training.rundir import final_row, run_dir


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    policy: str = opt("", "SFT checkpoint: the starting policy and the frozen reference")
    data: tuple[str, ...] = opt((), "preference files (.jsonl/.json) or hf:NAME[:SPLIT]")
    val_data: tuple[str, ...] = opt((), "held-out preferences; empty: the last val_fraction")
    val_fraction: float = opt(0.1, "share of pairs held out when no val_data is given")
    loss: str = opt("sigmoid", f"one of {', '.join(DPO_LOSSES)}")
    beta: float = opt(0.1, "strength of the implicit KL constraint to the reference")
    reward_model: str = opt("", "optional: a reward model whose score the eval reports")
    tasks: TaskConfig = opt(TaskConfig(), "the world's tasks, for the held-out eval")
    eval_prompts: int = opt(10, "held-out world prompts per task at each evaluation (0: none)")
    sampling: SamplingConfig = opt(
        SamplingConfig(temperature=1.0, max_new_tokens=32), "sampling of the held-out eval"
    )
    optim: OptimConfig = opt(
        OptimConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0), "optimizer and schedule"
    )
    train: TrainConfig = opt(
        TrainConfig(max_steps=200, batch_size=16, eval_every=100, ckpt_every=100),
        "training loop (batch_size counts pairs)",
    )

    def __post_init__(self) -> None:
        check(bool(self.policy), "policy", "give the SFT checkpoint (--policy DIR)")
        check(len(self.data) > 0, "data", "give at least one preference file (--data FILE)")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(self.loss in DPO_LOSSES, "loss", f"must be one of {', '.join(DPO_LOSSES)}")
        check(self.beta > 0, "beta", "must be > 0")
        check(self.eval_prompts >= 0, "eval_prompts", "must be >= 0")


@dataclass(frozen=True)
class PairSeqs:
    """Both sides of every pair: ids and reply masks, chosen first then rejected per pair."""

    ids: list[list[int]]  # 2N sequences: pair i's chosen at 2i, rejected at 2i + 1
    masks: list[list[bool]]
    label: torch.Tensor  # (N,) P(chosen preferred)
    n_truncated: int = 0  # pairs with a side longer than the block: its prompt's start was cut

    def __len__(self) -> int:
        return len(self.label)


def render_pair_seqs(tok: Tokenizer, prefs: Sequence[Preference], block: int) -> PairSeqs:
    """Both sides of each pair, a side longer than `block` cut to its last `block` tokens: a
    long prompt loses its start, the reply stays (such pairs are counted in n_truncated)."""
    ids, masks, cut = [], [], set()
    for i, p in enumerate(prefs):
        for reply in (p.chosen, p.rejected):
            x, m = render_chat(tok, [*p.prompt, Message("assistant", reply)])
            if len(x) > block:
                cut.add(i)
            ids.append(x[-block:])
            masks.append(m[-block:])
    label = torch.tensor([p.label for p in prefs], dtype=torch.float32)
    return PairSeqs(ids, masks, label, n_truncated=len(cut))


def collate_seqs(seqs: PairSeqs, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (2B, T), reply mask (2B, T)) for pairs idx, right-padded: chosen rows first."""
    rows = [2 * i for i in idx] + [2 * i + 1 for i in idx]
    T = max(len(seqs.ids[r]) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T))
    for b, r in enumerate(rows):
        n = len(seqs.ids[r])
        ids[b, :n] = torch.tensor(seqs.ids[r])
        mask[b, :n] = torch.tensor(seqs.masks[r], dtype=torch.float32)
    return ids, mask


def sequence_logprobs(
    model: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs of the masked (reply) tokens of each row: (B, T) -> (B,); `model` is a
    decoder (or its DDP wrapper) giving logits."""
    logits = model(ids[:, :-1])
    return (token_logprobs(logits, ids[:, 1:]) * mask[:, 1:]).sum(dim=1)


@torch.no_grad()
def reference_logprobs(
    ref: Decoder, seqs: PairSeqs, device: torch.device, dtype: torch.dtype, batch: int = 32
) -> torch.Tensor:
    """(N, 2): the reference's summed reply log-probs of (chosen, rejected) of every pair."""
    out = []
    for i in range(0, len(seqs), batch):
        idx = list(range(i, min(i + batch, len(seqs))))
        ids, mask = to_device(collate_seqs(seqs, idx), device)
        with autocast(device, dtype):
            lp = sequence_logprobs(ref, ids, mask).float().cpu()
        out.append(torch.stack([lp[: len(idx)], lp[len(idx) :]], dim=1))
    return torch.cat(out)


def dpo(
    cfg: DPOConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Optimise the policy in `out` with DPO; return the final metrics row."""
    train_prefs = load_preferences(cfg.data)  # bad data fails before any model is loaded
    if cfg.val_data:
        val_prefs = load_preferences(cfg.val_data)
    else:
        train_prefs, val_prefs = hold_out_tail(train_prefs, cfg.val_fraction, "pair(s)")
    s = start_rl(cfg, out, resume, overwrite, rollouts=False, multi_process=True)
    policy, reference, tok, rm, world = s.policy, s.reference, s.tok, s.rm, s.data
    device, dtype, state = s.device, s.dtype, s.state
    world_size, rank = distributed.world_size(), distributed.rank()
    share = distributed.batch_share(cfg.train.batch_size, cfg.train.grad_accum, world_size, rank)
    progress = progress and distributed.is_main()
    block = cfg.train.block_size or policy.cfg.max_seq_len
    train, val = render_pair_seqs(tok, train_prefs, block), render_pair_seqs(tok, val_prefs, block)
    # every rank scores every pair once: simpler than gathering each rank's share
    ref_train = reference_logprobs(reference, train, device, dtype)
    ref_val = reference_logprobs(reference, val, device, dtype)
    ddp = distributed.wrap(policy, device, cfg.train.dist, dtype)  # the policy in one process
    optimizer = build_optimizer(policy, cfg.optim)  # after wrap: FSDP replaces the parameters
    run_config = policy_run_config("dpo", f"dpo-{cfg.loss}", cfg, s)

    def loss_fn(logps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = y.size(0)
        return dpo_loss(logps[:B], logps[B:], y[:, 0], y[:, 1], cfg.beta, cfg.loss, y[:, 2])[0]

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sequence_logprobs(ddp, ids, mask)

    guard = StepGuard(cfg.train)
    with run_dir(out, fresh=state is None, overwrite=overwrite), on_sigterm() as sigterm:
        start = 0
        if state is not None:
            saved = load_state(state, policy, optimizer)
            start, dtype = saved["step"], DTYPES[saved["autocast"]]
            guard.load_state_dict(saved.get("guard"))
        metrics, _ = open_run(out, s, run_config, start, cfg.train.trackers)
        n_cut = train.n_truncated + val.n_truncated
        if state is None:
            metrics.log({"step": 0, "n_train": len(train), "n_val": len(val), "truncated": n_cut})
        if progress:
            tqdm.write(
                f"dpo ({cfg.loss}, beta {cfg.beta}): {len(train)} pairs, {len(val)} held out, "
                f"{n_cut} cut to {block} tokens (prompt start dropped) | "
                f"{device} | " + (f"resuming at step {start}" if start else f"from {cfg.policy}")
            )
        if start >= cfg.train.max_steps:
            metrics.close()
            distributed.print0(f"{out}: already complete at step {start} (raise train.max_steps)")
            return final_row(out)

        save = saver(out, policy, optimizer, run_config, dtype, cfg.train, guard)

        bar = step_bar("dpo", cfg.train.max_steps, start, progress)
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        B = cfg.train.batch_size
        for step in range(start, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim)
            set_lr(optimizer, lr, cfg.optim.lr)
            micro = []  # this rank's pairs, taken before collating: a batch holds both sides
            for m in share.micro:
                idx = epoch_order(
                    len(train), cfg.train.seed, (step * cfg.train.grad_accum + m) * B, B
                )[share.rows]
                y = torch.cat([ref_train[idx], train.label[idx, None]], dim=1)  # (pairs, 3)
                micro.append((collate_seqs(train, idx), y))
            loss, grad_norm = train_step(
                ddp,
                optimizer,
                micro,
                loss_fn,
                n_micro=cfg.train.grad_accum,
                device=device,
                dtype=dtype,
                grad_clip=cfg.optim.grad_clip,
                step=step + 1,
                guard=guard,
                forward=forward,
                row_share=share.fraction(B),
            )
            done = step + 1
            bar.update(1)
            row: dict[str, Any] = {}
            if due(done, cfg.train.log_every, cfg.train.max_steps):
                row = {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    **guard.counts(),
                    "elapsed_s": time.perf_counter() - t_start,
                }
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if due(done, cfg.train.eval_every, cfg.train.max_steps):
                # every rank evaluates the same pairs, so none waits on rank 0 in the next step
                row.setdefault("step", done)
                row.update(held_out(policy, val, ref_val, cfg, device, dtype))
                if world.eval:
                    ev, _ = eval_policy(policy, reference, rm, tok, world, cfg.sampling)
                    row.update({f"val_{k}": v for k, v in ev.items()})
                if progress:
                    extra = f" gold {row['val_gold']:.3f}" if "val_gold" in row else ""
                    bar.write(f"step {done}: pair accuracy {row['val_acc']:.3f}{extra}")
            if row:
                metrics.log(row)
                last.update(row)
            end_step(done, cfg.train, sigterm, metrics, save)
        bar.close()
        metrics.close()
    return last


@torch.no_grad()
def held_out(
    policy: Decoder,
    val: PairSeqs,
    ref_val: torch.Tensor,
    cfg: DPOConfig,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 32,
) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy (chosen above rejected) and mean margin."""
    policy.eval()
    pol = reference_logprobs(policy, val, device, dtype, batch)
    policy.train()
    loss, rc, rr = dpo_loss(
        pol[:, 0], pol[:, 1], ref_val[:, 0], ref_val[:, 1], cfg.beta, cfg.loss, val.label
    )
    return {
        "val_loss": float(loss),
        "val_acc": float((rc > rr).float().mean()),
        "val_margin": float((rc - rr).mean()),
    }
