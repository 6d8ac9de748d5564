"""The run directory contract: never clobber a user's run, never leave half a run behind.

- A fresh run refuses an existing non-empty folder unless `overwrite` is set; `--resume`
  requires a folder with a complete checkpoint.
- The folder is created only after all input has been validated (the caller's job), and if a
  fresh run fails before its first checkpoint, what it wrote is removed again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import UserError
from lmforge.training.checkpoint import latest_state


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


@contextmanager
def run_dir(out: Path, *, fresh: bool, overwrite: bool) -> Iterator[Path]:
    """Create (or reuse, when resuming) the run folder; clean up a fresh one on failure."""
    if fresh and overwrite and out.exists():
        shutil.rmtree(out)
    created = fresh and not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if fresh and latest_state(out) is None:
            # check_run_dir let a fresh run in only if `out` was missing or empty, so
            # everything in it now is this run's and goes.
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
