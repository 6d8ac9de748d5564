"""`lmforge run` end to end on the seconds-scale smoke recipe: every artefact, a report whose
numbers are the metrics files' numbers, reruns that skip what is unchanged, and a run killed
mid-stage that continues to the same report as an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.pipeline.report import fmt
from lmforge.training.metrics import read_metrics
from lmforge.training.rundir import final_row
from tests.conftest import fails

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "recipes" / "smoke.toml"
MODELS = ("sft", "ppo", "dpo", "grpo")
# fp32 everywhere: the "auto" choice of autocast dtype is timed per process, and two runs that
# chose differently could not be compared number for number.
FP32 = [f"{s}.train.dtype=float32" for s in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")]


def lmforge_run(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge",
            "run",
            str(SMOKE),
            "--out",
            str(out),
            "--quiet",
            *FP32,
            *args,
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Every table of a Markdown report, as rows of {column: cell}, keyed by its heading."""
    found: dict[str, list[dict[str, str]]] = {}
    heading = ""
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            heading = lines[i][3:]
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                cells = [
                    re.sub(r"\\(.)", r"\1", c.strip()) for c in lines[i].strip("|").split(" | ")
                ]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            found[heading] = rows
            continue
        i += 1
    return found


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "full"
    log = finish(lmforge_run(out))
    assert log.count("== [") == 16, log  # 11 stages, 5 of them evals
    # The run ends by printing the report's summary table.
    summary = (out / "report.md").read_text().split("## Summary\n")[1].split("\n## ")[0]
    assert summary.strip() in log and "| PPO |" in log, log
    return out


