"""`lmforge export --to hf`: a trained tiny decoder loads in transformers and behaves like ours.

Checked against `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` on the exported folder:
every weight in place, fp32 logits, greedy generations, tokenizer ids (every tokenizer algo) and
the chat template. The models are pretrained for 60 steps (a few seconds): random-init greedy
decoding is full of near-ties that float rounding could flip.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from lmforge import config as C
from lmforge.cli import main
from lmforge.data.instruction import Message
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.hf import export_hf
from lmforge.models.transformer import TransformerConfig
from lmforge.tokenizers import Tokenizer, train_tokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat
from lmforge.training.checkpoint import load_model
from lmforge.training.pretrain import PretrainConfig, pretrain
from tests.conftest import TINY_PRETRAIN, fails

transformers = pytest.importorskip("transformers")

FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
}
TEXTS = [
    "Once upon a time there was a fox.",
    "  two leading spaces,\ttabs\nand\n\nnewlines  ",
    "ünïcödé, 中文, emoji 😀 and a ▁ mark ▁▁ twice",
    "specials inline <|user|>hi<|end_of_turn|><|eos|>",
    "",
]
CHAT = [
    Message("system", "You answer briefly."),
    Message("user", "What is 3 + 4?"),
    Message("assistant", "7"),
    Message("user", "And  twice that?\n"),
]
SHAPES = {  # grouped-query heads both times: n_kv_head < n_head
    "tied": ["model.n_head=4", "model.n_kv_head=2"],
    "untied": ["model.n_head=4", "model.n_kv_head=1", "model.tie_embeddings=false"],
}


def pretrained(root: Path, *overrides: str) -> Path:
    steps = ("train.max_steps=60", "train.eval_every=60", "train.ckpt_every=60")
    cfg = C.load(PretrainConfig, None, [*TINY_PRETRAIN, *steps, *overrides])
    pretrain(cfg, root / "model", progress=False)
    return root / "model"


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained model folder and, beside it, `hf/` written by the CLI."""
    model_dir = pretrained(tmp_path_factory.mktemp(request.param), *SHAPES[request.param])
    out = model_dir.parent / "hf"
    assert main(["export", "--model", str(model_dir), "--to", "hf", str(out)]) == 0
    return model_dir


def hf_model(out: Path) -> Any:
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


def hf_ids(out: Any) -> list[int]:
    """Token ids from `apply_chat_template`, whether it returns a list or a BatchEncoding."""
    return list(out["input_ids"] if isinstance(out, dict | transformers.BatchEncoding) else out)


def test_weights_and_logits(exported: Path) -> None:
    ours, tok, _ = load_model(exported)
    out = exported.parent / "hf"
    assert {p.name for p in out.iterdir()} == FILES
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not ours.cfg.tie_embeddings)  # noqa: SIM118
    hf = hf_model(out)
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads
    if ours.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = torch.tensor([tok.encode(t)[:40] for t in ("Once upon a time " * 9, "3 + 4 = 7. " * 9)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)


def test_greedy_generation(exported: Path) -> None:
    ours, tok, _ = load_model(exported)
    hf = hf_model(exported.parent / "hf")
    stops = {tok.eos_id, end_of_turn_id(tok)}  # generation_config.json stops at either
    lengths = []
    for prompt in ["Once upon a time", "The word", "3 + 4 =", "A fox"]:
        ids = tok.encode(prompt)
        mine = generate(ours, [ids], SamplingConfig(max_new_tokens=12), eos_id=None)[0]
        cut = next((i + 1 for i, t in enumerate(mine) if t in stops), len(mine))
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
        assert theirs[0, len(ids) :].tolist() == mine[:cut], prompt
        lengths.append(cut)
    assert max(lengths) >= 5, lengths  # the comparison covered real continuations


def test_tokenizer_and_chat_template(exported: Path) -> None:
    _, tok, _ = load_model(exported)
    check_tokenizer(tok, exported.parent / "hf")
    gen = transformers.GenerationConfig.from_pretrained(exported.parent / "hf")
    assert (gen.bos_token_id, gen.pad_token_id) == (tok.bos_id, tok.pad_id)
    assert set(gen.eos_token_id) == {end_of_turn_id(tok), tok.eos_id}


@pytest.mark.parametrize("algo", ["bpe", "wordpiece", "unigram", "char"])
def test_every_tokenizer_algo(algo: str, tmp_path: Path) -> None:
    corpus = [t for t in TEXTS if t] * 5 + [f"line {i}: the fox sat on the mat" for i in range(50)]
    tok = train_tokenizer(algo, corpus, 600)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    export_hf(Decoder(cfg), tok, tmp_path / "hf")
    check_tokenizer(tok, tmp_path / "hf")


def check_tokenizer(tok: Tokenizer, out: Path) -> None:
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.pad_id)
    assert hf_tok.eos_token_id == end_of_turn_id(tok)
    config = json.loads((out / "config.json").read_text())
    assert hf_tok.model_max_length == config["max_position_embeddings"]
    for text in TEXTS:  # no bos/eos added on either side
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    for turns, prompt in ((CHAT[:2], True), (CHAT, True), (CHAT[:3], False)):
        want = render_chat(tok, turns, add_generation_prompt=prompt)[0]
        got = hf_tok.apply_chat_template(
            messages[: len(turns)], tokenize=True, add_generation_prompt=prompt
        )
        assert hf_ids(got) == want


# ---------------------------------------------------------------------------------------------
# The CLI's refusals: one `error:` line, exit code 2, nothing written


def test_cli_refuses_other_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = pretrained(tmp_path / "enc", "arch=encoder", "train.max_steps=2")
    err = fails(capsys, "export", "--model", str(encoder), "--to", "hf", str(tmp_path / "out"))
    assert str(encoder) in err and "encoder" in err
    # A reward model's folder: a decoder trunk plus a scalar head, marked in its config.
    reward = tmp_path / "reward"
    shutil.copytree(encoder, reward)
    config = json.loads((reward / "config.json").read_text()) | {"family": "decoder"}
    (reward / "config.json").write_text(json.dumps({**config, "head": "reward"}))
    err = fails(capsys, "export", "--model", str(reward), "--to", "hf", str(tmp_path / "out"))
    assert str(reward) in err and "reward model" in err
    err = fails(capsys, "export", "--model", str(encoder), "--to", "onnx", str(tmp_path / "out"))
    assert "onnx" in err
    assert not (tmp_path / "out").exists()


def test_cli_existing_out_dir(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = exported.parent / "taken"
    out.mkdir(exist_ok=True)
    (out / "mine.txt").write_text("x")
    args = ("export", "--model", str(exported), "--to", "hf", str(out))
    err = fails(capsys, *args)
    assert str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    # The model folder itself (or a folder holding it) is never a valid OUT_DIR.
    err = fails(capsys, "export", "--model", str(exported), "--to", "hf", str(exported.parent))
    assert "holds the model folder" in err
    assert (exported / "model.safetensors").is_file()


def test_cli_without_transformers(
    exported: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    out = exported.parent / "no-hf"
    err = fails(capsys, "export", "--model", str(exported), "--to", "hf", str(out))
    assert "pip install 'lmforge[hf]'" in err
    assert not out.exists()
