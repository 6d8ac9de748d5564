"""Multi-process training on PyTorch's own engine: torchrun, process groups, DDP and FSDP2.

The only module that touches `torch.distributed`. Under `torchrun --nproc-per-node N -m lmforge
<stage>` every process (a "rank") runs the same stage with the same config, and this module

- joins the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT): NCCL with one GPU per rank on CUDA, gloo on CPU. Every collective
  has a timeout, so a rank that dies or hangs makes the others fail instead of waiting forever;
- wraps the model in DDP (`strategy=ddp`: every rank holds all parameters, gradients and
  optimizer state; gradients are averaged during the backward pass) or shards it with FSDP2
  (`strategy=fsdp`, `fully_shard` per transformer block and then the root: each rank keeps 1/N
  of them and gathers one block's parameters at a time), and skips the gradient reduction on
  all but the last micro-step of gradient accumulation (`no_sync`). Either may recompute each
  block's activations in the backward pass (`activation_checkpointing`), also in one process;
- writes and reads the sharded model and optimizer state of checkpoints, with any number of
  ranks (`save_shards`, `load_shards`: torch's distributed checkpoint in safetensors, no
  pickle), and gathers the whole model on rank 0 for the model folder (`full_model_state`);
- says which part of each optimizer step's global batch a rank takes (`batch_share`). The global
  batch is the config's batch_size * grad_accum rows whatever the number of ranks, and the rows
  of a step do not depend on it either, so a checkpoint resumes with another world size;
- averages or sums logged numbers across ranks, and tells the writers of files (run folder,
  metrics, checkpoints) whether this is rank 0, the one rank that writes;
- names the rank(s) a timed-out collective waited for (`naming_hung_ranks`), and tells a stage
  whether torchrun restarted its workers (`restart_count`, for `torchrun --max-restarts`).

In a plain single process every function here is the identity or does nothing (strategy=fsdp
then trains the plain model, as ddp does), so a stage has one code path for one process and
for many.
"""

from __future__ import annotations

import datetime
import inspect
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import check, opt
from lmforge.errors import UserError

try:  # FSDP2 and DCP's safetensors storage (torch >= 2.9); without them strategy=fsdp is refused
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )
    from torch.distributed.tensor import DTensor

    HAS_FSDP2 = "save_distributed" in inspect.signature(HuggingFaceStorageWriter).parameters
except ImportError:
    HAS_FSDP2 = False


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    timeout_s: float = opt(
        600.0,
        "torchrun only: seconds a rank waits for the others in a collective before the job "
        "fails (this includes waiting while rank 0 tokenizes the corpus)",
    )
    strategy: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "torchrun only: ddp keeps a whole copy of the model, its gradients and optimizer state "
        "on every rank; fsdp (FSDP2) shards them over the ranks (about 1/N each, plus one "
        "block's parameters gathered at a time) for models that do not fit one device. In one "
        "process both train the plain model",
    )
    activation_checkpointing: bool = opt(
        False,
        "keep only each transformer block's input in the forward pass and recompute the rest "
        "in the backward pass: activation memory of one block instead of all, ~30% more compute",
    )

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "timeout_s", f"must be > 0 (got {self.timeout_s})")
        check(
            self.strategy == "ddp" or HAS_FSDP2,
            "strategy",
            f"fsdp needs torch >= 2.9 (FSDP2 and safetensors distributed checkpoints); "
            f"this is torch {torch.__version__}",
        )

    @property
    def sharded(self) -> bool:
        """Whether checkpoints hold sharded state (written by every rank), as fsdp's do."""
        return self.strategy == "fsdp"


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
    model: torch.nn.Module,
    device: torch.device,
    cfg: DistConfig,
    dtype: torch.dtype,
    *,
    unused_params: bool = False,
) -> torch.nn.Module:
    """The module to run the training forward through; build the optimizer after this call.

    First, with `cfg.activation_checkpointing`, each transformer block is wrapped to recompute
    its activations in the backward pass (in any number of processes). Then, under torchrun:
    - ddp: a DDP wrapper around `model`, whose parameters stay `model`'s (so its optimizer,
      checkpoints and evaluation use it directly); DDP only adds the gradient all-reduce. Our
      buffers (rotary tables) are constants, so they are not re-broadcast before every forward.
      `unused_params`: some trainable parameters get no gradient (DDP then searches the graph
      for them after each forward, instead of waiting for their gradients forever);
    - fsdp: `model` itself, sharded in place by FSDP2 (its parameters become DTensors, which is
      why the optimizer must be built afterwards). With CUDA and bf16 autocast, parameters are
      gathered in bf16 and gradients reduced in fp32; on CPU all stays fp32.
    In one process `model` comes back as it is.
    """
    if cfg.activation_checkpointing:
        for blocks, i, block in _blocks(model):
            # non-reentrant: works with unused inputs, kwargs and FSDP's hooks
            blocks[i] = checkpoint_wrapper(block)
    if not dist.is_initialized():
        return model
    if cfg.strategy == "fsdp":
        bf16 = device.type == "cuda" and dtype == torch.bfloat16
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        # one communication unit per block (only one block's parameters whole at a time), then
        # the root for what is left: embeddings, final norm and heads
        for _, _, block in _blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # FSDP gathers a module's weights around its forward; an encoder-decoder's generation
        # calls these apart from it (the cross keys/values once per input, then each step)
        methods = [(model, "encode"), (model, "decode")]
        methods += [(block, "memory_kv") for _, _, block in _blocks(model)]
        for module, name in methods:
            if hasattr(module, name):
                register_fsdp_forward_method(module, name)
        return model
    ids = [device.index] if device.type == "cuda" else None
    no_buffer_sync: dict[str, Any] = {_NO_BUFFER_SYNC: False}
    return DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=unused_params, **no_buffer_sync
    )


