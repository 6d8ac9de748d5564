"""PPO, GRPO and DPO learn on the world from the tiny SFT model, resume exactly, and refuse bad
input with one line; best-of-n and the eval report what alignment is judged by."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.cli import main
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.errors import UserError
from lmforge.feedback.sampling import SampleConfig, sample_responses, world_prompts
from lmforge.feedback.simulated import Annotator, label_simulated
from lmforge.generation.generate import SamplingConfig
from lmforge.training.checkpoint import load_model
from lmforge.training.dpo import DPOConfig, dpo
from lmforge.training.grpo import GRPOConfig, grpo
from lmforge.training.metrics import read_metrics
from lmforge.training.ppo import PPOConfig, ppo
from lmforge.training.reward import RewardConfig, reward
from lmforge.training.rundir import final_row
from tests.conftest import lmforge_cmd, resume_to_end, run_to_end, sigkill_at_checkpoint

# Short-prompt tasks the tiny model partly answers (long stories do not fit its context).
TASKS = (
    "tasks.tasks=reverse,capitalise,count_letters",
    "tasks.n_train=300",
    "tasks.n_val=10",
    "tasks.n_test=20",
    "tasks.n_rl=100",
)
WORLD = TaskConfig(tasks=("reverse", "capitalise", "count_letters"), n_val=10, n_test=20)
# Small, fast RL settings for the tiny model: short answers, small batches.
RL = (
    *TASKS,
    "sampling.max_new_tokens=16",
    "train.batch_size=32",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.ckpt_every=1000",
    "eval_prompts=2",
    "optim.lr=3e-4",
)


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def rl_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "score" in r]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def own(sft_tuned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy's own samples (4 per prompt), judged by simulated annotators: plain
    (rm/) and with a strong preference for longer answers (rm_long/), each a reward model."""
    root = tmp_path_factory.mktemp("own")
    model, tok, _ = load_model(sft_tuned)
    for split, limit in (("train", 150), ("val", 30)):
        cfg = SampleConfig(n=4, split=split, limit=limit, tasks=WORLD, sampling=SAMPLING)
        records = sample_responses(model, tok, world_prompts(cfg), cfg, progress=False)
        for name, annotator in (("", Annotator(noise=0.1)), ("_long", LONG)):
            write(root / f"{split}{name}.jsonl", label_simulated(records, annotator))
    for name in ("", "_long"):
        cfg = C.load(
            RewardConfig,
            None,
            [
                f"model={sft_tuned}",
                f"data={root / f'train{name}.jsonl'}",
                f"val_data={root / f'val{name}.jsonl'}",
                *TASKS,
                "train.max_steps=150",
                "train.eval_every=150",
                "optim.lr=1e-3",
            ],
        )
        reward(cfg, root / f"rm{name}", progress=False)
    return root


SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=16)
LONG = Annotator(noise=0.1, length_bias=3.0)


def test_reward_model_learns_from_the_policys_own_samples(own: Path) -> None:
    last = final_row(own / "rm")
    print({k: v for k, v in last.items() if k.startswith("val_") and k != "val_calibration"})
    # Pairs of the policy's own answers on unseen prompts; many are near-ties (two right
    # answers), so the noise ceiling is low. Where the gold rewards differ, the model agrees.
    assert last["val_acc"] >= last["val_ceiling"] - 0.15, last
    assert last["val_gold_agreement"] >= 0.75, last


