"""Faults injected into training, and what must come of them: a crash mid-save, damaged files,
a full disk, a missing resume target, SIGTERM, NaN/inf and spikes.

The tiny pretraining runs share one reference run (a module fixture); every run is float32 on
one thread, so a run in this process and one in a subprocess do the same arithmetic and resumed
runs can be compared with the reference exactly."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lmforge.training.checkpoint as ckpt
from lmforge import config as C
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.training.guard import Running, StepGuard
from lmforge.training.loop import TrainConfig, train_step
from lmforge.training.manifest import CorruptCheckpoint
from lmforge.training.metrics import read_metrics
from lmforge.training.preempt import Preempted
from lmforge.training.pretrain import PretrainConfig, pretrain, resume_config
from tests.conftest import TINY_PRETRAIN, TINY_SFT, fails

pytestmark = pytest.mark.fault

ARGS = (
    *TINY_PRETRAIN,
    "train.dtype=float32",
    "train.threads=1",
    "train.max_steps=12",
    "train.ckpt_every=4",
    "train.eval_every=12",
)


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    # train.threads=1 sets this process's thread count; later tests get theirs back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(out: Path, *overrides: str, **kw: Any) -> dict[str, Any]:
    return pretrain(C.load(PretrainConfig, None, [*ARGS, *overrides]), out, progress=False, **kw)


def resume(out: Path, *overrides: str) -> dict[str, Any]:
    return pretrain(resume_config(out, None, overrides), out, resume=True, progress=False)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def flip_byte(path: Path, at: float = 0.75) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 12-step run (checkpoints at 8 and 12 kept), with spike detection on
    from step 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    run(out, "train.spike_warmup=4")
    torch.set_num_threads(n)
    return out


# -- 1. crash mid-save ------------------------------------------------------------------------

# Runs pretraining and kills itself with SIGKILL half-way through writing the checkpoint of
# step 8: its optimizer file is truncated to half, the rest of the folder never written.
CRASH_MID_SAVE = """
import os, signal, sys
import lmforge.training.checkpoint as ckpt
from lmforge.cli import main
real = ckpt.save_file
def save_file(tensors, path):
    real(tensors, path)
    if "step_00000008" in path:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_mid_save_leaves_the_previous_checkpoint_to_resume(
    ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-c", CRASH_MID_SAVE, "pretrain", "--out", str(out), "--quiet", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = [p.name for p in (out / "state").iterdir() if p.name.startswith(".tmp-step_00000008")]
    assert len(partial) == 1 and ckpt.latest_state(out) == out / "state" / "step_00000004"

    resume(out)
    err = capsys.readouterr().err
    assert f"{partial[0]}: partial checkpoint folder ignored" in err
    assert losses(out) == losses(ref)  # steps 5..12 retrained from step 4, exactly
    assert not (out / "state" / partial[0]).exists()  # cleared by the next good save


# -- 2. corruption ----------------------------------------------------------------------------


def tiny_state(run_dir: Path, step: int, keep: int = 2) -> torch.nn.Module:
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ckpt.save_state(run_dir, step, model, opt, {"autocast": "float32"}, keep=keep)
    return model


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("optim.safetensors", lambda p: os.truncate(p, p.stat().st_size - 7), "bytes; manifest"),
        ("model.safetensors", flip_byte, "its SHA-256 differs"),
        ("manifest.json", lambda p: p.unlink(), r"missing \(the save did not finish\)"),
    ],
)
def test_load_names_a_truncated_or_bit_flipped_file(
    tmp_path: Path, name: str, damage: Any, message: str
) -> None:
    tiny_state(tmp_path, 1)
    state = tmp_path / "state" / "step_00000001"
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.load_state(state, model, opt)  # whole: it loads
    damage(state / name)
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"{state / name}: ") + ".*" + message):
        ckpt.load_state(state, model, opt)


def test_a_verified_checkpoint_is_hashed_once_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge.training.manifest as manifest

    tiny_state(tmp_path, 1)
    state = tmp_path / "state" / "step_00000001"
    old = state.stat().st_mtime - 60  # settled files: written a minute ago
    for f in state.iterdir():
        os.utime(f, (old, old))
    hashed: list[str] = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert ckpt.latest_state(tmp_path) == state
    n = len(hashed)
    assert n > 0
    ckpt.load_state(
        state, torch.nn.Linear(8, 4), torch.optim.AdamW(torch.nn.Linear(8, 4).parameters())
    )
    assert len(hashed) == n  # the resume's second look hashed nothing
    flip_byte(state / "model.safetensors")  # a change: its stat moves, the check runs again
    with pytest.raises(CorruptCheckpoint, match="its SHA-256 differs"):
        manifest.verify_manifest(state)
    assert len(hashed) > n