def test_every_artefact_is_written(full: Path) -> None:
    for path in (
        "tokenizer/tokenizer.json", "base/model.safetensors", "sft/model.safetensors",
        "sample/responses.jsonl", "sample/responses_val.jsonl", "label/prefs.jsonl",
        "label/prefs_val.jsonl", "rm/model.safetensors", "ppo/model.safetensors",
        "dpo/model.safetensors", "grpo/model.safetensors", "best_of_n/metrics.jsonl",
        "report.md", "report.html", "recipe.json", "stages.json",
    ):  # fmt: skip
        assert (full / path).is_file(), path
    for m in ("base", *MODELS):
        assert (full / "eval" / m / "metrics.jsonl").is_file()
        assert (full / "eval" / m / "answers.jsonl").is_file()
    plots = sorted(p.name for p in (full / "plots").iterdir())
    assert plots == [
        "dpo_loss.png", "grpo_curves.png", "ppo_curves.png", "pretrain_loss.png",
        "reward_calibration.png", "reward_loss.png", "sft_loss.png",
    ]  # fmt: skip
    for p in (full / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{p.name}" in (full / "report.md").read_text()
    html = (full / "report.html").read_text()
    assert "<table>" in html and "Content-Security-Policy" in html and "<script" not in html


def test_report_numbers_are_the_metrics_files_numbers(full: Path) -> None:
    t = tables((full / "report.md").read_text())
    assert {"Summary", "Tokenizer", "Pretraining", "Preferences and reward model",
            "Time and tokens", "Machine"} <= set(t)  # fmt: skip
    tok = final_row(full / "tokenizer")
    assert t["Tokenizer"][0]["bytes per token (held-out)"] == fmt(tok["bytes_per_token_heldout"])
    base = final_row(full / "base")
    row = t["Pretraining"][0]
    assert row["val loss"] == fmt(base["val_loss"])
    assert row["unigram val loss"] == fmt(base["unigram_val_loss"])
    assert row["val bits/byte"] == fmt(base["val_bpb"])
    assert row["tokens"] == fmt(base["tokens"])
    sft_t = t["Supervised fine-tuning"]
    ev_sft, ev_base = final_row(full / "eval/sft"), final_row(full / "eval/base")
    for r in sft_t:
        key = "em" if r["task"] == "all" else f"em/{r['task']}"
        assert (r["SFT"], r["base (3-shot)"]) == (fmt(ev_sft[key]), fmt(ev_base[key]))
    assert len(sft_t) == 4  # the recipe's three tasks and the total, for both models
    rm = final_row(full / "rm")
    row = t["Preferences and reward model"][0]
    assert row["RM val accuracy"] == fmt(rm["val_acc"])
    assert row["noise ceiling"] == fmt(rm["val_ceiling"])
    assert row["RM agrees with gold"] == fmt(rm["val_gold_agreement"])
    assert row["train pairs"] == fmt(len(read_metrics(full / "label/prefs.jsonl")))
    align = {r["model"]: r for r in next(v for k, v in t.items() if k.startswith("Alignment"))}
    assert list(align) == ["SFT", "best-of-n", "PPO", "DPO", "GRPO"]
    for m, label in (("sft", "SFT"), ("ppo", "PPO"), ("dpo", "DPO"), ("grpo", "GRPO")):
        ev = final_row(full / "eval" / m)
        r = align[label]
        assert (r["gold"], r["EM"], r["RM"]) == (
            fmt(ev["gold"]),
            fmt(ev["em"]),
            fmt(ev["rm_score"]),
        )
        assert r["KL to SFT"] == fmt(ev.get("kl", 0.0))
    bon = final_row(full / "best_of_n")
    assert (align["best-of-n"]["gold"], align["best-of-n"]["KL to SFT"]) == (
        fmt(bon["gold"]),
        fmt(bon["kl"]),
    )
    summary = {r["stage"]: r for r in t["Summary"]}
    assert summary["PPO"]["value"] == fmt(final_row(full / "eval/ppo")["gold"])
    assert summary["PPO"]["better"] == fmt(final_row(full / "eval/ppo")["gold"] > ev_sft["gold"])
    times = {r["stage"]: r for r in t["Time and tokens"]}
    assert list(times)[:3] == ["tokenizer", "pretrain", "sft"]  # pipeline order
    assert len(times) == 15  # every node but the report itself


def test_rerun_skips_what_is_unchanged(full: Path) -> None:
    weights = {m: (full / m / "model.safetensors").stat().st_mtime_ns for m in ("base", "sft")}
    log = finish(lmforge_run(full))
    assert "running report" in log and log.count("== [") == 1, log  # only the report is rebuilt
    # A changed option reruns that stage and what reads it, nothing else.
    log = finish(lmforge_run(full, "dpo.beta=0.2"))
    ran = re.findall(r"running (\S+) ->", log)
    assert ran == ["dpo", "eval:dpo", "report"], log
    assert weights == {m: (full / m / "model.safetensors").stat().st_mtime_ns for m in weights}
    log = finish(lmforge_run(full, "dpo.beta=0.2", "--from", "best_of_n"))
    assert re.findall(r"running (\S+) ->", log)[:2] == ["best_of_n", "eval:base"], log
    # Back to the recipe as it was: DPO reruns with beta 0.1 (to the same numbers, as the
    # killed-run test below relies on).
    log = finish(lmforge_run(full))
    assert re.findall(r"running (\S+) ->", log) == ["dpo", "eval:dpo", "report"], log


def test_killed_run_continues_to_the_same_report(full: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = lmforge_run(out)
    # Kill it once pretraining has written its first checkpoint, mid-stage.
    deadline = time.time() + 300
    while not list((out / "base" / "state").glob("step_*")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    states = sorted(p.name for p in (out / "base" / "state").glob("step_*"))
    assert states[-1] != "step_00000150", "killed too late: pretraining had finished"
    assert json.loads((out / "stages.json").read_text())["nodes"]["pretrain"]["status"] == "running"
    log = finish(lmforge_run(out))
    assert "running tokenizer" not in log and "continuing pretrain" in log, log

    def comparable(run: Path) -> dict:
        t = tables((run / "report.md").read_text())
        del t["Time and tokens"], t["Machine"]
        for r in t["Pretraining"]:
            del r["tokens/s"]  # throughput differs run to run; everything else must not
        return t

    assert comparable(out) == comparable(full)


def test_report_rebuilds_from_the_files(full: Path, capsys: pytest.CaptureFixture) -> None:
    before = tables((full / "report.md").read_text())
    (full / "report.md").unlink()
    assert main(["report", str(full)]) == 0
    after = tables((full / "report.md").read_text())
    del before["Machine"], after["Machine"]
    assert after == before
    # A stage folder is not a run folder.
    assert "not an lmforge run folder" in fails(capsys, "report", str(full / "base"))


def test_from_hf_recipe_runs_post_training_from_a_hugging_face_folder(tmp_path: Path) -> None:
    """recipes/from_hf.toml, cut down: SFT, sampling, labels, reward model, DPO, evals and the
    report, all from a tiny local Qwen2 folder with its own tokenizer and chat template."""
    pytest.importorskip("transformers")
    from tests.models.test_hf_import import make_hf_dir

    hf = make_hf_dir(tmp_path / "hf", "qwen2")
    out = tmp_path / "run"
    stages = "stages=sft,sample,label,reward,dpo,eval,report"
    argv = ["run", str(ROOT / "recipes" / "from_hf.toml"), "--out", str(out), "--quiet",
            f"sft.model={hf}", stages, "sft.train.max_steps=10", "sample.limit=12"]  # fmt: skip
    assert main(argv) == 0
    for folder in ("sft", "rm", "dpo", "eval/sft", "eval/dpo"):
        assert (out / folder / "metrics.jsonl").is_file(), folder
    meta = json.loads((out / "sft" / "tokenizer" / "tokenizer_meta.json").read_text())
    assert meta["algo"] == "hf" and meta["special_tokens"]["end_of_turn"] == "<|im_end|>"
    report = (out / "report.md").read_text()
    dpo_gold = final_row(out / "eval" / "dpo")["gold"]
    assert f"| DPO | gold reward of samples, test prompts (0-1) | {fmt(dpo_gold)} |" in report
