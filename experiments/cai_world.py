"""RLAIF against simulated human labels on the task world, one run each, same upstream stages.

Runs a recipe with simulated annotators, keeps its label/reward/alignment results, then reruns
the same folder with AI feedback (`feedback=ai`: the rule-based judge under the world
constitution; for world.toml, `recipes/world_cai.toml`): the tokenizer, base, SFT and sampled
responses are reused (unchanged keys), the label stage and everything after it are redone.
Prints the label agreement with the gold reward, reward-model accuracy, and the gold reward of
SFT, PPO and DPO samples for both.

    python experiments/cai_world.py --out runs/cai_exp                      # the world recipe
    python experiments/cai_world.py --recipe recipes/smoke.toml --out runs/cai_smoke KEY=VALUE ...

Extra KEY=VALUE arguments go to both runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Only what the comparison needs: no GRPO and best-of-n.
STAGES = "stages=tokenizer,pretrain,sft,sample,label,reward,ppo,dpo,eval,report"


def run(recipe: Path, out: Path, extra: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "run",
        str(recipe),
        "--out",
        str(out),
        "--quiet",
        STAGES,
        *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)


def last(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict = {}
    for row in rows:
        out |= row
    return out


def summary(run_dir: Path) -> dict:
    label, rm = last(run_dir / "label/metrics.jsonl"), last(run_dir / "rm/metrics.jsonl")
    row = {
        "labels agree with gold": label.get("gold_agreement"),
        "RM val accuracy": rm.get("val_acc"),
        "RM agrees with gold": rm.get("val_gold_agreement"),
    }
    for m in ("sft", "ppo", "dpo"):
        row[f"{m} gold"] = last(run_dir / f"eval/{m}/metrics.jsonl").get("gold")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cai_exp"))
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "world.toml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    keep = args.out.with_name(args.out.name + "_simulated")
    run(args.recipe, args.out, args.overrides)
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(args.out, keep)  # the simulated run's results, before the AI run replaces them
    if args.recipe.name == "world.toml":  # its [label] holds annotator options
        run(args.recipe.with_name("world_cai.toml"), args.out, args.overrides)
    else:
        run(args.recipe, args.out, [*args.overrides, "feedback=ai"])
    rows = {"simulated": summary(keep), "ai (rules)": summary(args.out)}
    ai_label = last(args.out / "label/metrics.jsonl")
    print(json.dumps(rows, indent=2))
    print(
        json.dumps(
            {
                k: ai_label.get(k)
                for k in (
                    "gold_agreement",
                    "annotator_gold_agreement",
                    "annotator_agreement",
                    "mean_label",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