def test_resume_falls_back_past_a_damaged_checkpoint_and_never_starts_afresh(
    ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "damaged"
    shutil.copytree(ref, out)
    newest = out / "state" / "step_00000012"
    flip_byte(newest / "model.safetensors")
    resume(out)
    err = capsys.readouterr().err
    assert f"{newest / 'model.safetensors'}: corrupted" in err
    assert f"falling back to the previous valid checkpoint {out / 'state' / 'step_00000008'}" in err
    assert losses(out) == losses(ref)  # steps 9..12 retrained from step 8, exactly

    # The model folder is checked on load too.
    flip_byte(out / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="model.safetensors: corrupted"):
        ckpt.load_model(out)

    # No valid checkpoint left: refused with exit code 2, and no step runs.
    flip_byte(newest / "optim.safetensors")
    flip_byte(out / "state" / "step_00000008" / "state.json", at=0.5)
    rows = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(out), "--resume", "--quiet"])
    assert e.value.code == 2
    *warnings, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: {out / 'state'}: no valid checkpoint (2 damaged")
    assert len(warnings) == 2 and all("corrupted" in w for w in warnings)
    assert (out / "metrics.jsonl").read_text() == rows


# -- 3. retention and a failed save -----------------------------------------------------------


def test_keep_checkpoints_must_be_at_least_two_and_skips_need_train_step() -> None:
    with pytest.raises(UserError, match="field 'train.keep_checkpoints': must be >= 2"):
        C.load(PretrainConfig, None, ["train.keep_checkpoints=1"])
    from lmforge.training.ppo import PPOConfig

    for option in ("train.nonfinite=skip", "train.spike=skip"):  # PPO steps its optimizer itself
        with pytest.raises(UserError, match=f"field '{option.split('=')[0]}': PPO"):
            C.load(PPOConfig, None, ["policy=p", "reward=gold", option])


def test_a_full_disk_mid_save_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (1, 2, 3):
        tiny_state(tmp_path, step)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["step_00000002", "step_00000003"]

    real = ckpt.save_file

    def disk_full(tensors: dict[str, torch.Tensor], path: str) -> None:
        real(tensors, path)  # a part of the checkpoint is written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(UserError, match=r"step_00000004: cannot save the checkpoint \(No space"):
        tiny_state(tmp_path, 4)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.partial_states(tmp_path) == []  # the half-written folder is gone
    assert ckpt.latest_state(tmp_path) == tmp_path / "state" / "step_00000003"  # and valid


# -- 4. a missing resume target ---------------------------------------------------------------


def test_resume_without_a_checkpoint_exits_2_naming_the_path(
    ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing"
    err = fails(capsys, "pretrain", "--out", str(missing), "--resume", "--quiet")
    assert str(missing) in err and not missing.exists()

    empty = tmp_path / "no_state"  # a run folder whose checkpoints are gone
    empty.mkdir()
    shutil.copy(ref / "run_config.json", empty)
    err = fails(capsys, "pretrain", "--out", str(empty), "--resume", "--quiet")
    assert f"{empty}: nothing to resume" in err
    assert sorted(p.name for p in empty.iterdir()) == ["run_config.json"]  # no step ran


# -- 5. preemption ----------------------------------------------------------------------------


def sigterm_at(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, at: int) -> None:
    """Make `module.name` (a step function) send this process SIGTERM as step `at` begins."""
    real = getattr(module, name)

    def step_with_sigterm(*a: Any, **k: Any) -> Any:
        step = k["step"] if "step" in k else a[-1] + 1  # ppo_update(..., iteration)
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step still finishes
        return real(*a, **k)

    monkeypatch.setattr(module, name, step_with_sigterm)


def test_sigterm_checkpoints_the_step_exits_143_and_resumes_exactly(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lmforge.training.pretrain as P

    out = tmp_path / "preempted"
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp:
        sigterm_at(mp, P, "train_step", 6)
        code = main(["pretrain", "--out", str(out), "--quiet", *ARGS, "train.spike_warmup=4"])
    assert code == 143
    assert "stopped on SIGTERM after step 6" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    assert ckpt.latest_state(out) == out / "state" / "step_00000006"
    assert max(losses(out)) == 6
    resume(out)
    assert losses(out) == losses(ref)


@pytest.fixture(scope="module")
def sft_args(sft_base: Path) -> list[str]:
    extra = ["train.dtype=float32", "train.threads=1", "eval_prompts=0", "train.ckpt_every=8"]
    return [f"model={sft_base}", *TINY_SFT, "train.max_steps=8", "train.eval_every=8", *extra]


def test_sft_stops_on_sigterm_and_resumes_exactly(
    sft_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge.training.sft as S

    def sft_run(out: Path, **kw: bool) -> None:
        S.sft(C.load(S.SFTConfig, None, sft_args), out, progress=False, **kw)

    sft_run(tmp_path / "ref")
    out = tmp_path / "preempted"
    with monkeypatch.context() as mp:
        sigterm_at(mp, S, "train_step", 3)
        with pytest.raises(Preempted, match="after step 3"):
            sft_run(out)
    assert [p.name for p in ckpt.list_states(out)] == ["step_00000003"]
    sft_run(out, resume=True)
    assert losses(out) == losses(tmp_path / "ref")
    assert sorted(losses(out)) == list(range(1, 9))


def test_ppo_stops_on_sigterm_and_resumes_exactly(
    sft_tuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge.training.ppo as PPO

    args = [
        f"policy={sft_tuned}", "reward=gold", "tasks.tasks=reverse", "tasks.n_rl=40",
        "eval_prompts=0", "sampling.max_new_tokens=8", "train.batch_size=8", "minibatch_size=8",
        "ppo_epochs=1", "train.max_steps=3", "train.ckpt_every=3", "train.threads=1",
    ]  # fmt: skip

    def ppo_run(out: Path, **kw: bool) -> list[dict[str, Any]]:
        PPO.ppo(C.load(PPO.PPOConfig, None, args), out, progress=False, **kw)
        return [r for r in read_metrics(out / "metrics.jsonl") if "score" in r]

    want = ppo_run(tmp_path / "ref")
    out = tmp_path / "preempted"
    with monkeypatch.context() as mp:
        sigterm_at(mp, PPO, "ppo_update", 2)
        with pytest.raises(Preempted, match="after step 2"):
            ppo_run(out)
    got = ppo_run(out, resume=True)
    keys = ("step", "score", "kl", "policy_loss", "value_loss")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]


# -- 6. non-finite loss or gradient -----------------------------------------------------------


def linear_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, bad: str = "", **kw: Any
) -> None:
    """One train_step of a linear model whose loss (or only its gradient) is made non-finite."""

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = (out - y).pow(2).mean()
        if bad == "loss":
            return loss * float("nan")
        if bad == "grad":  # sqrt at 0: a finite value (0) with an infinite gradient
            return loss + torch.sqrt((out - out.detach()).abs().sum())
        return loss

    x, y = torch.ones(4, 2), torch.zeros(4, 1)
    train_step(model, opt, [(x, y)], loss_fn, n_micro=1, device=torch.device("cpu"),
               dtype=torch.float32, grad_clip=1.0, step=step, **kw)  # fmt: skip


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    moments = [t.clone() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return [p.detach().clone() for p in model.parameters()] + moments


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("bad", "cause"), [("loss", "loss"), ("grad", "gradient norm")])
def test_nonfinite_stop_names_the_step_and_leaves_the_previous_weights(
    bad: str, cause: str
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(TrainConfig())  # the default policy: stop
    linear_step(model, opt, 1, guard=guard)
    before = snapshot(model, opt)
    with pytest.raises(UserError, match=f"step 2: {cause} became (nan|inf).*not applied"):
        linear_step(model, opt, 2, bad, guard=guard)
    assert same(snapshot(model, opt), before)  # parameters and AdamW moments of step 1


def test_nonfinite_skip_drops_the_update_counts_it_and_stops_after_max_skips() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(TrainConfig(nonfinite="skip", max_skips=2))
    linear_step(model, opt, 1, guard=guard)
    before = snapshot(model, opt)
    linear_step(model, opt, 2, "loss", guard=guard)
    assert same(snapshot(model, opt), before)
    assert all(p.grad is None for p in model.parameters())  # zeroed, not carried into step 3
    assert guard.counts() == {"skipped_steps": 1}
    linear_step(model, opt, 3, guard=guard)  # a good step applies and ends the streak
    assert not same(snapshot(model, opt), before)
    linear_step(model, opt, 4, "grad", guard=guard)
    with pytest.raises(UserError, match=r"step 5: 2 updates in a row skipped.*max_skips=2"):
        linear_step(model, opt, 5, "loss", guard=guard)


def test_pretrain_skips_a_nan_step_and_logs_it(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge.training.pretrain as P

    calls = []
    real = P.token_loss

    def nan_at_step_5(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(out, y) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(P, "token_loss", nan_at_step_5)
    out = tmp_path / "nan"
    run(out, "train.nonfinite=skip", "train.spike_warmup=4")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r.get("skipped_steps", 0) for r in rows] == [0] * 4 + [1] * 8
    assert {k: v for k, v in losses(out).items() if k < 5} == {
        k: v for k, v in losses(ref).items() if k < 5
    }
    assert all(torch.isfinite(p).all() for p in ckpt.load_model(out)[0].parameters())


# -- 7. spikes --------------------------------------------------------------------------------


def test_a_clean_run_flags_no_spike(ref: Path) -> None:
    rows = read_metrics(ref / "metrics.jsonl")
    assert sum("loss" in r for r in rows) == 12  # the detector watched steps 5..12
    assert not any("spikes" in r or "skipped_steps" in r for r in rows)


def test_running_statistics_flag_a_spike_only_after_warmup() -> None:
    r = Running()
    gen = torch.Generator().manual_seed(0)
    for x in (2.0 + 0.05 * torch.randn(200, generator=gen)).tolist():
        assert r.z(x) < 6 or r.n < 2
        r.update(x)
    assert abs(r.mean - 2.0) < 0.05 and 0.02 < r.var**0.5 < 0.1
    assert r.z(3.0) > 6 and r.z(1.0) < 0  # upward only counts


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_a_loss_spike_is_flagged_and_skipped_on_request(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lmforge.training.pretrain as P

    calls = []
    real = P.token_loss

    def spike_at_step_10(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(out, y) * (30.0 if len(calls) == 10 else 1.0)

    monkeypatch.setattr(P, "token_loss", spike_at_step_10)
    out = tmp_path / policy
    run(out, f"train.spike={policy}", "train.spike_warmup=4")
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert [rows[s].get("spikes", 0) for s in (9, 10, 12)] == [0, 1, 1]
    assert [rows[s].get("skipped_steps", 0) for s in (9, 10, 12)] == (
        [0, 1, 1] if policy == "skip" else [0, 0, 0]
    )
    err = capsys.readouterr().err
    assert "step 10: loss spike" in err and ("update skipped" in err) == (policy == "skip")


# Rank 1 alone gets a NaN loss at step 3; each rank records a digest of its weights per step.
NAN_ON_RANK_1 = """
import hashlib, os, sys
import lmforge.training.pretrain as P
from lmforge import distributed
from lmforge.cli import main
real_loss, real_step, calls = P.token_loss, P.train_step, []
def token_loss(out, y):
    calls.append(1)
    nan = distributed.rank() == 1 and len(calls) == 3
    return real_loss(out, y) * (float("nan") if nan else 1.0)
def train_step(model, *a, **k):
    result = real_step(model, *a, **k)
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    with open(f"{os.environ['DIGESTS']}.{distributed.rank()}", "a") as f:
        f.write(hashlib.sha256(weights).hexdigest() + "\\n")
    return result
P.token_loss, P.train_step = token_loss, train_step
sys.exit(main(sys.argv[1:]))
"""


def test_every_rank_skips_a_nan_that_only_one_rank_saw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.training.test_distributed import start_ranks

    script, out, digests = tmp_path / "nan.py", tmp_path / "run", tmp_path / "digests"
    script.write_text(NAN_ON_RANK_1)
    monkeypatch.setenv("DIGESTS", str(digests))  # the ranks inherit it
    args = [*ARGS, "train.max_steps=5", "train.grad_accum=2", "train.nonfinite=skip"]
    ranks = start_ranks(str(script), "pretrain", "--out", str(out), "--quiet", *args)
    errors = [p.communicate(timeout=180)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    per_rank = [Path(f"{digests}.{r}").read_text().split() for r in (0, 1)]
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 5  # the same weights, every step
    assert per_rank[0][2] == per_rank[0][1]  # step 3 changed nothing on either rank
    assert [
        r.get("skipped_steps", 0) for r in read_metrics(out / "metrics.jsonl") if "loss" in r
    ] == [0, 0, 1, 1, 1]
