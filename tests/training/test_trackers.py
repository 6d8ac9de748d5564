"""TensorBoard and W&B mirror metrics.jsonl, follow a resumed run, and fail early when absent."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge import config as C
from lmforge.errors import UserError
from lmforge.training.checkpoint import list_states
from lmforge.training.metrics import read_metrics
from lmforge.training.pretrain import PretrainConfig, pretrain, resume_config
from lmforge.training.sft import SFTConfig, sft
from tests.conftest import TINY_PRETRAIN, TINY_SFT


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never reach the network or the user's W&B settings.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-settings"))


def run(out: Path, *overrides: str) -> dict:
    cfg = C.load(PretrainConfig, None, [*TINY_PRETRAIN, *overrides])
    return pretrain(cfg, out, progress=False)


def metric(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def board(out: Path) -> EventAccumulator:
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # keep all
    events.Reload()
    return events


def scalar(events: EventAccumulator, key: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(key)]


def assert_same(curve: list[tuple[int, float]], rows: list[tuple[int, float]]) -> None:
    assert [s for s, _ in curve] == [s for s, _ in rows]
    # event files store float32
    assert [v for _, v in curve] == pytest.approx([v for _, v in rows], rel=1e-6)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trackers") / "base"
    run(out, "train.trackers=tensorboard")
    return out


def test_tensorboard_holds_the_numbers_of_metrics_jsonl(tb_run: Path) -> None:
    events = board(tb_run)
    for key in ("loss", "val_loss", "lr"):
        assert_same(scalar(events, key), metric(tb_run, key))
    assert [s for s, _ in scalar(events, "loss")] == list(range(1, 21))
    tags = set(events.Tags()["scalars"])
    assert "unigram_val_loss" in tags and "params" in tags
    assert "autocast" not in tags and "step" not in tags  # a label and the x axis


def test_sft_mirrors_its_metrics_too(tb_run: Path, tmp_path: Path) -> None:
    records = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(40)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sft"
    overrides = [f"model={tb_run}", *TINY_SFT, f"data={data}", "train.block_size=64"]
    cfg = C.load(SFTConfig, None, [*overrides, "train.max_steps=5", "train.trackers=tensorboard"])
    sft(cfg, out, progress=False)
    events = board(out)
    assert_same(scalar(events, "loss"), metric(out, "loss"))
    assert [s for s, _ in scalar(events, "loss")] == list(range(1, 6))


def test_wandb_offline_run_and_a_resume_after_a_kill(tmp_path: Path) -> None:
    out = tmp_path / "run"
    short = ("train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3")
    run(out, *short, "train.trackers=tensorboard,wandb")
    # A kill after step 6 was logged but before its checkpoint: the run resumes from step 3
    # and logs steps 4-6 again. TensorBoard must show each step once.
    for state in list_states(out)[1:]:
        for f in state.iterdir():
            f.unlink()
        state.rmdir()
    # W&B names a run's folder by its start second and id: a resumption within the same
    # second would share the first run's folder, and this test could not tell them apart
    time.sleep(1.1)
    pretrain(resume_config(out), out, resume=True, progress=False)
    assert_same(scalar(board(out), "loss"), metric(out, "loss"))
    assert [s for s, _ in metric(out, "loss")] == list(range(1, 7))

    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, runs  # the first run and its resumption, under one W&B id
    for folder in runs:
        (log,) = folder.glob("*.wandb")
        assert b"loss" in log.read_bytes()  # the rows reached W&B's log


def test_unknown_tracker_names_the_field() -> None:
    with pytest.raises(UserError, match=r"field 'train.trackers': unknown tracker 'mlflow'"):
        C.load(PretrainConfig, None, ["train.trackers=tensorboard,mlflow"])


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_fails_before_the_run_folder_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    out = tmp_path / "run"
    expected = f"train.trackers: {package} needs the '{package}' package: pip install"
    with pytest.raises(UserError, match=expected):
        run(out, f"train.trackers={package}")
    assert not out.exists()
