"""Lengths past the context: long training examples follow a counted policy, and a generation
prompt too long for the model is refused with one line (generate, sample, chat, eval).

Pretraining packs documents into blocks, so no document is cut or dropped
(tests/data/test_corpora.py); SFT cuts long examples and drops those whose reply does not fit,
counting both, and refuses data where every example is dropped
(tests/data/test_sft_batches.py). Preference pairs are cut from the start of the prompt,
counted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmforge.cli import cli
from lmforge.data.instruction import Message
from lmforge.data.preference import Preference
from lmforge.tokenizers import load_tokenizer
from lmforge.training.dpo import render_pair_seqs
from lmforge.training.reward import render_pairs
from tests.conftest import fails

LONG = "a very long question about the river and the fox " * 40  # far past 64 tokens


def test_generation_prompts_longer_than_the_context_are_refused(
    tiny_decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_decoder)
    err = fails(capsys, "generate", "--model", model, "--prompt", LONG)
    assert "exceeds the model's context of 64 tokens" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": LONG}))
    out = tmp_path / "responses.jsonl"
    err = fails(capsys, "sample", "--model", model, "--prompts", str(prompts), "--out", str(out))
    assert "prompt prompts.jsonl:2 is" in err and "context of 64" in err and not out.exists()
    evals = tmp_path / "eval"
    err = fails(capsys, "eval", "--model", model, "--out", str(evals), "max_new_tokens=64")
    assert "leaves no room for a prompt in the model's context of 64" in err
    assert not evals.exists()
    # chat reports it and stays open for the next, shorter message
    result = CliRunner().invoke(cli, ["chat", "--model", model], input=f"{LONG}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "(error: chat: the message is" in result.output and "holds at most" in result.output


def test_eval_cuts_long_world_prompts_and_counts_them(
    tiny_decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_decoder), "--out", str(out), "--quiet",
                 "limit=1", "max_new_tokens=40"]) == 0  # fmt: skip
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < row["prompts_cut"] <= row["n_prompts"]
    assert f"{row['prompts_cut']} cut to fit the context" in capsys.readouterr().out


def test_long_preference_pairs_lose_their_prompt_start_and_are_counted(tiny_decoder: Path) -> None:
    tok = load_tokenizer(tiny_decoder / "tokenizer")
    long = Preference((Message("user", LONG),), "the fox", "the owl")
    short = Preference((Message("user", "hi"),), "hello", "go away")
    pairs = render_pairs(tok, [long, short], 32)
    assert pairs.n_truncated == 1
    assert len(pairs.chosen[0]) == len(pairs.rejected[0]) == 32
    assert tok.decode(pairs.chosen[0]).endswith("the fox<|end_of_turn|>")  # the reply stays
    assert len(pairs.chosen[1]) < 32
    seqs = render_pair_seqs(tok, [long, short], 32)
    assert seqs.n_truncated == 1 and [len(x) for x in seqs.ids[:2]] == [32, 32]
    assert sum(seqs.masks[0]) == len(tok.encode("the fox", allow_special=False)) + 1
