"""Pretraining learns, resumes exactly after SIGKILL, and keeps its checkpoint contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.errors import UserError
from lmforge.training.checkpoint import list_states, load_model
from lmforge.training.metrics import read_metrics
from lmforge.training.pretrain import PretrainConfig, pretrain, resume_config
from tests.conftest import (
    TINY_PRETRAIN,
    lmforge_cmd,
    resume_to_end,
    run_to_end,
    sigkill_at_checkpoint,
)


def run(out: Path, *overrides: str, **kw: bool) -> dict:
    cfg = C.load(PretrainConfig, None, [*TINY_PRETRAIN, *overrides])
    return pretrain(cfg, out, progress=False, **kw)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_learns_well_below_unigram_baseline(tmp_path: Path) -> None:
    last = run(tmp_path / "run", "train.max_steps=120", "train.eval_every=60", "optim.lr=3e-3")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    unigram = rows[0]["unigram_val_loss"]
    first_val = next(r["val_loss"] for r in rows if "val_loss" in r)
    assert last["val_loss"] < 0.75 * unigram, (last["val_loss"], unigram)
    assert last["val_loss"] < first_val
    assert last["val_bpb"] > 0


def test_run_dir_holds_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out)
    model, tok, config = load_model(out)
    assert config["stage"] == "pretrain" and config["step"] == 20
    assert model.cfg.vocab_size == tok.vocab_size
    assert [p.name for p in list_states(out)] == ["step_00000010", "step_00000020"]


def test_existing_run_dir_is_never_overwritten_silently(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        run(out)
    assert (out / "precious.txt").read_text() == "keep me"
    run(out, overwrite=True)
    assert not (out / "precious.txt").exists()


def test_resume_extends_a_run_but_refuses_a_different_experiment(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, "train.max_steps=10")
    first = losses(out)
    with pytest.raises(UserError, match="cannot change model.n_layer"):
        pretrain(resume_config(out, None, ["model.n_layer=3"]), out, resume=True, progress=False)
    done = pretrain(resume_config(out), out, resume=True, progress=False)
    assert done["step"] == 10  # already complete: nothing trained, final row returned
    pretrain(resume_config(out, None, ["train.max_steps=20"]), out, resume=True, progress=False)
    extended = losses(out)
    assert sorted(extended) == list(range(1, 21))
    assert {k: extended[k] for k in first} == first


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_sigkill_then_resume_reproduces_losses_bit_for_bit(tmp_path: Path, arch: str) -> None:
    args = [*TINY_PRETRAIN, "train.max_steps=40", "train.ckpt_every=5", "model.dropout=0.1"]
    args.append(f"arch={arch}")
    ref, out, cmd = tmp_path / "ref", tmp_path / "killed", lmforge_cmd("pretrain")
    run_to_end(cmd, ref, args)
    sigkill_at_checkpoint(cmd, out, args, 15)
    killed_at = max(losses(out))
    assert killed_at < 40, "the run finished before SIGKILL; nothing was tested"
    resume_to_end(cmd, out)
    assert losses(out) == losses(ref)  # exact float equality, every step 1..40
    assert sorted(losses(out)) == list(range(1, 41))


def test_muon_learns_and_resumes_exactly(tmp_path: Path) -> None:
    muon = ("optim.name=muon", "train.max_steps=12", "train.ckpt_every=6")
    ref = tmp_path / "ref"
    run(ref, *muon)
    part = tmp_path / "part"
    with pytest.MonkeyPatch.context() as mp:  # stop right after the first checkpoint
        import lmforge.training.loop as L

        real = L.save_checkpoint

        def save_then_stop(*a: object, **k: object) -> None:
            real(*a, **k)  # type: ignore[arg-type]
            raise KeyboardInterrupt

        mp.setattr(L, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(part, *muon)
    assert max(losses(part)) == 6
    run(part, *muon, resume=True)
    assert losses(part) == losses(ref)
    first, last = losses(ref)[1], losses(ref)[12]
    assert last < first - 0.3


def test_encoder_masked_accuracy_far_above_unigram_baseline(tmp_path: Path) -> None:
    out = tmp_path / "enc"
    last = run(out, "arch=encoder", "train.max_steps=400", "train.eval_every=400", "optim.lr=3e-3")
    rows = read_metrics(out / "metrics.jsonl")
    baseline = rows[0]["unigram_val_acc"]
    assert 0 < baseline < 0.3
    assert last["val_acc"] > baseline + 0.15, (last["val_acc"], baseline)
    assert "val_bpb" not in last  # bits per byte only make sense for next-token prediction
    model, _, config = load_model(out, family="encoder")
    assert config["family"] == "encoder" and config["objective"] == "masked_lm"
    with pytest.raises(UserError, match="holds a 'encoder' model"):
        load_model(out, family="decoder")


def test_objective_must_fit_the_family() -> None:
    with pytest.raises(UserError, match="field 'objective': next_token does not fit arch=encoder"):
        C.load(PretrainConfig, None, ["arch=encoder", "objective=next_token"])
    assert C.load(PretrainConfig, None, ["arch=encoder"]).resolved_objective == "masked_lm"


def test_span_corruption_learns_far_above_unigram_baseline(tmp_path: Path) -> None:
    out = tmp_path / "t5"
    last = run(
        out, "arch=encoder-decoder", "train.max_steps=300", "train.eval_every=300", "optim.lr=3e-3"
    )
    rows = read_metrics(out / "metrics.jsonl")
    first_loss = next(r["loss"] for r in rows if "loss" in r)
    assert last["val_acc"] > rows[0]["unigram_val_acc"] + 0.15
    assert last["loss"] < first_loss - 1.0
    model, tok, config = load_model(out, family="encoder-decoder")
    assert (
        config["extra_vocab"] > 0 and model.cfg.vocab_size == tok.vocab_size + config["extra_vocab"]
    )
