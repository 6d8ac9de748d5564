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
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: its config and generation warnings are noise here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The Llama config and weight copy of a Decoder, for the Hugging Face peers (one mapping,
# checked by tests/models/test_llama_parity.py).
from lmforge.models.hf import llama_config  # noqa: E402, F401
from lmforge.models.hf import to_hf as llama_from_decoder  # noqa: E402, F401
from lmforge.objectives.lm import token_loss  # noqa: E402
from lmforge.runtime import autocast_dtype  # noqa: E402
from lmforge.training.loop import train_step  # noqa: E402
from lmforge.training.optim import OptimConfig, build_optimizer  # noqa: E402

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


WORLD_VOCAB = 2048  # task-world benchmarks: BPE vocab_size requested
WORLD_DOCS = 5000  # ... trained on this many world documents


def world_tokenizer(seed: int) -> Any:
    """The BPE tokenizer of the task-world benchmarks: `vocab_size` WORLD_VOCAB (the small
    corpus yields 1,959 entries) trained on `generate_corpus(WorldConfig(n_docs=WORLD_DOCS,
    seed=seed)).train`."""
    from lmforge.data.world import WorldConfig, generate_corpus
    from lmforge.tokenizers import train_tokenizer

    corpus = generate_corpus(WorldConfig(n_docs=WORLD_DOCS, seed=seed))
    return train_tokenizer("bpe", corpus.train, WORLD_VOCAB)


def n_params(model: torch.nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


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


# --- training throughput (train_throughput, encoder_throughput, encoder_decoder_throughput) ---

# One optimizer step: step(inputs, targets, i); inputs is whatever the model is called with.
Step = Callable[[Any, torch.Tensor, int], None]
COMPILED = "lmforge_compile"  # the variant whose first step is its compile


def throughput_args(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, Any]:
    """Adds the throughput flags to `p`, parses, applies `--quick`, runs `setup`, and points
    TorchInductor at a fresh cache unless `--keep-inductor-cache`. Returns the args and that
    cache's TemporaryDirectory (removed at exit; keep a reference to it)."""
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per repeat")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--keep-inductor-cache", action="store_true", help="warm torch.compile cache")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    args.warmup = max(args.warmup, 1)  # the first step of a compiled model is its compile
    setup(args.threads, args.seed)
    inductor_dir = tempfile.TemporaryDirectory(prefix="lmforge-bench-")  # removed at exit
    if not args.keep_inductor_cache:  # compile time as a first run on a machine pays it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir.name
    return args, inductor_dir


def lmforge_step(
    model: torch.nn.Module,
    compiled: bool,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_loss,
    optim: OptimConfig | None = None,
    dynamic: bool | None = None,
) -> Step:
    """A step as `lmforge.training.pretrain` runs it: `build_optimizer(model, OptimConfig())`,
    autocast dtype from `autocast_dtype("auto", cpu)`, `train_step(..., token_loss,
    grad_clip=1.0)`, with `forward=torch.compile(model, dynamic=dynamic)` when `compiled`.
    `loss_fn` and `optim` replace token_loss and OptimConfig() (other training stages)."""
    device = torch.device("cpu")
    model = model.to(device)
    optimizer = build_optimizer(model, optim or OptimConfig())
    dtype = autocast_dtype("auto", device)
    fwd = torch.compile(model, dynamic=dynamic) if compiled else model
    model.train()

    def step(inputs: Any, targets: torch.Tensor, i: int) -> None:
        train_step(
            model,
            optimizer,
            [(inputs, targets)],
            loss_fn,
            n_micro=1,
            device=device,
            dtype=dtype,
            grad_clip=1.0,
            step=i,
            forward=fwd,
        )

    return step


def time_variants(
    steps: dict[str, Step],
    batches: Sequence[tuple[Any, torch.Tensor]],
    args: argparse.Namespace,
    tokens_per_step: int,
) -> tuple[dict[str, list[list[float]]], float | None]:
    """Per repeat, each variant in turn (interleaved, so slow phases of a shared machine hit
    all): `args.warmup` untimed steps on batches 0.., then `args.steps` timed steps on the
    batches after them. Returns the timed step seconds per variant and repeat, and the wall
    time of the compiled variant's first step (its compile) or None."""
    times: dict[str, list[list[float]]] = {v: [] for v in steps}
    first_step_s = None
    for r in range(args.repeats):
        for v, step in steps.items():
            for i in range(args.warmup):
                inputs, targets = batches[i]
                t0 = time.perf_counter()
                step(inputs, targets, i)
                if r == 0 and i == 0 and v == COMPILED:
                    first_step_s = time.perf_counter() - t0
            rep = []
            for i in range(args.warmup, args.warmup + args.steps):
                inputs, targets = batches[i]
                t0 = time.perf_counter()
                step(inputs, targets, i)
                rep.append(time.perf_counter() - t0)
            times[v].append(rep)
            print(f"  repeat {r + 1} {v}: {tokens_per_step / median(rep):,.0f} tok/s", flush=True)
    return times, first_step_s


def per_token_metrics(
    tokens_per_step: int, flops_ours: float, flops_peer: float
) -> Callable[[str, float], dict[str, float]]:
    """`metrics` for `throughput_result` from training FLOPs per token, lmforge's and the
    peer's: tokens/s, FLOPs per token and MFU."""

    def metrics(v: str, med: float) -> dict[str, float]:
        flops = flops_ours if v.startswith("lmforge") else flops_peer
        tps = tokens_per_step / med
        return {"tokens_per_s": tps, "flops_per_token": flops, "mfu": tps * flops / CPU_PEAK_FLOPS}

    return metrics


def throughput_result(
    times: dict[str, list[list[float]]],
    first_step_s: float | None,
    metrics: Callable[[str, float], dict[str, Any]],
    target: float,
    **head: Any,
) -> dict[str, Any]:
    """One shape's result: `head` (shape, data settings), then per variant the raw and median
    step seconds followed by `metrics(variant, median step s)` (which holds tokens_per_s), the
    compile time (first compiled step minus a typical step) and lmforge best vs peer best."""
    out = {}
    for v, reps in times.items():
        med = median([t for rep in reps for t in rep])
        out[v] = {"step_s_raw": reps, "step_s_median": med, **metrics(v, med)}
    compile_s = None
    if first_step_s is not None:  # the first step's excess over a typical step
        compile_s = first_step_s - out[COMPILED]["step_s_median"]
    ours = max(out[v]["tokens_per_s"] for v in out if v.startswith("lmforge"))
    peer = max(out["hf_fp32"]["tokens_per_s"], out["hf_bf16"]["tokens_per_s"])
    return {
        **head,
        "lmforge_autocast": str(autocast_dtype("auto", torch.device("cpu"))),
        "compile_s": compile_s,
        "compile_first_step_s": first_step_s,
        "variants": out,
        "lmforge_best_tokens_per_s": ours,
        "peer_best_tokens_per_s": peer,
        "ratio": ours / peer,
        "target_ratio": target,
        "meets_target": ours / peer >= target,
    }


def write_throughput(
    name: str, args: argparse.Namespace, target: str, results: dict[str, Any]
) -> None:
    payload = {
        "benchmark": name,
        "quick": args.quick,
        "machine": machine_info(),
        "settings": vars(args),
        "target": target,
        "results": results,
    }
    write_json(result_path(name, args.quick), payload)


def throughput_rows(
    result: dict[str, Any], prefix: Sequence[Any] = (), extra: Sequence[str] = ()
) -> list[list[Any]]:
    """Table rows for one result: per variant `prefix`, name, tok/s, the `extra` variant
    fields, MFU, step s; then the best/best ratio and, if measured, the compile time."""
    pad = [""] * len(extra)
    rows = [
        [*prefix, v, o["tokens_per_s"], *(o[k] for k in extra)]
        + [f"{o['mfu']:.1%}", f"{o['step_s_median']:.4f}"]
        for v, o in result["variants"].items()
    ]
    ratio = f"{result['ratio']:.2f}x"
    rows.append([*prefix, "ratio best/best", ratio, *pad, f"target {result['target_ratio']}x", ""])
    if result["compile_s"] is not None:
        rows.append([*prefix, "compile time", f"{result['compile_s']:.1f} s", *pad, "", ""])
    return rows
