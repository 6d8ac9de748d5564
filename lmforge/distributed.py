"""Multi-process training on PyTorch's own engine: torchrun, process groups and DDP.

The only module that touches `torch.distributed`. Under `torchrun --nproc-per-node N -m lmforge
<stage>` every process (a "rank") runs the same stage with the same config, and this module

- joins the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT): NCCL with one GPU per rank on CUDA, gloo on CPU. Every collective
  has a timeout, so a rank that dies or hangs makes the others fail instead of waiting forever;
- wraps the model in DDP, which averages gradients across ranks during the backward pass, and
  skips that all-reduce on all but the last micro-step of gradient accumulation (`no_sync`);
- says which part of each optimizer step's global batch a rank takes (`batch_share`). The global
  batch is the config's batch_size * grad_accum rows whatever the number of ranks, and the rows
  of a step do not depend on it either, so a checkpoint resumes with another world size;
- averages or sums logged numbers across ranks, and tells the writers of files (run folder,
  metrics, checkpoints) whether this is rank 0, the one rank that writes;
- names the rank(s) a timed-out collective waited for (`naming_hung_ranks`), and tells a stage
  whether torchrun restarted its workers (`restart_count`, for `torchrun --max-restarts`).

In a plain single process every function here is the identity or does nothing, so a stage has
one code path for one process and for many.
"""

from __future__ import annotations

import datetime
import inspect
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import check, opt
from lmforge.errors import UserError


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    timeout_s: float = opt(
        600.0,
        "torchrun only: seconds a rank waits for the others in a collective before the job "
        "fails (this includes waiting while rank 0 tokenizes the corpus)",
    )

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "timeout_s", f"must be > 0 (got {self.timeout_s})")


def launched_world_size() -> int:
    """Processes torchrun started for this job (1 outside torchrun), known before `init`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def restart_count() -> int:
    """How often torchrun has restarted this job's workers (`--max-restarts`); 0 at first."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job_id() -> str | None:
    """The id torchrun gives this job, the same in every attempt; None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def init(cfg: DistConfig, device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return this rank's device.

    Outside torchrun this returns `device` unchanged. On CUDA each rank takes the GPU of its
    LOCAL_RANK. Ends with a barrier, so everything a stage did before (checking its output
    folder) has been done by every rank before rank 0 writes anything. The process group lives
    until `shutdown` (called by the command-line entry point), so stages run one after another
    in one process share it.
    """
    world = launched_world_size()
    if world == 1:
        return device
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start multi-process runs "
            "with torchrun (torchrun --nproc-per-node N -m lmforge ...)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"train.device={device}: under torchrun each process uses the GPU of its "
                "LOCAL_RANK; give 'cuda' or 'auto'"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"train.device={device}: torchrun runs on 'cpu' or 'cuda' only")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            **_attempt_store(world, timeout),
        )
        _timeout_s[0] = cfg.timeout_s
    barrier()
    return device


def _attempt_store(world: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """The store for `init_process_group`, when it is torchrun's (its agent's) with one key
    space per attempt: torchrun (2.13) hands every attempt of a restarted job the same store and
    no prefix, so the ranks of a restart would read the addresses their dead predecessors
    published there, and fail to connect or hang. Else none: rank 0 hosts a fresh store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    store = dist.PrefixStore(f"lmforge/attempt_{restart_count()}", agent)
    return {"store": store, "rank": int(os.environ["RANK"]), "world_size": world}


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints (before `init`, by torchrun's
    RANK)."""
    if not dist.is_initialized():
        return os.environ.get("RANK", "0") == "0"
    return rank() == 0


def print0(*args: object) -> None:
    if is_main():
        print(*args, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling a cache), then the others run it (reading it):
    concurrent writers of one cache folder would replace each other's files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------------------------------------
# Models and gradients


def wrap(
    model: torch.nn.Module, device: torch.device, *, unused_params: bool = False
) -> torch.nn.Module:
    """The module to run the training forward through: DDP under torchrun, else `model`.

    Parameters stay those of `model` (so its optimizer, checkpoints and evaluation use it
    directly); DDP only adds the gradient all-reduce. Our buffers (rotary tables) are constants,
    so they are not re-broadcast before every forward. `unused_params`: some trainable
    parameters get no gradient (DDP then searches the graph for them after each forward,
    instead of waiting for their gradients forever).
    """
    if not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    no_buffer_sync: dict[str, Any] = {_NO_BUFFER_SYNC: False}
    return DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=unused_params, **no_buffer_sync
    )


# torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers; the older releases we
# support (>= 2.4) know only the old name.
_NO_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def no_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager[object]:
    """Around a micro-step's forward and backward: with `sync` False, DDP keeps the gradients
    local (they accumulate), so only the step's last micro-step pays for the all-reduce."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


# ---------------------------------------------------------------------------------------------
# Numbers across ranks


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (gloo has no AVG, so SUM then divide)."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def total(value: torch.Tensor) -> torch.Tensor:
    """A tensor summed over ranks, e.g. the masked sums behind a batch-wide mean."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def all_sum(*values: float) -> list[float]:
    """Each value summed over ranks, e.g. tokens each rank trained on."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def agree(value: int, what: str) -> None:
    """Fail on every rank, naming the values, unless all ranks hold the same `value`: a rank
    that read other files (a node without the shared run folder) must not train on."""
    if not dist.is_initialized():
        return
    mine = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    seen = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, mine)
    values = [int(t) for t in seen]
    if len(set(values)) > 1:
        each = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"{what} differs between ranks ({each}); all must see the same run folder")


# ---------------------------------------------------------------------------------------------
# Ranks that do not arrive


# The process group's collective timeout (train.dist.timeout_s), once `init` has joined one.
_timeout_s = [600.0]


@contextmanager
def naming_hung_ranks() -> Iterator[None]:
    """Turn a collective's timeout into a `UserError` naming the rank(s) it waited for.

    A timed-out collective only says that it timed out. Each rank that sees the timeout checks
    in at the job's key-value store (torchrun's, or rank 0's, which keeps serving while rank 0
    itself hangs) and waits up to the collective timeout for the others (the ranks waiting in
    the same collective time out at about the same moment); the ranks that never check in are
    the hung or dead ones."""
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized() or "timed out" not in str(e).lower():
            raise
        missing = _absent_ranks(min(_timeout_s[0], 60.0))
        who = (
            f"rank(s) {', '.join(map(str, missing))} did not arrive (hung or dead)"
            if missing
            else "the other ranks could not be reached"
        )
        raise UserError(
            f"rank {rank()}: a collective timed out (train.dist.timeout_s={_timeout_s[0]:g}): "
            f"{who}; "
            "look at that rank's output, or raise train.dist.timeout_s if it was only slow"
        ) from None


def _absent_ranks(timeout_s: float) -> list[int]:
    world, me = world_size(), rank()
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        prefix = f"lmforge/arrived/{restart_count()}/"
        store.set(prefix + str(me), "1")
        keys = [prefix + str(r) for r in range(world)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [r for r in range(world) if not store.check([keys[r]])]
    except (RuntimeError, KeyError, ValueError):  # the store went away with its host
        return []


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Data


def rank_part(n: int, what: str) -> slice:
    """This rank's contiguous part of n items that split evenly over the ranks (RL prompts)."""
    world, r = world_size(), rank()
    if n % world:
        raise UserError(
            f"{n} {what} cannot be split over {world} processes: make it a multiple of {world}"
        )
    per = n // world
    return slice(r * per, (r + 1) * per)


@dataclass(frozen=True)
class Share:
    """This rank's part of one optimizer step: the step is `grad_accum` micro-batches of
    `batch_size` rows, as one process would take them; this rank takes rows `rows` of each
    micro-batch in `micro` (indices within the step)."""

    micro: tuple[int, ...]
    rows: slice

    def fraction(self, batch_size: int) -> float:
        """The part of each of its micro-batches' rows this rank takes (1 or 1 / world)."""
        return len(range(batch_size)[self.rows]) / batch_size


ALL_ROWS = slice(None)


def batch_share(batch_size: int, grad_accum: int, world: int, rank: int) -> Share:
    """Split each step's micro-batches over ranks, whole, when grad_accum divides by the world
    size (each rank keeps the configured micro-batch and accumulates grad_accum / world of
    them); else split every micro-batch's rows (batch_size / world rows each). Together the
    ranks cover every row of the step exactly once."""
    if grad_accum % world == 0:
        per = grad_accum // world
        return Share(micro=tuple(range(rank * per, (rank + 1) * per)), rows=ALL_ROWS)
    if batch_size % world == 0:
        per = batch_size // world
        return Share(micro=tuple(range(grad_accum)), rows=slice(rank * per, (rank + 1) * per))
    raise UserError(
        f"train.batch_size={batch_size} with train.grad_accum={grad_accum} cannot be split over "
        f"{world} processes: make one of them a multiple of {world}"
    )
