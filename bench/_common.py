"""Helpers the benchmark scripts share: setup, timing statistics, machine info, JSON results.

Not part of the lmforge package: benchmarks are scripts run from the repository root
(`python bench/<name>.py`), and this module is imported from next to them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import warnings
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: its config and generation warnings are noise here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CPU_PEAK_FLOPS = 900e9  # bf16 matmul peak of 2 threads on the reference machine (MFU only)


def base_parser(doc: str | None, default_repeats: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--repeats", type=int, default=default_repeats, help="timed repeats")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(threads: int, seed: int) -> None:
    """Threads, seed, and silence for the peers' warnings."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    warnings.filterwarnings("ignore", module=r"transformers(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()


def hf_gpt2(*, vocab: int, context: int, n_layer: int, n_head: int, n_embd: int) -> Any:
    """The peer model: a randomly initialised `transformers.GPT2LMHeadModel`, dropout 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 lies outside these small vocabularies
        eos_token_id=None,
    )
    return GPT2LMHeadModel(cfg)


def peer_adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW for the peers, with the fused CPU kernel where this torch build has one."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine_info() -> dict[str, Any]:
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def result_path(name: str, quick: bool) -> Path:
    """Quick (smoke) runs go to `<name>_quick.json`, which git ignores."""
    return RESULTS / f"{name}{'_quick' if quick else ''}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(REPO)}")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [headers] + [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
