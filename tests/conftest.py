"""Shared fixtures: an isolated cache per test session, small deterministic configs."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests must never read or write the user's ~/.cache/lmforge.
    os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge-cache"))


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