def _blocks(model: torch.nn.Module) -> list[tuple[torch.nn.ModuleList, int, torch.nn.Module]]:
    """(list, index, block) of every transformer block: in all our model families (and the
    reward model's trunk) the blocks, and only they, are the items of an nn.ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return [(blocks, i, block) for blocks in lists for i, block in enumerate(blocks)]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP shards (DTensors), not whole tensors."""
    return HAS_FSDP2 and any(isinstance(p, DTensor) for p in model.parameters())


# torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers; the older releases we
# support (>= 2.4) know only the old name.
_NO_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def no_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager[object]:
    """Around a micro-step's forward and backward: with `sync` False, DDP and FSDP keep the
    gradients local (they accumulate, FSDP's unsharded), so only the step's last micro-step
    pays for the gradient reduction."""
    if sync:
        return nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if HAS_FSDP2 and isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients down to a total norm of at most `max_norm` (inf: only measure it);
    return the norm before clipping. Of sharded gradients it is the norm of the whole gradient
    (each rank holds a part of it), the same number on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if HAS_FSDP2 and isinstance(norm, DTensor) else norm


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (the collective part; training/checkpoint.py owns the folder layout)
#
# torch's distributed checkpoint (DCP) writes each rank's shards and reads them back into any
# number of ranks, resharding on the way. Its default FileSystemWriter keeps the index of the
# shards (`.metadata`) as a pickle, which lmforge never reads. DCP's Hugging Face storage does
# without: each rank writes one safetensors file whose JSON header holds the offsets of its
# shards, and the reader rebuilds the index from those headers. It stores tensors only, so the
# optimizer's param groups go to the caller's JSON.


def save_shards(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> list[dict[str, Any]]:
    """Every rank writes its part of the model's parameters and the optimizer's state (a plain
    module in one process: all of it) into `folder`, one safetensors file per rank, keyed by
    parameter name (`model.<name>`, `optim.<name>.exp_avg`, ...; a tied weight once, see
    `tied_names`). Every rank must call it.
    Returns the optimizer's param groups (JSON-able; parameters by name) for the caller."""
    tied = tied_names(model)
    model_state = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
    optim_state = get_optimizer_state_dict(model, optimizer)
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
    state = {"model": model_state, "optim": optim_state["state"]}
    with _one_process_is_meant():
        dcp.save(state, storage_writer=writer)
    return cast(list[dict[str, Any]], optim_state["param_groups"])


def load_shards(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    param_groups: list[dict[str, Any]],
) -> None:
    """Load what `save_shards` wrote, with any number of ranks then and now, into `model` and
    `optimizer` (built but not stepped) and give the optimizer `param_groups`."""
    tied = tied_names(model)
    model_state = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
    # of an optimizer that has not stepped: zero moments of the right shapes to read into
    optim_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state["state"]}
    try:
        reader = HuggingFaceStorageReader(str(folder))
        with _one_process_is_meant():
            dcp.load(state, storage_reader=reader)
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder}: cannot load the sharded checkpoint ({first})") from None
    # DCP reads in place, so model_state now holds the checkpoint's tensors
    set_model_state_dict(model, model_state | {n: model_state[k] for n, k in tied.items()})
    set_optimizer_state_dict(
        model, optimizer, {"state": state["optim"], "param_groups": param_groups}
    )


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that, without a process group, it saves or loads in one process:
    that is what strategy=fsdp does in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{name: kept name} of the weights that are stored under another name, being shared by
    two modules (the tied LM head): of each such group the first name in sorted order is kept,
    as safetensors' `save_model` does, so sharded and whole-model files name them alike."""
    names: dict[int, list[str]] = {}
    for name, p in model.state_dict(keep_vars=True).items():
        names.setdefault(id(p), []).append(name)
    groups = [sorted(group) for group in names.values()]
    return {name: group[0] for group in groups for name in group[1:]}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters, gathered on rank 0's CPU (every rank must call this); an
    empty dict on the other ranks."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


# ---------------------------------------------------------------------------------------------
# Numbers across ranks


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (gloo has no AVG, so SUM then divide)."""
    return total(value) / world_size()


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
