"""`lmforge run`: the stage graph of a recipe, executed into one run folder.

    RUN/tokenizer  base  sft  sample  label  rm  ppo  dpo  grpo  best_of_n  eval/<model>
        report.md  report.html  plots/  recipe.json  stages.json

Every stage is a node with a key: the hash of its resolved config, the keys of the nodes whose
output it reads, and the contents of any user file it reads. `stages.json` records each node's
key and whether it finished. A rerun skips a finished node whose key is unchanged, continues
an interrupted training node from its last checkpoint (same key), and redoes anything else;
a changed upstream key changes every key below it, so edits propagate and nothing stale
survives. Nodes run in pipeline order, in this process, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmforge import config as C
from lmforge.data.corpora import load_corpus
from lmforge.errors import UserError
from lmforge.feedback.cai import (
    AILabelConfig,
    label_ai,
    label_summary,
    read_responses,
    record_examples,
)
from lmforge.feedback.judges import make_judge
from lmforge.feedback.sampling import file_prompts, sample_responses, world_prompts
from lmforge.feedback.simulated import Annotator, label_simulated
from lmforge.io import atomic_dir, atomic_write_json, atomic_write_jsonl
from lmforge.pipeline.recipe import FOLDERS, STAGES, Recipe
from lmforge.tokenizers import check_vocab_size
from lmforge.training.best_of_n import best_of_n
from lmforge.training.checkpoint import latest_state, load_model
from lmforge.training.dpo import dpo
from lmforge.training.evaluate import evaluate
from lmforge.training.grpo import grpo
from lmforge.training.ppo import ppo
from lmforge.training.pretrain import build_tokenizer, pretrain
from lmforge.training.reward import reward
from lmforge.training.sft import sft

STATE = "stages.json"
# Rough seconds per stage of a default world run on 2 CPU cores, for the ETA only; the
# estimate rescales them by how fast this machine has been so far.
WEIGHTS = {
    "tokenizer": 1, "pretrain": 215, "sft": 175, "sample": 45, "label": 1, "reward": 45,
    "ppo": 205, "dpo": 90, "grpo": 75, "best_of_n": 28, "eval": 25, "report": 2,
}  # fmt: skip
TRAINERS: dict[str, Callable[..., dict[str, Any]]] = {
    "pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo, "dpo": dpo, "grpo": grpo,
}  # fmt: skip
# Models the eval stage scores, by the stage that makes them.
EVALUATED = {"pretrain": "base", "sft": "sft", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}

Runner = Callable[[bool, bool], Any]  # (resume, progress) -> anything


@dataclass
class Node:
    name: str  # "sft", "eval:ppo"
    stage: str  # the recipe's stage name: "sft", "eval"
    out: Path
    deps: tuple[str, ...]
    config: dict[str, Any]  # what the key hashes (besides the deps' keys and input files)
    run: Runner
    resumable: bool = False  # a training stage that continues from its checkpoints


def plan(recipe: Recipe, run: Path) -> list[Node]:
    """The nodes of `recipe` for the run folder `run`, in the order they run."""
    nodes: list[Node] = []
    cfg, opts = recipe.configs, recipe.options

    def out(stage: str) -> Path:
        return run / FOLDERS[stage]

    def add(stage: str, config: dict[str, Any], go: Runner) -> None:
        nodes.append(Node(stage, stage, out(stage), recipe.deps.get(stage, ()), config, go))

    section: dict[str, Any]
    for stage in (s for s in STAGES if recipe.runs(s)):
        c: Any = cfg.get(stage)
        if stage == "tokenizer":
            if not c.tokenizer.path:  # a recipe's own tokenizer makes this stage moot
                section = {"data": C.to_dict(c.data), "tokenizer": C.to_dict(c.tokenizer)}
                add(stage, section, partial(_tokenizer, c, out(stage)))
        elif stage in TRAINERS:
            nodes.append(_train(stage, TRAINERS[stage], c, out(stage), recipe.deps[stage]))
        elif stage == "sample":
            model = out("sft") if recipe.runs("sft") else Path(opts.policy)
            section = {"sample": C.to_dict(c), "prompts": opts.prompts,
                       "val": opts.sample_val, "model": str(model)}  # fmt: skip
            add(stage, section, partial(_sample, recipe, model, out(stage)))
        elif stage == "label":
            add(stage, C.to_dict(c), partial(_label, c, out("sample"), out(stage)))
        elif stage == "best_of_n":
            add(stage, C.to_dict(c), partial(_best_of_n, c, out(stage)))
        elif stage == "eval":
            nodes += [_eval(recipe, m, run) for m in EVALUATED if recipe.runs(m)]
        elif stage == "report":
            from lmforge.pipeline.report import write_report

            # The report reads every other node's output.
            nodes.append(Node(stage, stage, out(stage), tuple(n.name for n in nodes),
                              {"conversations": opts.conversations},
                              lambda r, p: write_report(run, opts.conversations)))  # fmt: skip
    return nodes


def _train(stage: str, fn: Callable[..., dict[str, Any]], cfg: Any, out: Path,
           deps: tuple[str, ...]) -> Node:  # fmt: skip
    def go(resume: bool, progress: bool) -> dict[str, Any]:
        return fn(cfg, out, resume=resume, overwrite=not resume, progress=progress)

    config = C.to_dict(cfg)
    config["train"].pop("trackers", None)  # where metrics are mirrored changes no result
    return Node(stage, stage, out, deps, config, go, resumable=True)


def _eval(recipe: Recipe, model: str, run: Path) -> Node:
    """`lmforge eval` of one model: greedy exact match (few-shot for the base model); for chat
    models also sampled gold reward, the reward model's score and the KL to the SFT model."""
    chat = model != "pretrain"
    target = run / "eval" / EVALUATED[model]
    rm = run / FOLDERS["reward"] if chat and recipe.runs("reward") else None
    ref = run / FOLDERS["sft"] if chat and model != "sft" and recipe.runs("sft") else None
    deps = (model,) + (("reward",) if rm else ()) + (("sft",) if ref else ())
    cfg = recipe.configs["eval"]
    # The base model has no tasks of its own: score it on the ones the run fine-tunes on.
    tasks = recipe.configs["sft"].tasks if not chat and recipe.runs("sft") else None
    section = {"eval": C.to_dict(cfg), "reward": str(rm or ""), "reference": str(ref or ""),
               "tasks": C.to_dict(tasks) if tasks else None}  # fmt: skip

    def go(resume: bool, progress: bool) -> dict[str, Any]:
        return evaluate(run / FOLDERS[model], cfg, target, reward_model=rm, reference=ref,
                        tasks=tasks, progress=progress)  # fmt: skip

    return Node(f"eval:{EVALUATED[model]}", "eval", target, tuple(dict.fromkeys(deps)), section,
                go)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Stages that are not a training loop


