"""Optional metric sinks beside `metrics.jsonl`: TensorBoard and Weights & Biases.

`metrics.jsonl` stays the record: the report and the tests read only it. A tracker mirrors
each row to a dashboard and nothing reads it back. Both are optional extras
(`pip install 'lmforge[tensorboard]'`, `'lmforge[wandb]'`), imported only when a run names
them in `train.trackers`; `check_trackers` refuses a missing package before any work starts,
not after the tokenizer and the first hour of training.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from lmforge.errors import UserError
from lmforge.io import atomic_write_text


class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The plottable values of a metrics row: numbers, not flags, labels or nested records.
    `step` is the x axis, not a curve."""
    return {
        k: v
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class TensorBoardTracker:
    """Event files under OUT/tensorboard (`tensorboard --logdir OUT`)."""

    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # Like metrics.jsonl's cut-back on resume: TensorBoard drops the events a killed run
        # wrote after the checkpoint it continues from, so no step is plotted twice.
        purge = None if resume_step is None else resume_step + 1
        self._w = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self._w.add_scalar(key, value, global_step=step)
        # Flushed per row like metrics.jsonl: a killed run keeps every step before its
        # checkpoint, which a resume does not write again.
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandbTracker:
    """A W&B run named after the run folder, with the stage's config. wandb reads WANDB_MODE
    itself: "offline" writes only under OUT/wandb (upload later with `wandb sync`)."""

    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None):
        import wandb

        # One W&B run per lmforge run: a resumed run continues under the id it started with.
        # (`resume_step` is not needed: W&B ignores rows at steps it already has, with a
        # warning, where TensorBoard needs telling to drop them.)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
        try:
            self._run = wandb.init(
                project="lmforge",
                name=out.name,
                dir=str(out),
                config=config,
                id=run_id,
                resume="allow",
                # lmforge's output is progress bars; wrapping stdout to mirror them fights tqdm
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as e:  # e.g. no API key: a setup problem, not an lmforge bug
            raise UserError(
                f"train.trackers: wandb: {e} (set WANDB_MODE=offline to log without an account)"
            ) from None

    def log(self, row: dict[str, Any], step: int) -> None:
        self._run.log(scalars(row), step=step)

    def close(self) -> None:
        self._run.finish()


# Each tracker by the name `train.trackers` uses, which is also the name of its package.
TRACKERS: dict[str, Callable[[Path, dict[str, Any], int | None], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
}


def check_trackers(names: Sequence[str]) -> None:
    """Refuse a tracker whose package is not installed; call before any work starts."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"train.trackers: {unknown_tracker(name)}")
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"train.trackers: {name} needs the '{name}' package: pip install 'lmforge[{name}]'"
            ) from None


def unknown_tracker(name: str) -> str:
    return f"unknown tracker '{name}' (choose from {', '.join(TRACKERS)})"


def open_trackers(
    names: Sequence[str], out: Path, config: dict[str, Any], resume_step: int | None = None
) -> list[Tracker]:
    """The trackers `names` for the run in `out`; `config` is the stage's run_config.json,
    `resume_step` the checkpoint step a resumed run continues from."""
    check_trackers(names)
    return [TRACKERS[name](out, config, resume_step) for name in names]
