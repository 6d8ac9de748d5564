"""Metrics: one JSON object per line in `metrics.jsonl`, plus FLOP and MFU estimates.

The report and the tests read these files; trainers only append to them. On resume the file
is cut back to the checkpoint's step so that a killed run leaves no duplicate or orphan rows.
Each row is also mirrored to the dashboards named in `train.trackers` (see trackers.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from lmforge import distributed
from lmforge.io import atomic_write_jsonl
from lmforge.models.transformer import TransformerConfig
from lmforge.training.trackers import Tracker, open_trackers

# Peak bf16 matmul throughput of a 2-thread CPU of the reference machine type (measured with
# torch 2.13: ~900 GFLOP/s). Used only as the MFU denominator on CPU.
CPU_BF16_PEAK_FLOPS = 900e9


class MetricsWriter:
    """Appends rows to `path` and mirrors each to the run's optional `trackers`."""

    def __init__(
        self, path: Path, resume_step: int | None = None, trackers: Sequence[Tracker] = ()
    ):
        self.path = path
        self.trackers = list(trackers)
        if resume_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            atomic_write_jsonl(path, kept)
        self._f: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        for tracker in self.trackers:
            tracker.log(row, row["step"])

    def close(self) -> None:
        self._f.close()
        for tracker in self.trackers:
            tracker.close()


def open_metrics(
    out: Path, resume_step: int | None, trackers: Sequence[str], config: dict[str, Any]
) -> MetricsWriter:
    """The run's metrics.jsonl, mirrored to the trackers named in `train.trackers`; `config`
    is the run_config.json the trackers record. Under torchrun only rank 0 writes them; the
    others log into the void (their rows are the same: logged numbers are reduced over ranks)."""
    if not distributed.is_main():
        return MetricsWriter(Path(os.devnull))
    opened = open_trackers(trackers, out, config, resume_step)
    return MetricsWriter(out / "metrics.jsonl", resume_step, opened)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file; a torn last line from a crash is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def decoder_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul parameters + attention (Kaplan et al., 2020;
    PaLM appendix B). Embedding lookups are free; the LM head is a matmul and counts."""
    D, L = cfg.n_embd, cfg.n_layer
    attn = D * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size + D * D
    mlp = 3 * D * cfg.ff_width
    n_matmul = L * (attn + mlp) + D * cfg.vocab_size
    return 6 * n_matmul + 12 * L * D * seq_len
