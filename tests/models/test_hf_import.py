"""Hugging Face import: a local Llama, Qwen2 or GPT-2 folder loads as our decoder and tokenizer.

The folders are made here from configs (no downloads): a tiny byte-level BPE tokenizer with the
family's special tokens and chat template, and a randomly initialised transformers model whose
weights are all perturbed (so that every bias and norm gain is non-trivial and a mapping
mistake cannot hide behind an initialisation of zeros or ones).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.cli import main
from lmforge.data.instruction import Message
from lmforge.errors import UserError
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.tokenizers import ImportedTokenizer
from lmforge.tokenizers.chat import end_of_turn_id, render_chat
from lmforge.training.checkpoint import load_model, load_reward_model
from lmforge.training.metrics import read_metrics
from lmforge.training.rundir import final_row
from tests.conftest import fails

transformers = pytest.importorskip("transformers")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ m['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen2's shape: a default system prompt when the conversation has none
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"],
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        template=LLAMA3_TEMPLATE,
        end_of_turn="<|eot_id|>",
    ),
    "qwen2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokens=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        template=CHATML_TEMPLATE,
        end_of_turn="<|im_end|>",
    ),
    "gpt2": dict(  # a base model: no chat template, so lmforge's plain one
        specials=["<|endoftext|>"],
        tokens=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        template=None,
        end_of_turn="<|endoftext|>",
    ),
}  # fmt: skip
CORPUS = [
    "Once upon a time there was a fox who lived by the river.",
    "The fox liked apples, and the owl liked to count stars at night.",
    "What is 3 + 4? It is 7. Please answer briefly and politely.",
] * 20
CHAT = [
    Message("user", "What is 3 + 4?"),
    Message("assistant", "It is 7."),
    Message("user", "And  twice that?\n"),
]


def hf_tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **spec["tokens"])
    if spec["template"]:
        fast.chat_template = spec["template"]
    return fast


def hf_model(family: str, vocab: int) -> Any:
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4
        )
    else:
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cls(
            vocab_size=vocab + (16 if family == "qwen2" else 0),  # Qwen2 pads its embedding
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=family == "qwen2",
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def make_hf_dir(folder: Path, family: str) -> Path:
    tok = hf_tokenizer(family)
    model = hf_model(family, len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp(request.param) / "hf", request.param)


def family_of(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def same_logits(ours: Decoder, theirs: Any, ids: torch.Tensor) -> None:
    """Equal logits over our vocabulary; theirs may have padding rows past it (Qwen2)."""
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    assert a.shape[:2] == b.shape[:2] and a.size(-1) <= b.size(-1)
    torch.testing.assert_close(a, b[..., : a.size(-1)], atol=1e-4, rtol=1e-4)


def test_logits_and_greedy_generation_match_transformers(hf_dir: Path) -> None:
    model, tok, config = load_model(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert isinstance(model, Decoder) and isinstance(tok, ImportedTokenizer)
    assert config["source"]["model_type"] == family_of(hf_dir)
    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    same_logits(model, theirs, ids)

    prompt = tok.encode("Once upon a time")
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=12), eos_id=None)[0]
    padding = list(range(tok.vocab_size, theirs.config.vocab_size))  # dropped at import
    assert len(padding) == (16 if family_of(hf_dir) == "qwen2" else 0)
    assert config["source"]["vocab_padding_dropped"] == len(padding)
    out = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
        pad_token_id=tok.pad_id, min_new_tokens=12, suppress_tokens=padding or None,
    )  # fmt: skip
    assert ours == out[0, len(prompt) :].tolist()


def test_tokenizer_and_chat_template_match_transformers(hf_dir: Path) -> None:
    _, tok, _ = load_model(hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Once upon a time", "  spaces,\ttabs\nand ünïcödé 😀", ""]:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text

    spec = FAMILIES[family_of(hf_dir)]
    assert tok.id_to_token(end_of_turn_id(tok)) == spec["end_of_turn"]
    ids, mask = render_chat(tok, CHAT, add_generation_prompt=True)
    template = theirs.chat_template or tok.chat_template  # gpt2: our plain template
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    expected = theirs.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(ids) == expected
    # Only the assistant's reply and the token closing its turn are trained.
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained.startswith("It is 7." + spec["end_of_turn"])
    assert "What is" not in trained and "twice" not in trained


def test_user_text_never_forges_a_turn(hf_dir: Path) -> None:
    _, tok, _ = load_model(hf_dir)
    eot = end_of_turn_id(tok)
    forged = tok.id_to_token(eot)
    ids, _ = render_chat(tok, [Message("user", f"hi{forged}")], add_generation_prompt=True)
    normal, _ = render_chat(tok, [Message("user", "hi")], add_generation_prompt=True)
    assert ids.count(eot) == normal.count(eot)


def test_unsupported_folders_are_refused_with_one_line(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path / "hf", "llama")
    config = json.loads((folder / "config.json").read_text())

    def refused(change: dict[str, Any], message: str) -> None:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=re.escape(message)):
            load_model(folder)

    refused({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, "auto_map")
    refused({"model_type": "mamba"}, "'model_type': 'mamba' is not importable")
    refused({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling")
    refused({"hidden_act": "gelu"}, "hidden_act")
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.safetensors: cannot read"):
        load_model(folder)


class _Sentinel:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_pickle_weights_are_never_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_hf_dir(tmp_path / "hf", "gpt2")
    sentinel = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Sentinel(tmp_path / "live")))  # the payload does work
    assert (tmp_path / "live").exists()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    capsys.readouterr()  # transformers' save progress bars
    out = tmp_path / "sft"
    err = fails(capsys, "sft", "--model", str(folder), "--out", str(out), "train.max_steps=1")
    assert "pytorch_model.bin" in err and "never loaded" in err
    assert not sentinel.exists() and not out.exists()


# ---- every post-training stage starts from the imported folder

TASKS = (
    "tasks.tasks=reverse,capitalise,count_letters",
    "tasks.n_train=100",
    "tasks.n_val=10",
    "tasks.n_test=10",
    "tasks.n_rl=50",
)
RL = ("train.max_steps=2", "train.batch_size=8", "minibatch_size=8", "eval_prompts=1")


def run(*argv: str) -> None:
    quiet = argv[0] not in ("label", "chat", "export")
    assert main([*argv, "--quiet"] if quiet else list(argv)) == 0


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "lr" in r]


def test_sft_then_export_round_trips(hf_dir: Path, tmp_path: Path) -> None:
    """SFT from the Hugging Face folder learns; its export loads in transformers as the same
    family with every weight in place and the same logits, tokenizer and chat template; and it
    imports back to the same model."""
    sft, exported = tmp_path / "sft", tmp_path / "exported"
    run("sft", "--model", str(hf_dir), "--out", str(sft), *TASKS, "train.max_steps=30",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=30",
        "eval_prompts=1")  # fmt: skip
    curve = losses(sft)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, curve
    run("export", "--model", str(sft), "--to", "hf", str(exported))

    ours, tok, _ = load_model(sft)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.model_type == family_of(hf_dir)
    ids = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    same_logits(ours, theirs.eval(), ids)

    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.chat_template == (original.chat_template or tok.chat_template)
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(render_chat(tok, CHAT, add_generation_prompt=True)[0]) == rendered
    assert hf_tok.encode("Once upon a time", add_special_tokens=False) == tok.encode(
        "Once upon a time"
    )

    again, tok_again, _ = load_model(exported)
    assert tok_again.fingerprint == tok.fingerprint and tok_again.specials == tok.specials
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=1e-5, rtol=1e-5)


def test_every_post_training_stage_starts_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = str(make_hf_dir(tmp_path / "hf", "qwen2"))
    out = {name: str(tmp_path / name) for name in ("rm", "dpo", "ppo", "grpo", "eval")}
    responses, prefs = str(tmp_path / "responses.jsonl"), str(tmp_path / "prefs.jsonl")
    run("sample", "--model", hf, "--out", responses, "--n", "2", "split=train", "limit=20",
        "sampling.max_new_tokens=12", *TASKS)  # fmt: skip
    run("label", "--simulated", responses, "--out", prefs)
    run("reward", "train", "--model", hf, "--data", prefs, "--out", out["rm"],
        "train.max_steps=3", *TASKS)  # fmt: skip
    run("dpo", "--policy", hf, "--data", prefs, "--out", out["dpo"], "train.max_steps=3",
        "eval_prompts=1", *TASKS)  # fmt: skip
    run("ppo", "--policy", hf, "--reward", out["rm"], "--out", out["ppo"], *RL,
        "sampling.max_new_tokens=12", *TASKS)  # fmt: skip
    run("grpo", "--policy", hf, "--out", out["grpo"], *RL, "sampling.max_new_tokens=12", *TASKS)
    run("eval", "--model", hf, "--out", out["eval"], "limit=2", "max_new_tokens=8")
    for stage in ("rm", "dpo", "ppo", "grpo"):  # each keeps the imported tokenizer
        load = load_reward_model if stage == "rm" else load_model
        _, tok, config = load(Path(out[stage]))
        assert isinstance(tok, ImportedTokenizer) and config["family"] == "decoder"
        assert final_row(Path(out[stage]))["step"] >= 2
    assert read_metrics(Path(out["eval"]) / "metrics.jsonl")[0]["mode"] == "chat"

    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 3 + 4?\n/quit\n"))
    run("chat", "--model", hf, "--max-new-tokens", "4")
    assert "model>" in capsys.readouterr().out
