"""The reward model learns simulated annotators' preferences up to their noise ceiling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.cli import main
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.feedback.simulated import Annotator, label_simulated
from lmforge.training.metrics import read_metrics
from lmforge.training.reward import RewardConfig, reward

TASKS = TaskConfig(n_train=60, n_val=20, n_test=20)


def world_responses(
    split: str, flaws: tuple[str, ...] = ("wrong", "rambling", "impolite")
) -> list[dict]:
    """responses.jsonl records whose responses are the canonical answer and its three flaws,
    as a policy's samples would be, without needing a trained policy."""
    world, rng = World.from_seed(0), random.Random(split)
    out = []
    for i, ex in enumerate(make_splits(TASKS)[split]):
        responses = [ex.answer] + [FLAWS[f](ex, rng, world) for f in flaws]
        out.append(
            {
                "id": f"{split}:{i}",
                "messages": [{"role": "user", "content": ex.prompt}],
                "responses": responses,
                "task": ex.task,
                "answer": ex.answer,
            }
        )
    return out


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(sft_tuned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    (root / "base").symlink_to(sft_tuned)  # the trunk: the tiny SFT model
    annotator = Annotator(noise=0.1)
    # Style only (the canonical answer, rambling, rude): what a tiny trunk can judge. Telling
    # right from wrong answers needs a trunk that knows the tasks (see the README's figures).
    style = ("rambling", "impolite")
    write(root / "train.jsonl", label_simulated(world_responses("train", style), annotator))
    write(root / "val.jsonl", label_simulated(world_responses("val", style), annotator))
    return root


def test_reward_model_reaches_the_noise_ceiling_on_style_preferences(setup: Path) -> None:
    cfg = C.load(
        RewardConfig,
        None,
        [
            f"model={setup / 'base'}",
            f"data={setup / 'train.jsonl'}",
            f"val_data={setup / 'val.jsonl'}",
            "tasks.n_train=60",
            "tasks.n_val=20",
            "tasks.n_test=20",
            "train.max_steps=300",
            "train.eval_every=300",
            "train.log_every=10",
            "optim.lr=1e-3",
        ],
    )
    last = reward(cfg, setup / "rm", progress=False)
    assert 0.85 < last["val_ceiling"] < 1.0  # 10% of judgments are coin flips
    print({k: v for k, v in last.items() if k.startswith(("val_", "test_"))})
    assert last["val_acc"] >= 0.8, last
    assert last["val_acc"] >= last["val_ceiling"] - 0.08, last
    assert last["val_gold_agreement"] >= 0.85, last
    rows = read_metrics(setup / "rm" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[1]["loss"]
    assert sum(b[2] for b in last["val_calibration"]) == rows[0]["n_val"]


def test_reward_score_cli(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (setup / "rm").exists():
        pytest.skip("needs the trained reward model of the test above")
    assert (
        main(["reward", "score", "--model", str(setup / "rm"), "--data", str(setup / "val.jsonl")])
        == 0
    )
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc >= 0.8
    assert (
        main(
            [
                "reward",
                "score",
                "--model",
                str(setup / "rm"),
                "--prompt",
                "What is 2 plus 2?",
                "--response",
                "4",
                "--response",
                "4. Stop wasting my time.",
            ]
        )
        == 0
    )
    scores = [json.loads(x)["reward"] for x in capsys.readouterr().out.splitlines()]
    assert len(scores) == 2 and scores[0] > scores[1]


def test_label_simulated_cli_writes_pairs_with_annotator_settings(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write(tmp_path / "responses.jsonl", world_responses("val")[:5])
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--simulated", str(src), "--out", str(out), "noise=0.2"]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 5 * 6  # all pairs of 4 distinct responses
    assert all(
        r["annotator"]["noise"] == 0.2 and r["annotator"]["kind"] == "simulated" for r in recs
    )
    assert all(r["chosen"] != r["rejected"] for r in recs)


@pytest.mark.parametrize(
    ("family", "likelihood"), [("decoder", False), ("decoder", True), ("encoder", False)]
)
def test_packed_and_padded_pairs_give_the_same_rewards(family: str, likelihood: bool) -> None:
    import torch

    from lmforge.data.instruction import Message
    from lmforge.data.preference import Preference
    from lmforge.models import FAMILIES
    from lmforge.models.reward import RewardModel
    from lmforge.models.transformer import TransformerConfig
    from lmforge.tokenizers import train_tokenizer
    from lmforge.training.reward import collate_pairs, render_pairs

    torch.manual_seed(0)
    tok = train_tokenizer("bpe", ["What is 3 plus 4? It is 7. Stop wasting my time."] * 5, 300)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, max_seq_len=64)
    model = RewardModel(FAMILIES[family](cfg), likelihood).eval()  # type: ignore[arg-type]
    prefs = [
        Preference((Message("user", "What is 3 plus " + "4" * k + "?"),), "7" * (k + 1), "It is 7.")
        for k in range(6)
    ]
    pairs = render_pairs(tok, prefs, 64)
    padded, _ = collate_pairs(pairs, range(6))
    packed, _ = collate_pairs(pairs, range(6), "packed", 64, causal=family == "decoder")
    assert packed[0].size(0) < padded[0].size(0), "nothing was packed; the test would be vacuous"
    with torch.no_grad():
        assert torch.allclose(model(*padded), model(*packed), atol=1e-5)


def test_the_likelihood_term_is_the_trunks_summed_log_prob_of_the_reply() -> None:
    """With the head zeroed, the reward is exactly the decoder's log-likelihood of the reply
    (the last turn only), each sequence scored alone, in both layouts: with replies cut by the
    block, packed rows whose sequences best fit reorders, and a prompt holding an assistant turn
    of its own. The head's share then adds on top."""
    import torch

    from lmforge.data.instruction import Message
    from lmforge.data.preference import Preference
    from lmforge.models import FAMILIES
    from lmforge.models.reward import RewardModel
    from lmforge.models.transformer import TransformerConfig
    from lmforge.objectives.lm import token_logprobs
    from lmforge.tokenizers import train_tokenizer
    from lmforge.training.reward import collate_pairs, render_pairs

    torch.manual_seed(0)
    tok = train_tokenizer("bpe", ["What is 3 plus 4? It is 7. Stop wasting my time."] * 5, 300)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, max_seq_len=64)
    model = RewardModel(FAMILIES["decoder"](cfg), likelihood=True).eval()  # type: ignore[arg-type]
    torch.nn.init.zeros_(model.head.weight)
    ask = Message("user", "What is 3 plus 4?")
    prefs = [
        Preference((ask,), "It is 7. " * 4, "7"),  # long: packed rows start with it
        Preference((ask,), "It is 7. " * 12, "It is 8."),  # the reply alone is past the block
        Preference((ask, Message("assistant", "It is 7."), ask), "Stop wasting my time.", "7"),
        Preference((Message("user", "What is 3 plus " + "4" * 9 + "?"),), "7" * 3, "It is 7."),
    ]
    block = 48
    pairs = render_pairs(tok, prefs, block)
    assert pairs.n_truncated >= 1
    seqs = pairs.chosen + pairs.rejected
    replies = pairs.chosen_reply + pairs.rejected_reply
    # the third pair's chosen side: its reply's tokens and <|end_of_turn|>, none of the prompt's
    n_reply = len(tok.encode_batch(["Stop wasting my time."], allow_special=False)[0]) + 1
    assert replies[2] == [False] * (len(seqs[2]) - n_reply) + [True] * n_reply
    with torch.no_grad():
        want = []
        for ids, reply in zip(seqs, replies, strict=True):
            x = torch.tensor([ids])
            lp = token_logprobs(model.trunk(x)[:, :-1], x[:, 1:])[0]
            want.append(float((lp * torch.tensor(reply[1:], dtype=torch.float32)).sum()))
        want_t = torch.tensor(want)
        assert (want_t < 0).all() and want_t.std() > 0
        x, _ = collate_pairs(pairs, range(4), "packed", block)
        last = x[1]
        assert last is not None and not bool((last.diff() > 0).all()), "packing kept the order"
        for layout in ("padded", "packed"):
            x, _ = collate_pairs(pairs, range(4), layout, block)
            torch.testing.assert_close(model(*x), want_t, atol=1e-4, rtol=1e-5, msg=layout)
        model.lik_scale.fill_(0.5)
        model.head.bias.fill_(2.0)
        x, _ = collate_pairs(pairs, range(4))
        torch.testing.assert_close(model(*x), 2.0 + 0.5 * want_t, atol=1e-4, rtol=1e-5)
        with pytest.raises(ValueError, match="reply"):
            model(*x[:2])
