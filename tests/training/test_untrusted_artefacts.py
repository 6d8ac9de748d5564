"""A pickle file crafted to run code is never unpickled, wherever lmforge loads a model or state.

Each case plants the payload (raw pickle, and the zip that `torch.save` writes) where a model
folder, resume state, reward model or tokenizer would hold its files, runs the command that
loads it, and checks one `error:` line, exit code 2, and that the payload's file was not made.
Hugging Face folders: tests/models/test_hf_import.py::test_pickle_weights_are_never_loaded.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.cli import main
from lmforge.training.checkpoint import load_model, load_reward_model, load_state
from lmforge.training.manifest import MANIFEST, write_manifest
from lmforge.training.optim import OptimConfig, build_optimizer
from tests.conftest import fails
from tests.data.test_reader_fuzz import DELETE, _mutate, data_or_user_error, json_values


class _Payload:
    """Unpickling this creates `path`: a stand-in for any code a malicious file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def plant(path: Path, sentinel: Path, kind: str) -> None:
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    else:
        torch.save({"weights": _Payload(sentinel)}, path)


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    for kind in ("pickle", "torch"):
        plant(tmp_path / "x", tmp_path / kind, kind)
        if kind == "pickle":
            pickle.loads((tmp_path / "x").read_bytes())
        else:
            torch.load(tmp_path / "x", weights_only=False)
        assert (tmp_path / kind).exists()


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_crafted_pickles_are_refused_everywhere(
    tiny_decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    sentinel = tmp_path / "pwned"

    def refused(*argv: str, expect: str) -> None:
        err = fails(capsys, *argv)
        assert expect in err, err
        assert not sentinel.exists(), argv

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_decoder, tmp_path / name))

    # A model folder whose weights are only a pickle file, or a pickle under the real name.
    folder = copy("model")
    (folder / "model.safetensors").unlink()
    plant(folder / "pytorch_model.bin", sentinel, kind)
    refused("generate", "--model", str(folder), "--prompt", "a", expect="never loaded")
    # the manifest check names the file before anything parses it
    plant(folder / "model.safetensors", sentinel, kind)
    refused("generate", "--model", str(folder), "--prompt", "a", expect="model.safetensors")
    refused(
        "sft", "--model", str(folder), "--out", str(tmp_path / "sft"), expect="model.safetensors"
    )
    assert not (tmp_path / "sft").exists()

    # Resume state: the optimizer file and the model weights of the newest checkpoint.
    for name in ("optim.safetensors", "model.safetensors"):
        run = copy(f"run-{name}")
        (step,) = (run / "state").iterdir()
        plant(step / name, sentinel, kind)
        # the manifest check passes over the damaged checkpoint with a warning naming the file,
        # then refuses in one error line: there is no valid one left
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--out", str(run), "--resume"])
        assert e.value.code == 2
        warning, error = capsys.readouterr().err.strip().splitlines()
        assert warning.startswith(f"warning: {step / name}") and error.startswith("error: ")
        assert "no valid checkpoint" in error and not sentinel.exists()

    # A reward model (what ppo, grpo, best-of-n and `reward score` load).
    rm = copy("rm")
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "head": "reward"}))
    write_manifest(rm, json.loads((rm / MANIFEST).read_text())["files"])  # a valid folder again
    plant(rm / "model.safetensors", sentinel, kind)
    score = ("reward", "score", "--model", str(rm), "--prompt", "a", "--response", "b")
    refused(*score, expect="model.safetensors")

    # A tokenizer, alone or inside a model folder.
    tok = copy("tok") / "tokenizer"
    plant(tok / "tokenizer.json", sentinel, kind)
    refused("tokenizer", "encode", "--tokenizer", str(tok), "a", expect="invalid JSON")
    refused("generate", "--model", str(tok.parent), "--prompt", "a", expect="tokenizer.json")


# ---- mangled JSON beside the weights: the same one-line refusal, never a crash

edits = st.lists(
    st.tuples(st.integers(0, 300), st.one_of(json_values, st.just(DELETE))), min_size=1, max_size=2
)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(config_edits=edits, state_edits=edits)
def test_mangled_model_configs_and_resume_state_are_refused_with_one_line(
    tiny_decoder: Path, config_edits: list[Any], state_edits: list[Any]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(shutil.copytree(tiny_decoder, Path(d) / "m"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(_mutate(config, config_edits)))
        data_or_user_error(lambda: load_model(folder))
        data_or_user_error(lambda: load_reward_model(folder))
        (step,) = (folder / "state").iterdir()
        meta = json.loads((step / "state.json").read_text())
        (step / "state.json").write_text(json.dumps(_mutate(meta, state_edits)))
        model, _, _ = load_model(tiny_decoder)
        optimizer = build_optimizer(model, OptimConfig())
        data_or_user_error(lambda: load_state(step, model, optimizer))
