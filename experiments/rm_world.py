"""Reward-model accuracy on full world pairs, as issue 5 states it, for one SFT trunk.

Each prompt of the world's train split gets four responses: the canonical answer and three
flawed ones (wrong, rambling, impolite; `world_tasks.FLAWS`), so every pair is either a
correctness or a style comparison. Simulated annotators with 10% noise label every pair
(`label_simulated`, Bradley-Terry on the gold reward), the val split is labelled the same way
and held out, and `lmforge reward` trains the reward model on the given SFT model's trunk.
Printed and saved: held-out pairwise accuracy, the noise-limited ceiling of those labels,
agreement with the gold reward, and the share of the world's test prompts (never in training)
where the correct answer outscores a wrong one.

    python experiments/rm_world.py --sft runs/world/sft --out runs/rm_world [KEY=VALUE ...]

Extra KEY=VALUE arguments go to `lmforge reward` (e.g. train.max_steps=1000). Results:
OUT/rm_world.json (and the reward stage's own folder OUT/rm).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.feedback.simulated import Annotator, ceiling, label_simulated

ROOT = Path(__file__).resolve().parents[1]


def response_records(split: str, seed: int) -> list[dict]:
    """One responses.jsonl record per prompt of `split`: the answer and its three flaws."""
    tasks = TaskConfig()
    world, rng = World.from_seed(tasks.seed), random.Random(f"rm_world:{split}:{seed}")
    records, seen = [], set()
    for i, ex in enumerate(make_splits(tasks)[split]):
        if ex.prompt in seen:  # train prompts may repeat; one record each
            continue
        seen.add(ex.prompt)
        flawed = [FLAWS[f](ex, rng, world) for f in ("wrong", "rambling", "impolite")]
        records.append(
            {
                "id": f"{split}-{i}",
                "messages": [{"role": "user", "content": ex.prompt}],
                "task": ex.task,
                "answer": ex.answer,
                "responses": [ex.answer, *flawed],
            }
        )
    return records


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def last(path: Path) -> dict:
    out: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            out |= json.loads(line)
    return out


KINDS = {1.75: "answer", 0.75: "wrong", 1.5: "rambling|impolite"}  # gold rewards of the four


def by_kind(rm_dir: Path, prefs_path: Path) -> dict[str, dict[str, float]]:
    """Per kind of pair (e.g. answer>wrong): how often the reward model orders it as the gold
    reward does, and as the annotator's label does."""
    import torch

    from lmforge.data.preference import read_preferences
    from lmforge.training.checkpoint import load_reward_model
    from lmforge.training.reward import render_pairs, score_pairs

    model, tok, _ = load_reward_model(rm_dir)
    pairs = render_pairs(tok, read_preferences(str(prefs_path)), model.cfg.max_seq_len)
    rc, rr = score_pairs(model, pairs, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]
    counts: dict[str, list[float]] = {}
    for i, gold in enumerate(pairs.gold):
        assert gold is not None
        hi, lo = max(gold), min(gold)
        key = f"{KINDS.get(hi, hi)}>{KINDS.get(lo, lo)}"
        margin = float(rc[i] - rr[i]) * (1 if gold[0] >= gold[1] else -1)
        c = counts.setdefault(key, [0, 0, 0])
        c[0] += 1
        c[1] += margin > 0
        c[2] += float(rc[i] > rr[i])
    return {
        k: {"pairs": n, "gold_order": g / n, "label_order": lab / n}
        for k, (n, g, lab) in counts.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="the SFT model folder (the trunk)")
    p.add_argument("--out", required=True, help="a new folder for this experiment")
    p.add_argument("--noise", type=float, default=0.1, help="annotator coin-flip share")
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)

    annotator = Annotator(noise=args.noise, seed=args.seed)
    counts = {}
    for split in ("train", "val"):
        prefs = label_simulated(response_records(split, args.seed), annotator)
        write_jsonl(out / f"{split}_prefs.jsonl", prefs)
        counts[split] = {"pairs": len(prefs), "ceiling": ceiling([r["p_chosen"] for r in prefs])}
        print(f"{split}: {len(prefs)} pairs, noise ceiling {counts[split]['ceiling']:.3f}")

    cmd = [
        sys.executable, "-m", "lmforge", "reward", "--model", args.sft,
        "--data", str(out / "train_prefs.jsonl"), f"val_data={out / 'val_prefs.jsonl'}",
        "--out", str(out / "rm"), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    rm = last(out / "rm" / "metrics.jsonl")
    result = {
        "sft": args.sft,
        "annotator": annotator.settings(),
        "pairs": counts,
        "reward_args": extra,
        "val_acc": rm.get("val_acc"),
        "val_ceiling": rm.get("val_ceiling", counts["val"]["ceiling"]),
        "gap_to_ceiling": counts["val"]["ceiling"] - rm.get("val_acc", float("nan")),
        "val_gold_agreement": rm.get("val_gold_agreement"),
        "test_correct_over_wrong": rm.get("test_correct_over_wrong"),
        "by_kind": by_kind(out / "rm", out / "val_prefs.jsonl"),
        "final_metrics": rm,
    }
    (out / "rm_world.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "final_metrics"}, indent=2))
    for kind, c in result["by_kind"].items():
        print(f"{kind:40s} {c['pairs']:5d} pairs: gold order {c['gold_order']:.3f}")


if __name__ == "__main__":
    main()
