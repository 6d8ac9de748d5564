"""Checkpoint manifests: the files a checkpoint holds, with their sizes and SHA-256 digests.

`manifest.json` is written last, once every file it lists is on disk, so its presence says the
save finished and its digests say the bytes are still the ones written. Loading a checkpoint
checks it, so a truncated or bit-flipped file (a full disk, a bad copy, a failing drive) is
named instead of silently training on from damaged weights. Files are hashed in 1 MiB chunks:
memory stays flat and the cost is one extra read of the checkpoint (about 1 s per GB).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

from lmforge.errors import UserError
from lmforge.io import atomic_write_json, pickle_note

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, names: Iterable[str]) -> None:
    """Record `names` (paths relative to `folder`) with their sizes and digests."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in sorted(names)
    }
    atomic_write_json(folder / MANIFEST, {"format_version": 1, "files": files})


# Folders this process already verified, with the (size, mtime, inode) of each file then: a
# resume looks for the newest valid checkpoint, then loads it (and a torchrun restart looked
# first), and hashing a large checkpoint two or three times would cost minutes. Any rewrite
# or replacement of a file changes its stat and brings the full check back; a folder with a
# file modified in the last few seconds is not remembered, since file times are coarser than
# the time between two writes.
_verified: dict[Path, tuple[tuple[str, int, int, int], ...]] = {}
_SETTLED_NS = 5_000_000_000


def _stats(folder: Path, names: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for name in [MANIFEST, *names]:
        st = (folder / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def verify_manifest(folder: Path) -> None:
    """Raise `CorruptCheckpoint` naming the first file that is missing, has another size or
    another digest than `folder/manifest.json` records. Sizes are checked before any hashing,
    so a truncated file is found without reading the others. A folder this process verified
    before, none of whose files changed since, is not hashed again."""
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing (the save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable manifest ({e})") from None
    for name, size, _ in entries:
        f = folder / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing (listed in {MANIFEST}){pickle_note(f.parent)}")
        if f.stat().st_size != size:
            raise CorruptCheckpoint(
                f"{f}: corrupted ({f.stat().st_size} bytes; {MANIFEST} says {size})"
            )
    key = folder.resolve()
    stats = _stats(folder, [name for name, _, _ in entries])
    if _verified.get(key) == stats:
        return
    for name, _, digest in entries:
        if sha256_file(folder / name) != digest:
            raise CorruptCheckpoint(
                f"{folder / name}: corrupted (its SHA-256 differs from the one in {MANIFEST})"
            )
    if time.time_ns() - max(mtime for _, _, mtime, _ in stats) > _SETTLED_NS:
        _verified[key] = stats