# The shared value head's loss also moves the policy's trunk: at this learning rate, with the
# default value_coef=0.5, the KL runs away (20+ nats) and the score stops rising; TRL's 0.1 learns.
@pytest.mark.parametrize("critic", [("critic=separate",), ("critic=shared", "value_coef=0.1")])
def test_ppo_raises_the_reward_model_score_of_its_samples(
    critic: tuple[str, ...], own: Path, sft_tuned: Path, tmp_path: Path
) -> None:
    args = [f"policy={sft_tuned}", f"reward_model={own / 'rm'}", *RL, "train.max_steps=30"]
    cfg = C.load(PPOConfig, None, [*args, *critic])
    ppo(cfg, tmp_path / "ppo", progress=False)
    rows = rl_rows(tmp_path / "ppo")
    assert [r["step"] for r in rows] == list(range(1, 31))
    before, after = mean(rows[:10], "score"), mean(rows[-10:], "score")
    print(f"ppo reward-model score of rollouts: {before:.3f} -> {after:.3f}")
    assert after > before + 0.1
    assert 0 < rows[-1]["kl"] < 10
    for key in ("gold", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_var"):
        assert key in rows[-1]
    assert (tmp_path / "ppo" / "model.safetensors").is_file()


def test_ppo_without_kl_hacks_a_length_biased_reward_model_and_is_warned(
    own: Path, sft_tuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = C.load(
        PPOConfig,
        None,
        [f"policy={sft_tuned}", f"reward_model={own / 'rm_long'}", *RL, "kl_coef=0"]
        + ["train.max_steps=30", "diagnostics.window=20", "sampling.max_new_tokens=40"]
        + ["no_eos_penalty=0"],
    )
    ppo(cfg, tmp_path / "hacked", progress=True)
    rows = rl_rows(tmp_path / "hacked")
    early, late = rows[:10], rows[-10:]
    print(
        {
            k: (round(mean(early, k), 3), round(mean(late, k), 3))
            for k in ("score", "gold", "response_len")
        }
    )
    assert mean(late, "score") > mean(early, "score")
    assert mean(late, "gold") < mean(early, "gold")
    warned = [w for r in rows for w in r.get("warnings", [])]
    assert "reward_hacking" in warned
    assert "reward hacking: over the last 20 iterations" in capsys.readouterr().err


def test_grpo_raises_the_reward_model_score(own: Path, sft_tuned: Path, tmp_path: Path) -> None:
    cfg = C.load(
        GRPOConfig,
        None,
        [f"policy={sft_tuned}", f"reward_model={own / 'rm'}", "reward=model", *RL]
        + ["group_size=8", "train.max_steps=30", "minibatch_size=16"],
    )
    grpo(cfg, tmp_path / "grpo", progress=False)
    rows = rl_rows(tmp_path / "grpo")
    before, after = mean(rows[:10], "score"), mean(rows[-10:], "score")
    print(f"grpo reward-model score of rollouts: {before:.3f} -> {after:.3f}")
    assert after > before + 0.1
    assert all(0 <= r["solved_groups"] <= 1 for r in rows)


def world_prefs(split: str, n_per_task: int) -> list[dict]:
    """Simulated-annotator pairs over the canonical answer and its flawed versions."""
    world, rng = World.from_seed(0), random.Random(split)
    tasks = TaskConfig(tasks=WORLD.tasks, n_train=n_per_task, n_val=10, n_test=20)
    records = []
    for i, ex in enumerate(make_splits(tasks)[split]):
        responses = [ex.answer] + [FLAWS[f](ex, rng, world) for f in ("rambling", "impolite")]
        records.append(
            {
                "id": f"{split}:{i}",
                "messages": [{"role": "user", "content": ex.prompt}],
                "responses": responses,
                "task": ex.task,
                "answer": ex.answer,
            }
        )
    return label_simulated(records, Annotator(noise=0.1))


def test_dpo_learns_held_out_preferences(sft_tuned: Path, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", world_prefs("train", 40))
    val = write(tmp_path / "val.jsonl", world_prefs("val", 10))
    cfg = C.load(
        DPOConfig,
        None,
        [
            f"policy={sft_tuned}",
            f"data={train}",
            f"val_data={val}",
            *TASKS,
            "eval_prompts=2",
            "train.max_steps=60",
            "train.eval_every=30",
            "train.batch_size=8",
            "optim.lr=1e-3",
        ],
    )
    last = dpo(cfg, tmp_path / "dpo", progress=False)
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    first_eval = next(r for r in rows if "val_acc" in r)
    print({k: v for k, v in last.items() if k.startswith("val_")})
    assert last["val_acc"] >= 0.8  # the annotators' ceiling here is ~0.9
    assert last["val_margin"] > 0
    assert last["val_loss"] < 0.69  # below log 2: better than the reference itself
    assert first_eval["step"] == 30 and "val_gold" in last and "val_kl" in last


def test_ipo_is_selected_from_the_loss_table(sft_tuned: Path, tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", world_prefs("train", 10))
    cfg = C.load(
        DPOConfig,
        None,
        [f"policy={sft_tuned}", f"data={train}", "loss=ipo", *TASKS, "eval_prompts=0"]
        + ["train.max_steps=4", "train.eval_every=4"],
    )
    dpo(cfg, tmp_path / "ipo", progress=False)
    saved = json.loads((tmp_path / "ipo" / "config.json").read_text())
    assert saved["objective"] == "dpo-ipo"
    with pytest.raises(UserError, match="loss"):
        C.load(DPOConfig, None, [f"policy={sft_tuned}", f"data={train}", "loss=kto"])


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_sigkill_then_resume_reproduces_every_iteration(
    critic: str, sft_tuned: Path, tmp_path: Path
) -> None:
    args = [
        f"--policy={sft_tuned}",
        "reward=gold",
        f"critic={critic}",
        *RL,
        "train.max_steps=12",
        "train.ckpt_every=3",
        "minibatch_size=16",
        "ppo_epochs=2",
        "optim.lr=3e-4",
    ]
    ref, out, cmd = tmp_path / "ref", tmp_path / "killed", lmforge_cmd("ppo")
    run_to_end(cmd, ref, args)
    sigkill_at_checkpoint(cmd, out, args, 6)
    assert len(rl_rows(out)) < 12, "the run finished before SIGKILL; nothing was tested"
    resume_to_end(cmd, out)
    keys = ("score", "kl", "policy_loss", "value_loss", "entropy", "response_len")
    got = [[r[k] for k in keys] for r in rl_rows(out)]
    want = [[r[k] for k in keys] for r in rl_rows(ref)]
    assert [r["step"] for r in rl_rows(out)] == list(range(1, 13))
    # exact float equality: policy, critic (or value head), optimizer, RNG, prompt position
    assert got == want


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ppo", "--policy", "{sft}"], "'reward_model': reward=model needs a reward model"),
        (["ppo", "--policy", "{sft}", "--reward", "{sft}"], "not a reward model"),
        (["grpo", "--policy", "{base}"], "is a base model; fine-tune it first"),
        (["grpo", "--policy", "{sft}", "group_size=3"], "'group_size': must divide"),
        (["dpo", "--policy", "{sft}", "--data", "{bad}"], "bad.jsonl:1: field 'rejected'"),
        (["ppo", "--policy", "{sft}", "reward=gold", "prompts={missing}"], "no such file"),
    ],
)
def test_bad_alignment_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    sft_tuned: Path,
    sft_base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "same", "rejected": "same"}\n')
    paths = {"sft": sft_tuned, "base": sft_base, "bad": bad, "missing": tmp_path / "nope.jsonl"}
    argv = [a.format(**paths) for a in args] + ["--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_best_of_n_picks_better_answers_than_one_sample(
    own: Path, sft_tuned: Path, tmp_path: Path
) -> None:
    argv = ["best-of-n", "--policy", str(sft_tuned), "--reward", str(own / "rm"), "--n", "4"]
    argv += ["--out", str(tmp_path / "bon"), *TASKS, "split=val", "sampling.max_new_tokens=16"]
    assert main(argv) == 0
    row = json.loads((tmp_path / "bon" / "metrics.jsonl").read_text())
    print({k: v for k, v in row.items() if k != "config"})
    assert row["n_prompts"] == 30
    assert row["gold"] > row["gold_n1"]  # the reward model agrees with gold on most pairs
    assert row["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert len((tmp_path / "bon" / "answers.jsonl").read_text().splitlines()) == 30


def test_eval_reports_reward_score_and_kl_to_the_reference(
    own: Path, sft_tuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--model", str(sft_tuned), "--reward", str(own / "rm"), "--reference"]
    argv += [str(sft_tuned), "--out", str(tmp_path / "ev"), "--quiet", "limit=3", "samples=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reward model" in out and "gold (sampled)" in out
    row = json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())
    assert row["kl"] == 0.0  # the model against itself
    assert 0 <= row["gold"] <= 1 and 0 <= row["gold_greedy"] <= 1
