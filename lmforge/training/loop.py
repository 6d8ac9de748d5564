"""Options every training stage shares, and the small pieces of a step they all use.

Kept deliberately thin: each stage's loop stays a plain function in its own module; what is
here is only what would otherwise be copied between them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check, opt
from lmforge.distributed import ALL_ROWS, DistConfig
from lmforge.errors import UserError
from lmforge.objectives.lm import IGNORE_INDEX
from lmforge.runtime import Batch, autocast, autocast_dtype, call, resolve_device, to_device
from lmforge.training.checkpoint import save_checkpoint
from lmforge.training.guard import StepGuard
from lmforge.training.metrics import MetricsWriter
from lmforge.training.preempt import Preempted, StopFlag
from lmforge.training.trackers import TRACKERS, unknown_tracker


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = opt(600, "optimizer steps to train for")
    batch_size: int = opt(16, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    block_size: int = opt(0, "tokens per training sequence; 0 means model.max_seq_len")
    device: str = opt("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "autocast precision; 'auto' measures whether bf16 is faster on this device"
    )
    compile: bool = opt(False, "torch.compile the model (slow start, faster steps)")
    threads: int = opt(0, "CPU threads for PyTorch; 0 keeps PyTorch's default")
    seed: int = opt(0, "seed for initialisation, data order and dropout")
    log_every: int = opt(10, "write a metrics row every N steps")
    eval_every: int = opt(200, "evaluate on held-out data every N steps (and at the end)")
    eval_blocks: int = opt(64, "held-out blocks per evaluation")
    ckpt_every: int = opt(200, "save resume state every N steps (and at the end)")
    keep_checkpoints: int = opt(
        2,
        "resume states kept on disk (the newest ones; at least 2, so a damaged newest one "
        "still leaves one to resume from)",
    )
    nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a NaN/inf loss or gradient norm: stop the run naming the step, or skip the update"
    )
    max_skips: int = opt(5, "stop the run once this many updates in a row were skipped")
    spike: Literal["off", "warn", "skip"] = opt(
        "warn",
        "loss or grad-norm spikes over their running statistics: off, warn (in the log "
        "and metrics) or skip (also drop the update)",
    )
    spike_z: float = opt(6.0, "spike: standard deviations above the running mean")
    spike_warmup: int = opt(50, "spike: steps of statistics gathered before any flag")
    trackers: tuple[str, ...] = opt(
        (), "extra metric sinks besides metrics.jsonl: tensorboard, wandb"
    )
    dist: DistConfig = opt(DistConfig(), "multi-process runs under torchrun")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1 (got {getattr(self, name)})")
        check(self.ckpt_every >= 1, "ckpt_every", "must be >= 1")
        check(self.eval_blocks >= 1, "eval_blocks", "must be >= 1")
        check(self.block_size >= 0, "block_size", "must be >= 0")
        check(self.threads >= 0, "threads", "must be >= 0")
        check(self.keep_checkpoints >= 2, "keep_checkpoints", "must be >= 2")
        check(self.max_skips >= 1, "max_skips", "must be >= 1")
        check(self.spike_z > 0, "spike_z", "must be > 0")
        check(self.spike_warmup >= 1, "spike_warmup", "must be >= 1")
        for name in self.trackers:
            check(name in TRACKERS, "trackers", unknown_tracker(name))
        check(len(set(self.trackers)) == len(self.trackers), "trackers", "names a tracker twice")


def setup_device(
    cfg: TrainConfig, *, multi_process: bool = False
) -> tuple[torch.device, torch.dtype]:
    """This process's device and autocast dtype; under torchrun, also join the process group.

    A stage passes `multi_process=True` once it shares each step's batch between ranks and
    writes files from rank 0 only; any other stage refuses to run under torchrun, where every
    process would train the whole run and write the same files.
    """
    world = distributed.launched_world_size()
    if world > 1 and not multi_process:
        raise UserError(
            f"WORLD_SIZE={world}: this stage runs in one process only (pretrain, sft, reward, "
            "dpo, ppo and grpo run under torchrun); start it without torchrun or with "
            "--nproc-per-node 1"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise UserError(f"train.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: CUDA requested but not available")
    device = distributed.init(cfg.dist, device)
    return device, autocast_dtype(cfg.dtype, device)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[Batch, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    n_micro: int,
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float,
    step: int,
    forward: Callable[..., torch.Tensor] | None = None,
    rows: slice = ALL_ROWS,
    row_share: float = 1.0,
    guard: StepGuard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (mean loss over the step's whole batch, grad norm).

    `n_micro` is the step's micro-batches (train.grad_accum). In one process `micro_batches`
    are all of them; under torchrun, this rank's whole micro-batches of `distributed.Share`,
    of which it trains `rows`. `model` owns the parameters (wrapped by `distributed.wrap`:
    gradients are averaged over ranks at the last micro-step); `forward` is the (possibly
    compiled) callable for the forward pass. The loss and gradient equal one process's for any
    number of ranks; for that, `loss_fn` must be a mean over the targets that are not
    IGNORE_INDEX (as `token_loss` is). `guard` (guard.py) decides, before `optimizer.step`,
    whether the update is applied (non-finite values, spikes); without one a non-finite loss
    or grad norm stops the run. Either way a NaN never reaches the weights.

    Pairwise stages (reward, DPO) cannot cut rows from a collated micro-batch (it holds both
    sides of each pair, perhaps packed together), so they take this rank's pairs before
    collating and give `row_share`, the part of each micro-batch's pairs those are; `loss_fn`
    is then a mean over pairs, and every pair weighs the same.
    """
    forward = model if forward is None else forward
    batches = list(micro_batches)
    # DDP averages gradients over ranks, so each rank's loss carries its micro-batches' share
    # of the step: with W ranks, its own mean losses divided by n_micro / W.
    per_rank = n_micro / distributed.world_size()
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        weight = row_share
        if rows != ALL_ROWS:
            x, y, weight = _take_rows(x, y, rows)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with distributed.no_sync(model, sync=i == len(batches) - 1):
            with autocast(device, dtype):
                out = call(forward, x)
            loss = loss_fn(out, y)
            if weight != 1.0:
                # this rank's mean weighed by its share of the micro-batch's targets; with no
                # target it still joins the gradient all-reduce, adding zero
                loss = loss * weight if weight > 0 else out.sum() * 0.0
            loss = loss / per_rank
            loss.backward()
        loss_sum += loss.detach()
    loss_sum = distributed.mean(loss_sum)
    # an infinite bound measures the norm without clipping
    grad_norm = distributed.clip_grad_norm(model, grad_clip or float("inf"))
    if guard is not None:
        apply = guard.admit(step, loss_sum, grad_norm)  # values alike on every rank
    else:
        check_finite(loss_sum, step, "loss")
        check_finite(grad_norm, step, "gradient norm")
        apply = True
    if apply:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def end_step(
    done: int,
    cfg: TrainConfig,
    sigterm: StopFlag,
    metrics: MetricsWriter,
    save: Callable[[int], object],
) -> None:
    """After step `done`: `save(done)` when a checkpoint is due or SIGTERM reached any rank;
    after SIGTERM, close the metrics and raise `Preempted` (preempt.py)."""
    preempted = sigterm.requested()
    if preempted or due(done, cfg.ckpt_every, cfg.max_steps):
        save(done)
    if preempted:
        metrics.close()
        raise Preempted(done)


