"""Shared fixtures: an isolated cache per test session, small deterministic configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests must never read or write the user's ~/.cache/lmforge.
    os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge-cache"))


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI with `argv`; check it refused with one `error:` line and exit code 2."""
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def lmforge_cmd(*stage: str) -> list[str]:
    """`python -m lmforge STAGE --quiet` as a subprocess command line."""
    return [sys.executable, "-m", "lmforge", *stage, "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def run_to_end(cmd: list[str], out: Path, args: list[str]) -> None:
    subprocess.run([*cmd, "--out", str(out), *args], check=True, env=_env(), capture_output=True)


def sigkill_at_checkpoint(cmd: list[str], out: Path, args: list[str], step: int) -> None:
    """Start `cmd --out OUT ARGS` and SIGKILL it as soon as its checkpoint of `step` exists."""
    proc = subprocess.Popen([*cmd, "--out", str(out), *args], env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "state" / f"step_{step:08d}").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def resume_to_end(cmd: list[str], out: Path) -> None:
    resumed = subprocess.run(
        [*cmd, "--out", str(out), "--resume"], env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr


# Overrides for a pretraining run that takes a few seconds on a CPU.
TINY_PRETRAIN = (
    "data.world.n_docs=1500",
    "tokenizer.vocab_size=400",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.max_seq_len=64",
    "train.batch_size=8",
    "train.max_steps=20",
    "train.eval_every=10",
    "train.eval_blocks=8",
    "train.log_every=1",
    "train.ckpt_every=10",
    "optim.warmup_steps=5",
)

# A base model a little larger than TINY_PRETRAIN: SFT needs room for 6 tasks and their prompts.
SFT_BASE = (
    *TINY_PRETRAIN,
    "data.world.n_docs=3000",
    "model.n_embd=96",
    "model.n_head=4",
    "model.max_seq_len=160",
    "train.block_size=64",
    "train.max_steps=150",
    "train.eval_every=150",
    "optim.lr=3e-3",
)
TINY_SFT = (
    "tasks.n_train=300",
    "tasks.n_val=10",
    "tasks.n_test=20",
    "train.batch_size=8",
    "train.max_steps=20",
    "train.log_every=1",
    "train.eval_every=10",
    "train.ckpt_every=10",
    "eval_prompts=2",
    "optim.warmup_steps=5",
)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder pretrained for two steps (context 64): a model folder with its resume state."""
    from lmforge import config as C
    from lmforge.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("tiny") / "base"
    overrides = [*TINY_PRETRAIN, "data.world.n_docs=300", "train.max_steps=2"]
    pretrain(C.load(PretrainConfig, None, [*overrides, "train.ckpt_every=2"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def sft_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly pretrained tiny decoder on the world (a few seconds)."""
    from lmforge import config as C
    from lmforge.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("sft") / "base"
    pretrain(C.load(PretrainConfig, None, SFT_BASE), out, progress=False)
    return out


@pytest.fixture(scope="session")
def sft_tuned(sft_base: Path) -> Path:
    """That decoder after 600 SFT steps on the world's tasks (~25 s): a tiny chat model."""
    from lmforge import config as C
    from lmforge.training.sft import SFTConfig, sft

    out = sft_base.parent / "sft"
    overrides = [f"model={sft_base}", *TINY_SFT, "train.max_steps=600", "train.eval_every=600"]
    sft(C.load(SFTConfig, None, [*overrides, "optim.lr=3e-3"]), out, progress=False)
    return out
