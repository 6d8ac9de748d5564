"""Preemption: SIGTERM ends a training run cleanly instead of killing it mid-step.

SIGTERM is what schedulers send before they take a machine back (SLURM, Kubernetes, spot
instances; torchrun forwards it to every rank). Inside `on_sigterm()` the signal only sets a
flag; the loop asks `requested()` after each step, and when it is set the stage saves a
checkpoint of the step it just finished and raises `Preempted`, which the CLI turns into exit
code `PREEMPTED_EXIT_CODE`. `--resume` then continues exactly where it stopped. Under torchrun
the flag is summed over ranks, so all stop after the same step even when the signal reached
them at different moments.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from lmforge import distributed

# 128 + SIGTERM (15): what a shell reports for a process that SIGTERM ended, so job scripts
# and schedulers read a preempted run as "terminated on request", not as a crash (1) or bad
# input (2).
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint of `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(
            f"stopped on SIGTERM after step {step} (checkpoint saved); continue with --resume"
        )
        self.step = step


class StopFlag:
    def __init__(self) -> None:
        self.raised = False

    def requested(self) -> bool:
        """Whether any rank received SIGTERM (a collective under torchrun: call it on every
        rank at the same point of each step)."""
        if distributed.world_size() == 1:
            return self.raised
        return distributed.all_sum(float(self.raised))[0] > 0


@contextmanager
def on_sigterm() -> Iterator[StopFlag]:
    """Within the block SIGTERM sets the yielded flag instead of ending the process; the
    previous handler is restored afterwards. Signals reach only the main thread, so elsewhere
    the flag never rises and SIGTERM keeps its old effect."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.raised = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