def saver(
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    run_config: dict[str, Any],
    dtype: torch.dtype,
    cfg: TrainConfig,
    guard: StepGuard,
) -> Callable[[int], None]:
    """The `save` that `end_step` calls for a stage stepping through `train_step`: its
    checkpoint at step `done`, with the guard's state so a resumed run decides alike."""

    def save(done: int) -> None:
        save_checkpoint(
            out, done, model, optimizer, run_config, dtype, cfg.keep_checkpoints,
            {"guard": guard.state_dict()}, sharded=cfg.dist.sharded,
        )  # fmt: skip

    return save


def _take_rows(x: Batch, y: torch.Tensor, rows: slice) -> tuple[Batch, torch.Tensor, float]:
    """Rows `rows` of a micro-batch (every input has the batch first) and the share of the
    micro-batch's targets they hold."""
    part = y[rows]
    total = int((y != IGNORE_INDEX).sum())
    weight = int((part != IGNORE_INDEX).sum()) / max(total, 1)
    if isinstance(x, tuple):
        return tuple(t[rows] for t in x), part, weight
    return x[rows], part, weight


def check_finite(value: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(value):
        raise UserError(
            f"step {step}: {what} became {value.item()} (training diverged; the update was "
            "not applied); lower optim.lr or raise optim.warmup_steps"
        )


class Throughput:
    """Tokens per second over the steps since the last `rate()` call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation, checkpoints) out of the rate."""
        self.t0 += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return r


def epoch_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count-1 of a run that visits all n items once per epoch, each epoch
    in its own seeded order: a pure function of the position, so a resumed run continues it."""
    return [int(_permutation(n, seed, k // n)[k % n]) for k in range(start, start + count)]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def due(done: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (and at the end) is due after step `done`."""
    return done % every == 0 or done == total


def step_bar(desc: str, total: int, start: int, progress: bool) -> tqdm:
    return tqdm(
        total=total, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True
    )
