"""Every shipped recipe loads and validates; a bad recipe is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.pipeline.recipe import STAGES, load_recipe
from tests.conftest import fails

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_recipes_are_shipped() -> None:
    names = {p.stem for p in RECIPES.glob("*.toml")}
    assert {"world", "smoke", "shakespeare_char", "gpt2_small", "byo", "from_hf"} <= names


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_recipe_loads(path: Path, tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    overrides = []
    if path.stem in ("shakespeare_char", "gpt2_small"):  # these take the text as an argument
        with pytest.raises(Exception, match="give at least one input"):
            load_recipe(path, tmp_path / "run")
        overrides = [f"pretrain.data.inputs={text}"]
    if path.stem == "from_hf":  # takes the Hugging Face model folder as an argument
        with pytest.raises(Exception, match="give the base model folder"):
            load_recipe(path, tmp_path / "run")
        overrides = [f"sft.model={tmp_path / 'hf'}"]
    recipe = load_recipe(path, tmp_path / "run", overrides)
    assert recipe.options.name == path.stem
    assert set(recipe.configs) == {s for s in recipe.options.stages if s != "report"}
    for stage, deps in recipe.deps.items():
        assert all(d in recipe.options.stages for d in deps), (stage, deps)


def test_world_recipe_is_the_built_in_default(tmp_path: Path) -> None:
    shipped = load_recipe(RECIPES / "world.toml", tmp_path)
    built_in = load_recipe(None, tmp_path)
    assert shipped.options == built_in.options
    assert shipped.configs == built_in.configs
    assert built_in.options.stages == STAGES


def test_paths_between_stages_are_filled_from_the_run_folder(tmp_path: Path) -> None:
    r = load_recipe(None, tmp_path)
    assert r.configs["pretrain"].tokenizer.path == str(tmp_path / "tokenizer")
    assert r.configs["sft"].model == str(tmp_path / "base")
    assert r.configs["reward"].data == (str(tmp_path / "label" / "prefs.jsonl"),)
    assert r.configs["reward"].val_data == (str(tmp_path / "label" / "prefs_val.jsonl"),)
    assert r.configs["ppo"].policy == str(tmp_path / "sft")
    assert r.configs["ppo"].reward_model == str(tmp_path / "rm")
    assert r.deps["ppo"] == ("sft", "reward")
    # The shared tasks section reaches every stage; a stage's own key still wins.
    r = load_recipe(None, tmp_path, ["tasks.n_train=77", "dpo.tasks.n_train=5"])
    assert r.configs["sft"].tasks.n_train == r.configs["ppo"].tasks.n_train == 77
    assert r.configs["dpo"].tasks.n_train == 5
    # A path the recipe gives is kept, and the stage no longer waits for the producer.
    r = load_recipe(None, tmp_path, ["reward.data=mine.jsonl"])
    assert r.configs["reward"].data == ("mine.jsonl",)
    assert r.deps["reward"] == ("sft", "label")  # still reads the labelled val pairs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stages=tokenizer,pretrian"], "unknown stage ['pretrian']"),
        (["sft.trian.max_steps=3"], "[sft]: field 'trian': unknown field (did you mean 'train'?)"),
        (["epochs=3"], "field 'epochs': unknown field"),
        (["ppo.clip=-1"], "[ppo]"),
        (["stages=label,reward"], "the label stage labels the sample stage's responses"),
        (["stages=sample"], "the sample stage needs a chat model"),
        (["--only", "ppo", "stages=tokenizer,pretrain"], "--only ppo: not a stage of this recipe"),
    ],
)
def test_bad_recipe_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert message in fails(capsys, "run", "--out", str(out), *args)
    assert not out.exists()  # nothing written before the recipe validated


def test_a_foreign_folder_is_never_touched(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "not an lmforge run folder" in fails(
        capsys, "run", "--out", str(mine), "stages=tokenizer"
    )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_bad_recipe_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "r.toml"
    bad.write_text("[sft\nmodel = 3\n")
    run = ("run", str(bad), "--out", str(tmp_path / "run"))
    assert fails(capsys, *run).startswith(f"error: {bad}: invalid TOML")
    bad.write_text("sft = 3\n")
    assert "field 'sft': expected a table of fields" in fails(capsys, *run)


def test_trackers_do_not_change_a_stages_key(tmp_path: Path) -> None:
    from lmforge.pipeline.run import node_key, plan

    def keys(*overrides: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for node in plan(load_recipe(None, tmp_path, overrides), tmp_path):
            out[node.name] = node_key(node, out, tmp_path)
        return out

    plain = keys()
    assert keys("sft.train.trackers=tensorboard") == plain
    changed = keys("sft.train.max_steps=999")
    assert [n for n in plain if plain[n] != changed[n]][:3] == ["sft", "sample", "label"]
    assert changed["pretrain"] == plain["pretrain"]
