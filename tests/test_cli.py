"""Bad input: one `error:` line naming the culprit, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from tests.conftest import TINY_PRETRAIN, fails


def pretrain_fails(capsys: pytest.CaptureFixture[str], out: Path, *overrides: str) -> str:
    err = fails(capsys, "pretrain", "--quiet", "--out", str(out), *TINY_PRETRAIN, *overrides)
    assert not out.exists(), "a failed run left output behind"
    return err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = pretrain_fails(capsys, tmp_path / "run", f"data.inputs={tmp_path}/nope.txt")
    assert "nope.txt: no such file" in err


def test_empty_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    err = pretrain_fails(capsys, tmp_path / "run", f"data.inputs={tmp_path}/empty.txt")
    assert "empty corpus" in err


def test_non_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.txt").write_bytes(b"hello\nworld \xff\xfe here\n")
    err = pretrain_fails(capsys, tmp_path / "run", f"data.inputs={tmp_path}/bad.txt")
    assert "bad.txt:2: not valid UTF-8" in err


def test_malformed_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    err = pretrain_fails(capsys, tmp_path / "run", f"data.inputs={f}")
    assert "c.jsonl:2: invalid JSON" in err
    f.write_text('{"text": "fine"}\n{"body": "x"}\n')
    err = pretrain_fails(capsys, tmp_path / "run", f"data.inputs={f}")
    assert "c.jsonl:2: field 'text': missing" in err


def test_vocab_too_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = pretrain_fails(capsys, tmp_path / "run", "tokenizer.vocab_size=100")
    assert "vocab" in err and "too small" in err


def test_block_size_beyond_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = pretrain_fails(capsys, tmp_path / "run", "train.block_size=65")
    assert "train.block_size" in err and "max_seq_len=64" in err


def test_existing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    err = fails(capsys, "pretrain", "--quiet", "--out", str(out), *TINY_PRETRAIN)
    assert "already exists" in err
    assert (out / "mine.txt").read_text() == "x" and len(list(out.iterdir())) == 1


def test_config_file_error_names_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nn_layer = 0\n")
    err = fails(capsys, "pretrain", "--out", str(tmp_path / "r"), "--config", str(cfg))
    assert "run.toml" in err and "field 'model.n_layer'" in err


def test_usage_errors_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(capsys, "pretrain")
    assert "--out" in err


def test_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "pretrain",
            "--out",
            str(tmp_path / "r"),
            f"data.inputs={tmp_path}/missing.jsonl",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: {tmp_path}/missing.jsonl: no such file or folder"
    ]


def test_tokenizer_and_generate_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    assert (
        main(["tokenizer", "train", "--algo", "char", "--out", str(tmp_path / "tok"), str(corpus)])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_per_token_heldout"] == pytest.approx(1.0)
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "cat"]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *ids]) == 0
    assert capsys.readouterr().out == "cat\n"
    out = tmp_path / "run"
    assert (
        main(["pretrain", "--quiet", "--out", str(out), *TINY_PRETRAIN, "train.max_steps=2"]) == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "Mia",
                "--prompt",
                "3 plus",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["Mia", "3 plus"]


def test_world_command_writes_inspectable_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w"
    assert main(["world", "--out", str(out), "n_docs=50", "seed=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n_train"] and {"text", "kind"} <= set(rows[0])
    fails(capsys, "world", "--out", str(out))  # never overwrites


def test_validation_split_too_small_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "small.txt").write_text("tiny held-out text")
    err = pretrain_fails(capsys, tmp_path / "run", f"data.val_inputs={tmp_path}/small.txt")
    assert "validation split" in err


def test_failed_run_empties_the_existing_empty_folder_it_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "small.txt").write_text("tiny held-out text")
    fails(capsys, "pretrain", "--quiet", "--out", str(out), *TINY_PRETRAIN,
          f"data.val_inputs={tmp_path}/small.txt")  # fmt: skip
    assert out.is_dir() and not any(out.iterdir())


def test_output_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("mine")
    assert "is not a folder" in fails(capsys, "world", "--out", str(f))
    assert "is not a folder" in fails(capsys, "tokenizer", "train", "--out", str(f))
    assert f.read_text() == "mine"


def test_bare_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_multi_process_launch_needs_torchrun_and_a_stage_that_shares_its_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert "start multi-process runs with torchrun" in pretrain_fails(capsys, tmp_path / "r")
    err = fails(capsys, "best-of-n", "--out", str(tmp_path / "bon"))
    assert "WORLD_SIZE=2" in err and "pretrain, sft, reward, dpo, ppo or grpo" in err
    assert not (tmp_path / "bon").exists()
    err = fails(capsys, "reward", "score", "--model", str(tmp_path / "rm"), "--data", "x.jsonl")
    assert "`lmforge reward score` runs in one process" in err


def test_fill_mask_shows_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "enc"
    tiny = [*TINY_PRETRAIN, "train.max_steps=3"]
    assert main(["pretrain", "--arch", "encoder", "--quiet", "--out", str(out), *tiny]) == 0
    capsys.readouterr()
    assert main(["fill-mask", "--model", str(out), "--top-k", "3", "Mia had a [MASK] ball."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].count("'") >= 6  # three quoted candidates
    assert "an encoder cannot generate" in fails(
        capsys, "generate", "--model", str(out), "--prompt", "x"
    )


def test_generate_with_an_encoder_decoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t5"
    tiny = [*TINY_PRETRAIN, "train.max_steps=3"]
    assert main(["pretrain", "--arch", "encoder-decoder", "--quiet", "--out", str(out), *tiny]) == 0
    capsys.readouterr()
    args = ["generate", "--model", str(out), "--prompt", "Mia had a", "--max-new-tokens", "4"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "Mia had a"
