"""The run directory contract: never clobber a user's run, never leave half a run behind.

- A fresh run refuses an existing non-empty folder unless `overwrite` is set; `--resume`
  requires a folder with a valid checkpoint (complete, and matching its manifest).
- The folder is created only after all input has been validated (the caller's job), and if a
  fresh run fails before its first checkpoint, what it wrote is removed again.
- Under torchrun, rank 0 alone creates, cleans up and writes the folder, and every rank leaves
  the stage only once rank 0's files are complete.
- When `torchrun --max-restarts` restarts a job's workers, a run resumes from the newest
  complete checkpoint of the folder its first attempt made, instead of refusing that folder
  (`restart_resume`).
- A resumed run keeps its saved config (`run_config.json`, key "run"): only its length and
  bookkeeping (`RESUMABLE`) may change, or it would be a different experiment from the one its
  checkpoint belongs to.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lmforge import distributed
from lmforge.config import load
from lmforge.errors import UserError
from lmforge.io import atomic_write_json
from lmforge.tokenizers import Tokenizer
from lmforge.training.checkpoint import latest_state, list_states
from lmforge.training.metrics import MetricsWriter, open_metrics, read_metrics

T = TypeVar("T")


def check_new_output(out: Path, *, overwrite: bool = False) -> None:
    """`out` may be written by a fresh run: missing, an empty folder, or replaced on request."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out}: already exists; use --resume to continue a run there "
            "or --overwrite to replace it"
        )


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Validate `out` before any work; return the state folder to resume from, if any."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if resume:
        state = latest_state(out) if out.is_dir() else None
        if state is None:
            raise UserError(
                f"{out}: nothing to resume (no complete checkpoint); "
                "start a new run without --resume"
            )
        return state
    check_new_output(out, overwrite=overwrite)
    return None


# Written by rank 0 of a fresh run under torchrun: the id of the job (TORCHELASTIC_RUN_ID) that
# made the folder, so that a restarted attempt knows the folder is its own.
JOB_MARK = ".torchrun_job"


def restart_resume(out: Path, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """This attempt's (resume, overwrite): the flags as given, except in workers that torchrun
    restarted after a failure (`--max-restarts`) in a folder that an earlier attempt of the
    same job started afresh (`JOB_MARK`): those resume from its newest complete checkpoint,
    whatever --overwrite said, or with none yet start afresh over what that attempt left. A
    folder the first attempt refused (another run's) is refused again."""
    restarts, job = distributed.restart_count(), distributed.job_id()
    mark = out / JOB_MARK
    if restarts == 0 or resume or job is None or not mark.is_file():
        return resume, overwrite
    if mark.read_text(encoding="utf-8") != job:
        return resume, overwrite
    state = latest_state(out)
    if state is None:
        distributed.print0(
            f"torchrun restart {restarts}: no checkpoint in {out} yet; starting over"
        )
        return False, True
    step = int(json.loads((state / "state.json").read_text(encoding="utf-8"))["step"])
    distributed.print0(
        f"torchrun restart {restarts}: resuming from the checkpoint of step {step} in {out}"
    )
    return True, False


@contextmanager
def run_dir(out: Path, *, fresh: bool, overwrite: bool) -> Iterator[Path]:
    """Create (or reuse, when resuming) the run folder; clean up a fresh one on failure."""
    main = distributed.is_main()
    if main and fresh and overwrite and out.exists():
        shutil.rmtree(out)
    created = main and fresh and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        job = distributed.job_id()
        if fresh and job is not None:
            (out / JOB_MARK).write_text(job, encoding="utf-8")
    try:
        yield out
    except BaseException:
        if main and fresh and not list_states(out):
            # check_run_dir let a fresh run in only if `out` was missing or empty, so
            # everything in it now is this run's and goes.
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    distributed.barrier()


# Options that may change when a run is continued, in every training stage.
RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_blocks",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.trackers",  # they only mirror metrics.jsonl
    "train.dist.timeout_s",
    "train.dist.activation_checkpointing",  # the same arithmetic, recomputed
    # what a fault does (guard.py): a run stopped by a NaN may go on skipping such steps
    "train.nonfinite",
    "train.max_skips",
    "train.spike",
    "train.spike_z",
    "train.spike_warmup",
)


def saved_run_config(out: Path) -> dict[str, Any]:
    path = out / "run_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["run"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{path}: cannot read the run's saved config ({e})") from None


def load_resume_config(
    cls: type[T], out: Path, config_file: Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """The saved config of the run in `out`, with a config file and overrides laid over it."""
    source = f"{out / 'run_config.json'} (resumed)"
    return load(cls, config_file, overrides, base=saved_run_config(out), source=source)


def check_resume_config(cfg: dict[str, Any], out: Path) -> None:
    """Refuse a resume whose config (as a dict) changes more than `RESUMABLE`."""
    fixed = [k for k in _diff(cfg, saved_run_config(out)) if k not in RESUMABLE]
    if fixed:
        raise UserError(
            f"{out}: --resume cannot change {', '.join(fixed)} (only {', '.join(RESUMABLE)}); "
            "start a new run to change them"
        )


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, prefix + k + ".")
        elif va != vb:
            out.append(prefix + k)
    return out


def final_row(out: Path) -> dict[str, Any]:
    """The last value of every metric in the run's metrics.jsonl."""
    last: dict[str, Any] = {}
    for row in read_metrics(out / "metrics.jsonl"):
        last.update(row)
    return last


def open_run_files(
    out: Path,
    tok: Tokenizer,
    run_config: dict[str, Any],
    start: int,
    *,
    fresh: bool,
    trackers: Sequence[str],
) -> MetricsWriter:
    """A training stage's files at its (re)start: under torchrun every rank must resume from
    the same `start`; rank 0 writes the tokenizer (fresh runs) and run_config.json; metrics.jsonl
    is opened (cut back to `start` when resuming) with the `trackers`."""
    distributed.agree(start, "the step to resume from")
    if distributed.is_main():
        if fresh:
            tok.save(out / "tokenizer")
        atomic_write_json(out / "run_config.json", run_config)
    return open_metrics(out, None if fresh else start, trackers, run_config)
