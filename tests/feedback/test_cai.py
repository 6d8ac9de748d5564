"""Constitutional AI: constitutions, the rule-based and LM judges, SL-CAI revisions and RLAIF
labels with position-swap debiasing, and their commands."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.cli import main
from lmforge.data.instruction import parse_record
from lmforge.data.preference import read_preferences
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, TaskExample, make_splits
from lmforge.errors import UserError
from lmforge.feedback.cai import AILabelConfig, debiased, label_ai, label_summary, revise_records
from lmforge.feedback.constitution import load_constitution, parse_constitution
from lmforge.feedback.judges import NO_FLAW, JudgeConfig, LMJudge, RuleJudge, make_judge
from lmforge.feedback.simulated import GOLD_MAX, gold_reward
from lmforge.objectives.reward import bradley_terry_loss
from tests.conftest import fails

WORLD = load_constitution("world")
PRINCIPLE = {p.rule: p for p in WORLD.principles}


def flawed_records(per_task: int = 4) -> list[dict[str, Any]]:
    """responses.jsonl records of world test prompts: the right answer and each flaw."""
    cfg = TaskConfig(n_train=0, n_val=0, n_test=per_task, n_rl=0)
    world, rng = World.from_seed(0), random.Random(0)
    records = []
    for i, ex in enumerate(make_splits(cfg)["test"]):
        responses = [
            ex.answer,
            *(FLAWS[f](ex, rng, world) for f in ("wrong", "rambling", "impolite")),
        ]
        records.append({"id": f"t{i}", "messages": [{"role": "user", "content": ex.prompt}],
                        "responses": responses, "stopped": [True] * 4,
                        "task": ex.task, "answer": ex.answer})  # fmt: skip
    return records


def examples(records: list[dict[str, Any]]) -> list[TaskExample]:
    return [TaskExample(r["task"], r["messages"][0]["content"], r["answer"]) for r in records]


def test_shipped_constitutions_load_and_cover_the_world_checks() -> None:
    chat = load_constitution("chat")
    assert {p.rule for p in WORLD.principles} == {"correct", "grounded", "concise", "polite"}
    assert WORLD.examples and chat.examples and chat.comparison
    assert all(p.rule == "" for p in chat.principles)  # meant for an LM judge


def test_rule_judge_names_each_flaw_and_its_revision_fixes_it() -> None:
    records = flawed_records(2)
    judge = RuleJudge(JudgeConfig(), examples(records))
    names = {"wrong": "correct", "rambling": "concise", "impolite": "polite"}
    for rec in records:
        prompt, answer = rec["messages"][0]["content"], rec["answer"]
        ex = TaskExample(rec["task"], prompt, answer)
        good, *flawed = rec["responses"]
        for rule in PRINCIPLE:
            assert judge.critique(prompt, good, PRINCIPLE[rule]) == NO_FLAW
        for flaw, response in zip(names, flawed, strict=True):
            principle = PRINCIPLE[names[flaw]]
            critique = judge.critique(prompt, response, principle)
            assert critique != NO_FLAW, (flaw, response)
            revised = judge.revise(prompt, response, critique, principle)
            assert gold_reward(ex, revised) == GOLD_MAX, (flaw, response, revised)
            other = PRINCIPLE["polite" if flaw != "impolite" else "correct"]
            assert judge.critique(prompt, response, other) == NO_FLAW  # only its own flaw
        story_wrong = flawed[0] if rec["task"] == "story_qa" else None
        if story_wrong is not None:
            assert "story" in judge.critique(prompt, story_wrong, PRINCIPLE["grounded"])
    with pytest.raises(UserError, match="world prompts only"):
        judge.critique("Write a poem.", "No.", PRINCIPLE["correct"])


def test_sl_cai_revisions_score_higher_gold_and_are_valid_training_data() -> None:
    records = flawed_records(3)
    judge = RuleJudge(JudgeConfig(), examples(records))
    sft, prefs, row = revise_records(records, judge, WORLD, rounds=3, seed=0, progress=False)
    assert row["gold_revised"] > row["gold_initial"] + 0.1, row
    assert len(sft) == row["responses"] == 4 * len(records)
    for i, rec in enumerate(sft):  # the chat format `lmforge sft` reads
        conv = parse_record(rec, "revisions.jsonl", i + 1)
        assert conv.messages[-1].role == "assistant"
        assert len(rec["critiques"]) == 3
    assert prefs and all(p["gold_chosen"] >= p["gold_rejected"] for p in prefs)
    assert sum(p["gold_chosen"] > p["gold_rejected"] for p in prefs) == len(prefs)
    assert prefs[0]["annotator"]["constitution"]["name"] == "world"
    # A right, concise, polite answer is never revised, so it gives no pair.
    assert all(p["rejected"] != records[0]["answer"] for p in prefs)


class FirstPosition:
    """A judge that always prefers whichever response it is shown first."""

    def compare(self, prompt: str, a: str, b: str) -> float:
        return 0.9

    def settings(self) -> dict[str, Any]:
        return {"model": "first-position"}


def test_position_swap_debiasing_cancels_a_fixed_preference_for_position_a() -> None:
    records = flawed_records(1)
    labels = label_ai(records, FirstPosition(), AILabelConfig(), WORLD, progress=False)  # type: ignore[arg-type]
    assert labels and all(p["label"] == pytest.approx(0.5) for p in labels)
    assert label_summary(labels)["gold_agreement"] == 0.5  # no side taken, no credit
    biased = label_ai(records, FirstPosition(), AILabelConfig(swap=False), WORLD, progress=False)  # type: ignore[arg-type]
    assert all(p["label"] == pytest.approx(0.9) for p in biased)
    # A rule judge with a strong first-position bias still sides with the gold reward once
    # debiased, and is pulled to 0.5 where the gold reward cannot tell the pair apart.
    cfg = AILabelConfig(judge=JudgeConfig(beta=4.0, position_bias=3.0))
    judge = RuleJudge(cfg.judge, examples(records))
    prefs = label_ai(records, judge, cfg, WORLD, progress=False)
    for p in prefs:
        if p["gold_chosen"] == p["gold_rejected"]:
            assert p["label"] == pytest.approx(0.5)
        else:
            assert p["gold_chosen"] > p["gold_rejected"] and p["label"] > 0.5
    assert max(p["p_first"] for p in prefs) > 0.95  # the bias is there before debiasing


def test_ai_labels_are_soft_clamped_agree_with_gold_and_train_a_reward_loss(
    tmp_path: Path,
) -> None:
    records = flawed_records(2)
    cfg = AILabelConfig(judge=JudgeConfig(beta=2.0), clamp="0.2..0.8")
    judge = RuleJudge(cfg.judge, examples(records))
    prefs = label_ai(records, judge, cfg, WORLD, progress=False)
    assert len(prefs) == 6 * len(records)  # every pair of 4 distinct responses
    assert all(0.5 <= p["label"] <= 0.8 for p in prefs)
    assert any(
        p["label"] < 0.8 for p in prefs
    )  # soft: a style gap is less sure than a wrong answer
    summary = label_summary(prefs)
    assert summary["gold_agreement"] == 1.0
    assert 0.5 < summary["annotator_agreement"] < 1.0
    assert prefs[0]["annotator"]["kind"] == "ai" and prefs[0]["annotator"]["clamp"] == "0.2..0.8"
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prefs))
    loaded = read_preferences(str(path))
    assert [p.label for p in loaded] == [p["label"] for p in prefs]  # kept soft
    # The Bradley-Terry loss on a soft label is lowest where sigmoid(margin) equals the label.
    label = torch.tensor([loaded[0].label])
    margins = torch.linspace(-4, 4, 801)
    losses = torch.stack([bradley_terry_loss(m.view(1), torch.zeros(1), label) for m in margins])
    best = torch.sigmoid(margins[losses.argmin()])
    assert float(best) == pytest.approx(loaded[0].label, abs=0.01)


def test_constitution_validation_names_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in flawed_records(1)))
    head = 'name = "mine"\ncomparison = "Which is better?"\n'
    bad = {
        "missing.toml": head + '[[principles]]\nname = "a"\ncritique = "Find flaws."\n',
        "unknown.toml": head + '[[principles]]\nname = "a"\ncritique = "x"\nrevision = "y"\n'
        'rulez = "correct"\n',
        "top.toml": head + 'principals = []\n',
        "none.toml": head,
    }  # fmt: skip
    expected = {
        "missing.toml": "field 'principles[0].revision': missing or empty",
        "unknown.toml": "field 'principles[0].rulez': unknown field (did you mean",
        "top.toml": "field 'principals': unknown field",
        "none.toml": "field 'principles': missing",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        err = fails(capsys, "label", "--ai", str(responses), "--out", str(tmp_path / "p.jsonl"),
                    "--constitution", str(tmp_path / name))  # fmt: skip
        assert str(tmp_path / name) in err and expected[name] in err, err
    assert not (tmp_path / "p.jsonl").exists()
    err = fails(capsys, "label", "--ai", str(responses), "--out", str(tmp_path / "p.jsonl"),
                "--constitution", "wrold")  # fmt: skip
    assert "chat or world or a .toml file" in err
    yaml_file = tmp_path / "mine.yaml"  # the same keys in YAML
    yaml_file.write_text("name: mine\ncomparison: Which is better?\nprinciples:\n"
                         "  - {name: a, critique: Find flaws., revision: Fix them.}\n")  # fmt: skip
    assert load_constitution(yaml_file).principles[0].revision == "Fix them."
    with pytest.raises(UserError, match="name 'a' is used twice"):
        principle = {"name": "a", "critique": "x", "revision": "y"}
        parse_constitution({"name": "n", "comparison": "c", "principles": [principle] * 2}, "f")


def test_label_ai_command_writes_soft_labels_and_reports_gold_agreement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    responses, out = tmp_path / "responses.jsonl", tmp_path / "prefs.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in flawed_records(1)))
    assert main(["label", "--ai", str(responses), "--judge", "rules", "--constitution", "world",
                 "--clamp", "0.1..0.9", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert '"gold_agreement": 1.0' in shown and "annotator_agreement" in shown
    prefs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(prefs) == 36 and max(p["label"] for p in prefs) == pytest.approx(0.9)
    err = fails(capsys, "label", "--ai", str(responses), "--out", str(tmp_path / "x.jsonl"),
                "--clamp", "0.7..0.9")  # fmt: skip
    assert "field 'clamp'" in err
    err = fails(capsys, "label", "--simulated", str(responses), "--judge", "rules",
                "--out", str(tmp_path / "x.jsonl"))  # fmt: skip
    assert "--judge is an option of --ai" in err


def test_cai_revise_command_and_an_lm_judge_on_a_tiny_chat_model(
    sft_tuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "revisions.jsonl"
    args = ["cai", "revise", "--model", str(sft_tuned), "--judge", "rules", "--rounds", "2",
            "--out", str(out), "--quiet", "sample.limit=12", "sample.tasks.n_train=20",
            "sample.tasks.n_val=2", "sample.tasks.n_test=2", "sample.tasks.n_rl=0"]  # fmt: skip
    assert main(args) == 0
    shown = capsys.readouterr().out
    prefs = out.with_name("revisions_prefs.jsonl")
    assert f"SFT records (prompt -> revision): {out} (12)" in shown and str(prefs) in shown
    row = json.loads(shown.strip().splitlines()[-1])
    assert row["gold_revised"] >= row["gold_initial"]
    assert len(out.read_text().splitlines()) == 12
    # An LM judge: normalised option probabilities, exactly 0.5 for identical responses once
    # asked both ways round, and critiques and revisions generated as text.
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "m"\ncomparison = "Which is right?"\n[[principles]]\n'
                    'name = "c"\ncritique = "Is it wrong?"\nrevision = "Fix it."\n')  # fmt: skip
    from lmforge.training.checkpoint import load_model

    cfg = JudgeConfig(model=str(sft_tuned), constitution=str(mine), max_new_tokens=6)
    judge, rules = make_judge(cfg, (), load_model)
    assert isinstance(judge, LMJudge)
    p = judge.compare("What is 2 plus 2?", "4", "5")
    assert 0 < p < 1
    label, first, swapped = debiased(judge, "What is 2 plus 2?", "4", "5")
    assert first == p and label == pytest.approx((p + 1 - swapped) / 2)  # type: ignore[operator]
    assert debiased(judge, "What is 2 plus 2?", "4", "4")[0] == pytest.approx(0.5)
    assert isinstance(judge.critique("What is 2 plus 2?", "5", rules.principles[0]), str)
    assert isinstance(judge.revise("What is 2 plus 2?", "5", "Wrong.", rules.principles[0]), str)
    with pytest.raises(UserError, match="exceeds the model's context"):
        judge.compare("What is 2 plus 2? " * 60, "4", "5")
