"""Where and how tensors run: device choice, mixed precision, seeding, threads.

`autocast_dtype` answers "is bf16 faster here?" for a CPU from its instruction set: with AMX or
AVX512-BF16, bf16 matmuls run several times faster than fp32; elsewhere they can be slower. Where
the flags cannot be read (not Linux), it measures once per process instead. Reading flags keeps
the choice the same in every run on a machine, which two runs compared number for number need
(a timing can flip on a busy machine).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def _cpu_bf16_is_faster() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return _bf16_matmul_wins()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_matmul_wins(n: int = 512, reps: int = 6) -> bool:
    """Time an n*n*n matmul in fp32 and bf16 and say whether bf16 wins by a clear margin."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    try:
        return best(torch.bfloat16) * 1.25 < best(torch.float32)
    except RuntimeError:  # no bf16 kernels on this CPU build
        return False


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Resolve the `train.dtype` option ('auto', 'float32', 'bfloat16') for a device."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_bf16_is_faster() else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    """Mixed-precision context for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


Batch = torch.Tensor | tuple[torch.Tensor, ...]


def to_device(x: Batch, device: torch.device) -> Batch:
    """Move a model input (one tensor, or a tuple such as encoder and decoder ids) to `device`."""
    if isinstance(x, tuple):  # a None in it (an optional input left out) stays None
        return tuple(t if t is None else t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def call(forward: Callable[..., torch.Tensor], x: Batch) -> torch.Tensor:
    """forward(x), or forward(*x) for a tuple input."""
    return forward(*x) if isinstance(x, tuple) else forward(x)