def _write_stage(
    out: Path, row: dict[str, Any], files: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """A non-training stage's folder, whole or not at all: its JSONL files and a one-row
    metrics.jsonl."""
    with atomic_dir(out) as tmp:
        for name, records in files.items():
            atomic_write_jsonl(tmp / name, records)
        atomic_write_jsonl(tmp / "metrics.jsonl", [row])
    return row


def _tokenizer(pre: Any, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    """The tokenizer pretraining would train (from the same cache), saved as its own stage
    with its held-out compression."""
    check_vocab_size(pre.tokenizer.algo, pre.tokenizer.vocab_size)
    corpus = load_corpus(pre.data)
    t = time.perf_counter()
    tok = build_tokenizer(pre, corpus, None, progress)
    row = {
        "algo": pre.tokenizer.algo,
        "vocab_size": tok.vocab_size,
        "bytes_per_token_heldout": tok.bytes_per_token(corpus.val),
        "train_docs": len(corpus.train),
        "wall_s": time.perf_counter() - t,
    }
    with atomic_dir(out) as tmp:
        tok.save(tmp)
        atomic_write_jsonl(tmp / "metrics.jsonl", [row])
    return row


def _sample(
    recipe: Recipe, policy: Path, out: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    cfg, opts = recipe.configs["sample"], recipe.options
    world = opts.prompts == "world"
    prompts = world_prompts(cfg) if world else file_prompts(Path(opts.prompts), cfg.limit)
    model, tok, _ = load_model(policy)
    t = time.perf_counter()
    files = {"responses.jsonl": sample_responses(model, tok, prompts, cfg, str(policy),
                                                 progress=progress)}  # fmt: skip
    if world and opts.sample_val:
        val = replace(cfg, split="val", limit=0)
        files["responses_val.jsonl"] = sample_responses(
            model, tok, world_prompts(val), val, str(policy), progress=progress
        )
    wall = time.perf_counter() - t
    records = [r for recs in files.values() for r in recs]
    responses = [x for r in records for x in r["responses"]]
    stopped = [s for r in records for s in r["stopped"]]
    row = {
        "prompts": len(files["responses.jsonl"]),
        "val_prompts": len(files.get("responses_val.jsonl", [])),
        "responses": len(responses),
        "stop_rate": sum(stopped) / max(1, len(stopped)),
        "mean_chars": sum(map(len, responses)) / max(1, len(responses)),
        "tokens": sum(len(tok.encode(x, add_bos=False)) for x in responses),
        "wall_s": wall,
    }
    return _write_stage(out, row, files)


def _best_of_n(cfg: Any, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    return best_of_n(cfg, out, overwrite=True)


def _label(
    labeller: Annotator | AILabelConfig, sample: Path, out: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    inputs = {}
    for src, dst in (
        ("responses.jsonl", "prefs.jsonl"),
        ("responses_val.jsonl", "prefs_val.jsonl"),
    ):
        if (sample / src).exists():
            inputs[dst] = read_responses(sample / src)
    if isinstance(labeller, AILabelConfig):
        return _label_ai(labeller, inputs, out, progress)
    files = {dst: label_simulated(recs, labeller) for dst, recs in inputs.items()}
    pairs = [p for recs in files.values() for p in recs]
    decided = [p for p in pairs if p["gold_chosen"] != p["gold_rejected"]]
    row = {
        "pairs": len(files["prefs.jsonl"]),
        "val_pairs": len(files.get("prefs_val.jsonl", [])),
        # How often the annotator sided with the gold reward, where it decides the pair.
        "gold_agreement": sum(p["gold_chosen"] > p["gold_rejected"] for p in decided)
        / max(1, len(decided)),
        "ceiling": sum(max(p["p_chosen"], 1 - p["p_chosen"]) for p in pairs) / max(1, len(pairs)),
        "annotator": C.to_dict(labeller),
    }
    return _write_stage(out, row, files)


def _label_ai(
    cfg: AILabelConfig, inputs: dict[str, list[dict[str, Any]]], out: Path, progress: bool
) -> dict[str, Any]:
    """RLAIF labels in place of the simulated annotators, with how they agree with the gold
    reward and with the simulated annotators on the same pairs (the report compares them)."""
    every = [rec for recs in inputs.values() for rec in recs]
    judge, constitution = make_judge(cfg.judge, record_examples(every), load_model)
    files = {
        dst: label_ai(recs, judge, cfg, constitution, progress) for dst, recs in inputs.items()
    }
    pairs = [p for recs in files.values() for p in recs]
    row = {
        **label_summary(pairs),
        "pairs": len(files["prefs.jsonl"]),
        "val_pairs": len(files.get("prefs_val.jsonl", [])),
        "ceiling": sum(p["label"] for p in pairs) / max(1, len(pairs)),  # labels are >= 0.5
        "source": "ai",
        "judge": C.to_dict(cfg),
    }
    return _write_stage(out, row, files)


# ---------------------------------------------------------------------------------------------
# Keys and state


def file_digests(config: Any, run: Path) -> dict[str, str]:
    """Content hashes of the user files a config names (run-folder files are covered by the
    producing node's key). Folders hash their listing: names, sizes and modification times."""
    found: dict[str, str] = {}

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and len(v) < 4096 and v not in found:
            p = Path(v)
            try:
                if not p.exists() or p.resolve().is_relative_to(run.resolve()):
                    return
            except OSError:
                return
            found[v] = _digest(p)

    walk(config)
    return found


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for child in sorted(p.rglob("*")):
            if child.is_file():
                st = child.stat()
                h.update(f"{child.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def node_key(node: Node, keys: dict[str, str], run: Path) -> str:
    blob = {
        "node": node.name,
        "config": node.config,
        "deps": {d: keys[d] for d in node.deps if d in keys},
        "files": file_digests(node.config, run),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def read_state(run: Path) -> dict[str, Any]:
    p = run / STATE
    return json.loads(p.read_text()) if p.is_file() else {"nodes": {}}


# ---------------------------------------------------------------------------------------------
# Running


def check_run_folder(run: Path, overwrite: bool) -> None:
    """A run folder is new, empty, or one of ours (has stages.json)."""
    if run.exists() and not run.is_dir():
        raise UserError(f"{run}: exists and is not a folder")
    if run.is_dir() and any(run.iterdir()) and not (run / STATE).is_file():
        if not overwrite:
            raise UserError(f"{run}: exists and is not an lmforge run folder; choose another --out "
                            "or pass --overwrite to replace it")  # fmt: skip
        shutil.rmtree(run)


def run_pipeline(
    recipe: Recipe,
    *,
    only: str | None = None,
    start: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) `recipe` in its run folder; return the state record of every node."""
    run = recipe.run
    for flag, stage in (("--only", only), ("--from", start)):
        if stage is not None and stage not in recipe.options.stages:
            raise UserError(f"{flag} {stage}: not a stage of this recipe "
                            f"({', '.join(recipe.options.stages)})")  # fmt: skip
    check_run_folder(run, overwrite)
    nodes = plan(recipe, run)  # validates the recipe's wiring before anything is written
    run.mkdir(parents=True, exist_ok=True)
    state = read_state(run)
    records: dict[str, Any] = state["nodes"]
    atomic_write_json(run / "recipe.json", recipe.resolved())
    forced = set(STAGES[STAGES.index(start) :]) if start else set()

    keys: dict[str, str] = {}
    todo: list[tuple[Node, bool]] = []  # (node, resume)
    for node in nodes:
        keys[node.name] = key = node_key(node, keys, run)
        rec = records.get(node.name, {})
        same = rec.get("key") == key and node.stage not in forced
        done = same and rec.get("status") == "done" and node.out.exists()
        if only is not None and node.stage != only:
            if not done and node.name in _upstream(nodes, only):
                raise UserError(f"--only {only}: stage {node.stage} has not run with this recipe "
                                "(or its config changed); run without --only first")  # fmt: skip
            continue
        if done and node.stage != "report":
            continue
        resume = same and node.resumable and latest_state(node.out) is not None
        todo.append((node, resume))

    skipped = len(nodes) - len(todo)
    if skipped and only is None:
        print(f"{run}: {skipped} stage(s) up to date, skipped", flush=True)
    total = sum(_weight(n) for n, _ in todo) or 1.0
    began, spent = time.perf_counter(), 0.0
    for i, (node, resume) in enumerate(todo, start=1):
        elapsed = time.perf_counter() - began
        # Typical stage times, rescaled by this run's pace so far (trusted more as it grows).
        pace = (elapsed + 60) / (spent + 60)
        eta = f"about {_clock((total - spent) * pace)} left"
        verb = "continuing" if resume else "running"
        print(f"== [{i}/{len(todo)}] {verb} {node.name} -> {node.out}   "
              f"(elapsed {_clock(elapsed)}, {eta})", flush=True)  # fmt: skip
        if not resume:
            _clear(node.out)
        records[node.name] = {"key": keys[node.name], "status": "running"}
        atomic_write_json(run / STATE, state)
        t = time.perf_counter()
        node.run(resume, progress)
        records[node.name] = {"key": keys[node.name], "status": "done",
                              "wall_s": round(time.perf_counter() - t, 2)}  # fmt: skip
        atomic_write_json(run / STATE, state)
        spent += _weight(node)
    return records


def _upstream(nodes: list[Node], stage: str) -> set[str]:
    by_name = {n.name: n for n in nodes}
    seen: set[str] = set()
    stack = [d for n in nodes if n.stage == stage for d in n.deps]
    while stack:
        d = stack.pop()
        if d not in seen and d in by_name:
            seen.add(d)
            stack.extend(by_name[d].deps)
    return seen


def _weight(node: Node) -> float:
    return float(WEIGHTS.get(node.stage, 10))


def _clear(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def machine() -> dict[str, Any]:
    """The machine and versions, for the report."""
    import lmforge

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lmforge": getattr(lmforge, "__version__", "?"),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv[1:],
    }
