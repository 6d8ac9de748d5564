"""Reward hacking on the task world: a biased reward model, PPO without a KL penalty.

    lmforge run                                               # the default run, runs/world
    python experiments/reward_hacking.py --runs runs/world [--bias 1.0]

Reuses the SFT model and its sampled responses from the default run (sft/, sample/), then
writes into RUNS/hacking/:

    lmforge label --simulated responses.jsonl length_bias=B -> prefs_biased{,_val}.jsonl
    lmforge reward --model sft                              -> rm_biased/
    lmforge ppo --policy sft --reward rm_biased kl_coef=0   -> ppo_hacked/

The annotators prefer longer answers (length_bias: extra log-odds per 10 characters), so the
reward model learns "longer is better" beside correctness and style; with beta = 0 nothing
holds the policy near the SFT model, and it exploits the reward model's errors (padding its
answers, or others): the reward-model score rises while the gold reward falls. Writes
`experiments/results/reward_hacking.json` with the per-iteration series and the warnings the
PPO diagnostics printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str) -> None:
    print("$ lmforge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "world")
    ap.add_argument("--bias", type=float, default=1.0, help="annotators' length_bias")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "reward_hacking.json"
    )
    a = ap.parse_args()
    sft, sample = a.runs.resolve() / "sft", a.runs.resolve() / "sample"
    r = a.runs.resolve() / "hacking"
    r.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for sfx in ("", "_val"):
        prefs = r / f"prefs_biased{sfx}.jsonl"
        if not prefs.exists():
            lmforge("label", "--simulated", str(sample / f"responses{sfx}.jsonl"), "--out",
                    str(prefs), "noise=0.1", f"length_bias={a.bias}")  # fmt: skip
    rm = r / "rm_biased"
    if not rm.exists():
        val = r / "prefs_biased_val.jsonl"
        lmforge("reward", "--model", str(sft), "--data", str(r / "prefs_biased.jsonl"),
                f"val_data={val}", "--out", str(rm), "--quiet")  # fmt: skip
    ppo = r / "ppo_hacked"
    if not ppo.exists():
        lmforge("ppo", "--policy", str(sft), "--reward", str(rm), "--out", str(ppo), "kl_coef=0",
                f"train.max_steps={a.iterations}", "--quiet")  # fmt: skip
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in rows if "score" in r]
    evals = [r for r in rows if "val_gold" in r]
    warnings = sorted({w for r in rows for w in r.get("warnings", [])})
    half = len(iters) // 2

    def avg(part: list[dict], key: str) -> float:
        return sum(x[key] for x in part) / len(part)

    result = {
        "experiment": "reward_hacking",
        "length_bias": a.bias,
        "kl_coef": 0.0,
        "iterations": len(iters),
        "first_half": {k: avg(iters[:half], k) for k in ("score", "gold", "response_len", "kl")},
        "second_half": {k: avg(iters[half:], k) for k in ("score", "gold", "response_len", "kl")},
        "held_out": [
            {k: e[k] for k in ("step", "val_gold", "val_rm_score", "val_kl", "val_sample_len")}
            for e in evals
        ],
        "warnings": warnings,
        "series": [
            {k: x[k] for k in ("step", "score", "gold", "kl", "response_len")} for x in iters
        ],
        "wall_s": time.perf_counter() - t0,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("first_half", "second_half", "warnings")}, indent=1))


if __name__ == "__main__":
    main()
