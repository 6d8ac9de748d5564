"""SFT learns the world's tasks, stops at end-of-turn, resumes exactly, and refuses bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.cli import main
from lmforge.evaluation.tasks import EvalConfig
from lmforge.training.evaluate import evaluate
from lmforge.training.metrics import read_metrics
from lmforge.training.pretrain import PretrainConfig, pretrain
from lmforge.training.sft import SFTConfig, sft
from tests.conftest import (
    TINY_PRETRAIN,
    TINY_SFT,
    lmforge_cmd,
    resume_to_end,
    run_to_end,
    sigkill_at_checkpoint,
)


def sft_config(base: Path, *overrides: str) -> SFTConfig:
    return C.load(SFTConfig, None, [f"model={base}", *TINY_SFT, *overrides])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def base(sft_base: Path) -> Path:
    return sft_base


@pytest.fixture(scope="module")
def tuned(sft_tuned: Path) -> Path:
    return sft_tuned


def test_sft_raises_exact_match_far_above_few_shot_base_and_stops(base: Path, tuned: Path) -> None:
    cfg = EvalConfig(limit=20)
    before = evaluate(base, cfg, base.parent / "eval_base", progress=False)
    after = evaluate(tuned, cfg, base.parent / "eval_sft", progress=False)
    assert before["mode"] == "3-shot" and after["mode"] == "chat"
    assert after["n_prompts"] == before["n_prompts"] == 120
    # A 2-layer model after 600 steps: ~0.18 mean exact match against 0.0 few-shot. The default
    # world run (4 layers, 1000 SFT steps) reaches ~0.6; see the README.
    assert after["em"] >= before["em"] + 0.12, (before["em"], after["em"])
    tasks = [k for k in after if k.startswith("em/")]
    assert len(tasks) == 6
    assert sum(after[k] > before[k] for k in tasks) >= 4, after  # not one easy task alone
    assert after["stop_rate"] >= 0.95, after["stop_rate"]
    rows = read_metrics(tuned / "metrics.jsonl")
    first = next(r["loss"] for r in rows if "loss" in r)
    assert rows[-1]["loss"] < 0.5 * first
    answers = [json.loads(x) for x in (base.parent / "eval_sft" / "answers.jsonl").open()]
    assert len(answers) == 120 and sum(a["correct"] for a in answers) == round(after["em"] * 120)


def test_padded_layout_trains_the_same_examples(base: Path, tmp_path: Path) -> None:
    last = sft(sft_config(base, "layout=padded"), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["layout"] == "padded"
    assert last["loss"] < rows[1]["loss"]
    assert 0 < last["padding"] < 1


def test_sigkill_then_resume_reproduces_losses(base: Path, tmp_path: Path) -> None:
    args = [f"--model={base}", *TINY_SFT, "train.max_steps=30", "train.ckpt_every=5"]
    ref, out, cmd = tmp_path / "ref", tmp_path / "killed", lmforge_cmd("sft")
    run_to_end(cmd, ref, args)
    sigkill_at_checkpoint(cmd, out, args, 10)
    assert max(losses(out)) < 30, "the run finished before SIGKILL; nothing was tested"
    resume_to_end(cmd, out)
    assert losses(out) == losses(ref)  # exact float equality, every step
    assert sorted(losses(out)) == list(range(1, 31))


def test_encoder_decoder_is_fine_tuned_flan_style(tmp_path: Path) -> None:
    base = tmp_path / "base"
    pretrain(
        C.load(
            PretrainConfig,
            None,
            [
                *TINY_PRETRAIN,
                "arch=encoder-decoder",
                "model.max_seq_len=160",
                "train.block_size=64",
            ],
        ),
        base,
        progress=False,
    )
    last = sft(sft_config(base, "train.max_steps=30"), tmp_path / "sft", progress=False)
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert rows[0]["layout"] == "seq2seq"
    first = next(r["loss"] for r in rows if "loss" in r)
    assert last["loss"] < 0.85 * first
    row = evaluate(tmp_path / "sft", EvalConfig(limit=2), tmp_path / "eval", progress=False)
    assert row["mode"] == "chat" and row["n_prompts"] == 12


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"instruction": "Say hi.", "output": "hi"}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"question": "x", "answer": "y"}, "fits no instruction format"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role': unknown role 'bot'"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "field 'messages': conversation ends with a user turn",
        ),
        ({"instruction": "Say hi.", "output": "  "}, "field 'output': empty response"),
    ],
)
def test_bad_instruction_data_is_one_line_and_exit_2(
    base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad: dict[str, object],
    expected: str,
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["sft", "--quiet", "--model", str(base), "--data", str(data), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "data.jsonl:3: " in err and expected in err, err
    assert not out.exists()


def test_user_instruction_files_train(base: Path, tmp_path: Path) -> None:
    alpaca = [
        {"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)
    ]
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Double {i}."},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(40)
    ]
    a = write_jsonl(tmp_path / "a.jsonl", alpaca)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(chat, indent=2))
    out = tmp_path / "run"
    cfg = sft_config(base, f"data={a},{b}", "train.max_steps=15")
    last = sft(cfg, out, progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["n_train"] + rows[0]["n_val"] == 80
    assert "val_em" not in last and last["val_loss"] > 0
    assert last["loss"] < next(r["loss"] for r in rows if "loss" in r)


def test_chat_cli_streams_replies_and_resets(
    tuned: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = iter(["What is 2 plus 2?", "/reset", "Reverse the word cat.", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tuned), "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "(conversation cleared)" in out


def test_eval_cli_prints_a_table_and_writes_metrics(
    tuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tuned), "--out", str(out), "--quiet", "limit=2"]) == 0
    text = capsys.readouterr().out
    assert "story_qa" in text and "stop rate" in text
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["n_prompts"] == 12 and 0 <= row["em"] <= 1
    # An existing folder that is not an eval folder is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tuned), "--out", str(tmp_path / "mine"), "--quiet"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
