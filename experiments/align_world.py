"""The alignment experiment on the built-in task world, start to finish, with the CLI.

    python experiments/align_world.py --runs runs/align [--sft DIR]

Runs (each step skipped when its output exists, so an interrupted run continues):

    lmforge pretrain                      -> base/        (skipped with --sft)
    lmforge sft --model base              -> sft/
    lmforge sample --model sft            -> responses{,_val}.jsonl   (4 per prompt)
    lmforge label --simulated (10% noise) -> prefs{,_val}.jsonl
    lmforge reward --model sft            -> rm/
    lmforge ppo --policy sft --reward rm  -> ppo/
    lmforge dpo --policy sft --data prefs -> dpo/
    lmforge grpo --policy sft             -> grpo/        (the task checker as reward)
    lmforge best-of-n --policy sft --reward rm -> bon/
    lmforge eval --model M --reward rm --reference sft   for sft, ppo, dpo, grpo

and writes `experiments/results/align_world.json`: per model the held-out (test split) gold
reward of samples at temperature 1 (0-1), greedy exact match, reward-model score and KL to the
SFT model, plus each step's wall time. Every number comes from the stages' own metrics files.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str) -> float:
    """Run one CLI command; return its wall time."""
    t = time.perf_counter()
    print("$ lmforge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, cwd=ROOT)
    return time.perf_counter() - t


def last_row(path: Path) -> dict:
    row: dict = {}
    for line in path.read_text().splitlines():
        row.update(json.loads(line))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "align")
    ap.add_argument("--sft", type=Path, help="an existing SFT model (skips pretrain and sft)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "align.json")
    a = ap.parse_args()
    r = a.runs.resolve()
    r.mkdir(parents=True, exist_ok=True)
    sft = a.sft.resolve() if a.sft else r / "sft"
    rm, q = str(r / "rm"), "--quiet"
    prefs = ["--data", str(r / "prefs.jsonl"), f"val_data={r / 'prefs_val.jsonl'}"]
    sample = ["--n", "4", "sampling.max_new_tokens=32", q]
    models = {"sft": sft, "ppo": r / "ppo", "dpo": r / "dpo", "grpo": r / "grpo"}
    # (name, the output that marks it done, the command)
    steps: list[tuple[str, Path, list[str]]] = []
    if not a.sft:
        steps += [
            ("pretrain", r / "base/model.safetensors", ["pretrain", "--out", str(r / "base"), q]),
            ("sft", sft / "model.safetensors", ["sft", "--model", str(r / "base"),
                                                "--out", str(sft), q]),
        ]  # fmt: skip
    for split, sfx, limit in (("train", "", "1200"), ("val", "_val", "0")):
        responses, labelled = r / f"responses{sfx}.jsonl", r / f"prefs{sfx}.jsonl"
        steps += [
            (f"sample{sfx}", responses, ["sample", "--model", str(sft), "--out", str(responses),
                                         f"split={split}", f"limit={limit}", *sample]),
            (f"label{sfx}", labelled, ["label", "--simulated", str(responses), "--out",
                                       str(labelled), "noise=0.1"]),
        ]  # fmt: skip
    steps += [
        ("reward", r / "rm/model.safetensors", ["reward", "--model", str(sft), *prefs,
                                                "--out", rm, q]),
        ("ppo", r / "ppo/model.safetensors", ["ppo", "--policy", str(sft), "--reward", rm,
                                              "--out", str(r / "ppo"), q]),
        ("dpo", r / "dpo/model.safetensors", ["dpo", "--policy", str(sft), *prefs,
                                              "--out", str(r / "dpo"), q]),
        ("grpo", r / "grpo/model.safetensors", ["grpo", "--policy", str(sft),
                                                "--out", str(r / "grpo"), q]),
        ("best_of_n", r / "bon/metrics.jsonl", ["best-of-n", "--policy", str(sft), "--reward", rm,
                                                "--out", str(r / "bon")]),
    ]  # fmt: skip
    for name, model in models.items():
        ev = r / f"eval_{name}"
        steps.append((f"eval_{name}", ev / "metrics.jsonl", [
            "eval", "--model", str(model), "--reward", rm, "--reference", str(sft),
            "--out", str(ev), "samples=4", q]))  # fmt: skip

    times: dict[str, float] = {}
    for name, done, args in steps:
        if done.exists():
            print(f"skip {name}: {done} exists")
        else:
            times[name] = lmforge(*args)

    keys = ("gold", "em", "gold_greedy", "rm_score", "kl", "sample_em", "sample_stop_rate")
    table = {
        name: {k: last_row(r / f"eval_{name}/metrics.jsonl").get(k) for k in keys}
        for name in models
    }
    bon = last_row(r / "bon/metrics.jsonl")
    table["best_of_n"] = {k: bon.get(k) for k in ("gold", "rm_score", "kl", "sample_em")}
    rm_row = last_row(r / "rm/metrics.jsonl")
    result = {
        "experiment": "align_world",
        "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "runs": str(r),
        "reward_model": {
            k: rm_row.get(k) for k in ("val_acc", "val_ceiling", "val_gold_agreement")
        },
        "wall_s": times,
        "models": table,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':<10} {'gold':>6} {'em':>6} {'rm':>7} {'kl':>6}")
    for name, row in table.items():
        cells = [row.get(k) for k in ("gold", "em", "rm_score", "kl")]
        print(f"{name:<10} " + " ".join("     -" if v is None else f"{v:6.3f}" for v in cells))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
