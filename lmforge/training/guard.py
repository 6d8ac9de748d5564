"""What may reach the optimizer: the non-finite policy and the loss / grad-norm spike detector.

`StepGuard.admit` runs inside `train_step` between the backward pass and `optimizer.step`, on
values every rank holds alike (the loss is all-reduced; the grad norm is measured on gradients
DDP already averaged), so all ranks take the same decision and their weights never part.

- Non-finite loss or grad norm (`train.nonfinite`): `stop` ends the run with an error naming
  the step and the cause; `skip` drops that update (train_step zeroes the gradients) and counts
  it. Either way the NaN never reaches the weights or the AdamW moments.
- Spikes (`train.spike`): a value more than `spike_z` running standard deviations above its
  running mean (exponential moving averages over ~`_WINDOW` steps, flagged only after
  `spike_warmup` steps) is reported (`warn`) or its update dropped too (`skip`). Upward only:
  a falling loss is no fault. A skipped value stays out of the running statistics and a
  flagged but applied one enters them cut to the threshold, so one spike cannot mask the next.
  Skipping a spike's batch follows PaLM (Chowdhery et al., 2022, sec. 5.1), which rewound ~100
  steps and skipped 200-500 batches; this skips only the one update, with no rewind.
- `train.max_skips` skips in a row stop the run: a loss that has moved for good, or one that
  stays NaN, is divergence, not a glitch.

The counters go into the metrics rows (`skipped_steps`, `spikes`) and the detector's state
into each checkpoint, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import check
from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.training.loop import TrainConfig

_WINDOW = 50  # steps the running statistics mostly cover
_MIN_REL_STD = 0.02  # a std floor, relative to the mean: flat stretches make tiny stds


@dataclass
class Running:
    """Mean and variance of a series: the plain ones for the first `_WINDOW` values, then
    exponentially weighted (the incremental update of Finch, 2009)."""

    n: int = 0
    mean: float = 0.0
    var: float = 0.0

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), _MIN_REL_STD * abs(self.mean), 1e-12)

    def z(self, x: float) -> float:
        return (x - self.mean) / self.std

    def update(self, x: float) -> None:
        self.n += 1
        a = max(1 / self.n, 1 / _WINDOW)
        d = x - self.mean
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)


class StepGuard:
    """The decision, per optimizer step, whether its update is applied (see module doc)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stats = {"loss": Running(), "grad_norm": Running()}
        self.skipped = 0  # updates skipped in the whole run
        self.spikes = 0  # steps flagged as spikes
        self.in_a_row = 0

    def admit(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether step `step`'s update may be applied; raises `UserError` to stop the run."""
        values = {"loss": float(loss), "grad_norm": float(grad_norm)}
        for name, v in values.items():
            if not math.isfinite(v):
                cause = f"{'gradient norm' if name == 'grad_norm' else name} became {v}"
                if self.cfg.nonfinite == "stop":
                    raise UserError(
                        f"step {step}: {cause} (training diverged; the update was not applied); "
                        "lower optim.lr or raise optim.warmup_steps, or set train.nonfinite=skip"
                    )
                return self._skip(step, cause)
        watch = self.cfg.spike != "off"
        spiked = [
            f"{name} spike ({v:.4g}, {self.stats[name].z(v):.1f} std above its running "
            f"mean {self.stats[name].mean:.4g})"
            for name, v in values.items()
            if watch and self._armed(name) and self.stats[name].z(v) > self.cfg.spike_z
        ]
        if spiked:
            self.spikes += 1
            if self.cfg.spike == "skip":
                return self._skip(step, " and ".join(spiked))
            _warn(f"step {step}: {' and '.join(spiked)}")
        for name, v in values.items():
            # a flagged value enters the statistics cut to the threshold: one spike cannot
            # blind the detector, and a loss that truly moved is followed within some steps
            r = self.stats[name]
            r.update(min(v, r.mean + self.cfg.spike_z * r.std) if self._armed(name) else v)
        self.in_a_row = 0
        return True

    def _armed(self, name: str) -> bool:
        return self.stats[name].n >= self.cfg.spike_warmup

    def _skip(self, step: int, cause: str) -> bool:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.cfg.max_skips:
            raise UserError(
                f"step {step}: {self.in_a_row} updates in a row skipped (train.max_skips="
                f"{self.cfg.max_skips}; last: {cause}); training diverged: lower optim.lr "
                "or raise optim.warmup_steps"
            )
        _warn(f"step {step}: {cause}; update skipped")
        return False

    def counts(self) -> dict[str, int]:
        """For a metrics row: the skipped updates and spikes so far, when there were any."""
        row = {"skipped_steps": self.skipped, "spikes": self.spikes}
        return {k: v for k, v in row.items() if v}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able, for the checkpoint's state.json."""
        return {
            "stats": {k: [r.n, r.mean, r.var] for k, r in self.stats.items()},
            "skipped": self.skipped,
            "spikes": self.spikes,
            "in_a_row": self.in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None (a checkpoint from before the guard) keeps the start."""
        if state is None:
            return
        for k, (n, mean, var) in state["stats"].items():
            self.stats[k] = Running(int(n), float(mean), float(var))
        self.skipped, self.spikes = int(state["skipped"]), int(state["spikes"])
        self.in_a_row = int(state["in_a_row"])


def _warn(message: str) -> None:
    if distributed.is_main():
        tqdm.write(f"warning: {message}", file=sys.stderr)


def check_stop_only(train: TrainConfig, stage: str) -> None:
    """For the config of a stage that steps its optimizer itself (PPO, GRPO: several updates
    per iteration), where only the default (stop on non-finite values) applies."""
    where = "skipping is for pretrain, sft, reward and dpo"
    check(train.nonfinite == "stop", "train.nonfinite", f"{stage} stops on NaN/inf; {where}")
    check(train.spike != "skip", "train.spike", f"{stage} watches no spikes; {where}")
