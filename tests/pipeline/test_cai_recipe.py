"""The AI-feedback variant of the pipeline: `feedback = "ai"` makes the label stage an RLAIF
labeller, its metrics set the AI labels beside the simulated annotators, and the report says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.errors import UserError
from lmforge.feedback.cai import AILabelConfig
from lmforge.feedback.simulated import Annotator
from lmforge.pipeline.recipe import load_recipe
from lmforge.pipeline.report import _ai_labels, to_markdown
from lmforge.pipeline.run import _label, plan
from tests.feedback.test_cai import flawed_records

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_world_cai_recipe_differs_from_world_only_in_its_labels(tmp_path: Path) -> None:
    world = load_recipe(RECIPES / "world.toml", tmp_path)
    cai = load_recipe(RECIPES / "world_cai.toml", tmp_path)
    assert isinstance(world.configs["label"], Annotator)
    assert isinstance(cai.configs["label"], AILabelConfig)
    assert cai.configs["label"].judge.constitution == "world"
    assert {s for s in world.configs if world.configs[s] != cai.configs[s]} == {"label"}
    # So a run switched to AI feedback reuses everything up to the sampled responses.
    keys = {n.name: n.config for n in plan(world, tmp_path)}
    changed = {n.name for n in plan(cai, tmp_path) if n.config != keys[n.name]}
    assert changed == {"label"}
    with pytest.raises(UserError, match="field 'feedback': must be one of simulated, ai"):
        load_recipe(RECIPES / "world.toml", tmp_path, ["feedback=people"])
    with pytest.raises(UserError, match=r"\[label\]: field 'noise': unknown field"):
        load_recipe(RECIPES / "world.toml", tmp_path, ["feedback=ai"])


def test_ai_label_stage_reports_agreement_beside_the_simulated_annotators(tmp_path: Path) -> None:
    sample, out = tmp_path / "sample", tmp_path / "label"
    sample.mkdir()
    records = flawed_records(2)
    for name, recs in (("responses.jsonl", records[:8]), ("responses_val.jsonl", records[8:])):
        (sample / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = C.load(AILabelConfig, None, ["judge.beta=2", "clamp=0.1..0.9"])
    row = _label(cfg, sample, out, resume=False, progress=False)
    assert row["pairs"] == 6 * 8 and row["val_pairs"] == 6 * 4
    assert row["gold_agreement"] == 1.0 > row["annotator_gold_agreement"] > 0.5
    assert 0.5 < row["mean_label"] <= 0.9
    written = [json.loads(x) for x in (out / "prefs.jsonl").read_text().splitlines()]
    assert all(p["annotator"]["kind"] == "ai" for p in written)
    assert json.loads((out / "metrics.jsonl").read_text())["source"] == "ai"
    text = to_markdown(_ai_labels(row))
    assert "AI judge (rules, constitution world)" in text and "1.000 of the time" in text
    assert _ai_labels({"gold_agreement": 0.9}) == []  # simulated labels: no such paragraph
