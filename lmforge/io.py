"""Atomic file writes: every artefact appears whole or not at all.

Writers put bytes in a temporary file in the destination folder, fsync it, then `os.replace`
it over the final name, which is atomic on POSIX filesystems. A crash mid-write leaves a stray
`.tmp-*` file, never a truncated artefact under its real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(p: Path) -> None:
        p.write_text(text, encoding="utf-8", newline="")

    atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """One JSON value per line."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; if the block succeeds, make its files durable
    and rename it to `final` (replacing an older one). A crash leaves only `.tmp-*` behind."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Suffixes of PyTorch / pickle checkpoints. lmforge never opens them: unpickling a file can run
# any code it names, so a downloaded model could take over the machine.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickle_note(folder: Path) -> str:
    """A note for a "weights not found" error when `folder` holds only pickle checkpoints."""
    if not folder.is_dir():
        return ""
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not found:
        return ""
    return f" (only {found[0]}: pickle files can run code and are never loaded)"


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
