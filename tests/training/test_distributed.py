"""torchrun with DDP and FSDP2 on 2 CPU processes (gloo): the same losses as 1 process with the
same global batch, one writer of the run folder, checkpoints that resume with another world size,
and a failing or hung rank that ends the whole job instead of leaving the others waiting.

Each multi-process run costs a few seconds of start-up (every process imports torch), so the
runs are few and tiny, and shared by the tests through module fixtures."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import config as C
from lmforge import distributed
from lmforge.data.world import World
from lmforge.data.world_tasks import FLAWS, TaskConfig, make_splits
from lmforge.distributed import ALL_ROWS, DistConfig, batch_share
from lmforge.errors import UserError
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.transformer import TransformerConfig
from lmforge.training.dpo import DPOConfig, dpo
from lmforge.training.grpo import GRPOConfig, grpo
from lmforge.training.metrics import read_metrics
from lmforge.training.ppo import PPOConfig, ppo
from lmforge.training.pretrain import PretrainConfig, pretrain, resume_config
from lmforge.training.reward import RewardConfig, reward
from lmforge.training.rundir import load_resume_config, restart_resume, run_dir
from lmforge.training.sft import SFTConfig, sft
from tests.conftest import TINY_PRETRAIN, TINY_SFT

# fp32 and no dropout: two processes must then reproduce one process's arithmetic to ~1e-7.
# grad_accum=2 gives each of the 2 ranks one whole micro-batch per step.
PRETRAIN = (
    *TINY_PRETRAIN,
    "train.dtype=float32",
    "train.max_steps=8",
    "train.eval_every=4",
    "train.ckpt_every=4",
    "train.grad_accum=2",
    "train.dist.timeout_s=60",
)
# grad_accum=1: each rank takes half the rows of every micro-batch. Packed SFT rows hold
# different numbers of reply tokens, so each rank's loss must be weighed by its share of them.
SFT = (*TINY_SFT, "train.dtype=float32", "train.max_steps=8", "train.eval_every=4")
SFT_NO_GENERATION = ("eval_prompts=0",)  # exact-match eval samples text: slow, and not at stake
TOLERANCE = 1e-5


def _env(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).parents[2])
    return {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*argv: str) -> None:
    """`torchrun --standalone --nproc-per-node 2 -m lmforge ARGV --quiet`, as a user types it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "lmforge", *argv, "--quiet"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def start_ranks(*argv: str) -> list[subprocess.Popen[str]]:
    """`python ARGV` as ranks 0 and 1 of one job, with the environment torchrun would give
    them but no torchrun agent: a test of failures needs the ranks to stop on their own (the
    agent would stop the survivors itself), and the others save the agent's start-up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]


def run_two_ranks(*argv: str) -> None:
    """`python -m lmforge ARGV --quiet` as the 2 ranks of one job; both must succeed."""
    ranks = start_ranks("-m", "lmforge", *argv, "--quiet")
    errors = [p.communicate(timeout=180)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]


def rows(out: Path) -> dict[int, dict]:
    """Training rows of a metrics file by step; a step logged twice (by two ranks) fails."""
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in logged]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r for r in logged}


def assert_same_run(a: Path, b: Path, steps: range, keys: tuple[str, ...]) -> None:
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == sorted(rb) == list(steps)
    for step in steps:
        for key in keys:
            if key in ra[step] or key in rb[step]:
                assert ra[step][key] == pytest.approx(rb[step][key], abs=TOLERANCE), (step, key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    pretrain(C.load(PretrainConfig, None, PRETRAIN), out, progress=False)
    return out


@pytest.fixture(scope="module")
def two_processes(one_process: Path) -> Path:
    out = one_process.parent / "two"
    torchrun("pretrain", "--out", str(out), *PRETRAIN)
    return out


def test_two_processes_pretrain_like_one_with_the_same_global_batch(
    one_process: Path, two_processes: Path
) -> None:
    assert_same_run(one_process, two_processes, range(1, 9), ("loss", "grad_norm", "val_loss"))
    assert rows(two_processes)[8]["tokens"] == rows(one_process)[8]["tokens"] == 8 * 16 * 64
    assert_same_weights(one_process, two_processes)
    states = sorted(p.name for p in (two_processes / "state").iterdir())
    assert states == ["step_00000004", "step_00000008"]


def assert_same_weights(a: Path, b: Path) -> None:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < TOLERANCE


def resume_in_one_process(run: Path, out: Path, *overrides: str) -> Path:
    """A copy of the 8-step `run` resumed in this process from its step 4 checkpoint."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "state" / "step_00000008")  # as if the job had died after step 4
    pretrain(resume_config(out, overrides=overrides), out, resume=True, progress=False)
    assert (out / "state" / "step_00000008").is_dir()  # trained again from step 4
    return out


def test_checkpoint_of_two_processes_resumes_in_one(
    one_process: Path, two_processes: Path, tmp_path: Path
) -> None:
    out = resume_in_one_process(two_processes, tmp_path / "resumed")
    assert_same_run(one_process, out, range(1, 9), ("loss", "grad_norm", "val_loss"))


def sft_args(base: Path) -> list[str]:
    return [f"model={base}", *SFT, *SFT_NO_GENERATION]


@pytest.fixture(scope="module")
def fine_tuned(two_processes: Path) -> Path:
    """One process's SFT of the 2-process base model: also the model the pairwise stages
    start from."""
    out = two_processes.parent / "sft_one"
    sft(C.load(SFTConfig, None, sft_args(two_processes)), out, progress=False)
    return out


def test_two_processes_fine_tune_like_one(
    two_processes: Path, fine_tuned: Path, tmp_path: Path
) -> None:
    run_two_ranks("sft", "--out", str(tmp_path / "two"), *sft_args(two_processes))
    keys = ("loss", "grad_norm", "val_loss", "padding")
    assert_same_run(fine_tuned, tmp_path / "two", range(1, 9), keys)


FSDP = ("train.dist.strategy=fsdp",)


@pytest.fixture(scope="module")
def sharded(one_process: Path) -> Path:
    out = one_process.parent / "fsdp"
    torchrun("pretrain", "--out", str(out), *PRETRAIN, *FSDP)
    return out


def test_fsdp_two_processes_pretrain_like_one(one_process: Path, sharded: Path) -> None:
    assert_same_run(one_process, sharded, range(1, 9), ("loss", "grad_norm", "val_loss"))
    assert_same_weights(one_process, sharded)  # gathered from both ranks' shards
    state = sharded / "state" / "step_00000008"
    assert json.loads((state / "state.json").read_text())["layout"] == "sharded"
    shards = sorted(p.name for p in (state / "shards").iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards)  # one per rank
    # safetensors and JSON only: no pickled index of the shards (DCP's default `.metadata`)
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files


def test_fsdp_checkpoint_of_two_processes_resumes_in_one_with_activation_checkpointing(
    one_process: Path, sharded: Path, tmp_path: Path
) -> None:
    # recomputing activations changes no number, so a resume may switch it on
    ac = "train.dist.activation_checkpointing=true"
    out = resume_in_one_process(sharded, tmp_path / "resumed", ac)
    assert_same_run(one_process, out, range(1, 9), ("loss", "grad_norm", "val_loss"))
    assert len(list((out / "state" / "step_00000008" / "shards").iterdir())) == 1  # 1 rank


def test_a_resume_cannot_switch_between_ddp_and_fsdp(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(sharded, out)
    cfg = resume_config(out, overrides=["train.dist.strategy=ddp"])
    with pytest.raises(UserError, match="cannot change train.dist.strategy"):
        pretrain(cfg, out, resume=True, progress=False)


def test_fsdp_two_processes_fine_tune_like_one_with_activation_checkpointing(
    two_processes: Path, fine_tuned: Path, tmp_path: Path
) -> None:
    ac = "train.dist.activation_checkpointing=true"
    run_two_ranks("sft", "--out", str(tmp_path / "two"), *sft_args(two_processes), *FSDP, ac)
    keys = ("loss", "grad_norm", "val_loss", "padding")
    assert_same_run(fine_tuned, tmp_path / "two", range(1, 9), keys)


# Pairs of the world's short-prompt tasks: the canonical answer against a rude or rambling one,
# with soft labels that differ from pair to pair (so a pair's label must stay with the pair).
PAIR_TASKS = TaskConfig(tasks=("reverse", "capitalise"), n_train=12, n_val=4, n_test=4)
# grad_accum=1: each rank takes half the pairs of every micro-batch, and its mean pair loss
# must weigh as half of the micro-batch's.
PAIRWISE = (
    "train.dtype=float32",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.eval_every=2",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.dist.timeout_s=60",
    "optim.warmup_steps=1",
)


@pytest.fixture(scope="module")
def pairs(fine_tuned: Path) -> tuple[Path, Path]:
    world, rng = World.from_seed(PAIR_TASKS.seed), random.Random(0)
    files = []
    for split in ("train", "val"):
        records = [
            {
                "prompt": ex.prompt,
                "chosen": ex.answer,
                "rejected": FLAWS[("impolite", "rambling")[i % 2]](ex, rng, world),
                "label": 0.6 + 0.05 * (i % 7),
            }
            for i, ex in enumerate(make_splits(PAIR_TASKS)[split])
        ]
        path = fine_tuned.parent / f"pairs_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files.append(path)
    return files[0], files[1]


def assert_reward_like_one(
    trunk: Path, pairs: tuple[Path, Path], out: Path, strategy: str = "ddp"
) -> None:
    args = [f"model={trunk}", f"data={pairs[0]}", f"val_data={pairs[1]}", "world_check=false"]
    args += PAIRWISE
    reward(C.load(RewardConfig, None, args), out / "one", progress=False)
    two = ("--out", str(out / "two"), *args, f"train.dist.strategy={strategy}")
    run_two_ranks("reward", "train", *two)
    keys = ("loss", "grad_norm", "val_loss", "val_acc")
    assert_same_run(out / "one", out / "two", range(1, 5), keys)
    assert rows(out / "one")[4]["loss"] != rows(out / "one")[1]["loss"]  # it trained


# FSDP shards the same blocks in every stage; pretraining and SFT test it by default
SLOW_FSDP = pytest.param("fsdp", marks=pytest.mark.slow)


@pytest.mark.parametrize("strategy", ["ddp", SLOW_FSDP])
def test_two_processes_train_a_reward_model_like_one(
    fine_tuned: Path, pairs: tuple[Path, Path], tmp_path: Path, strategy: str
) -> None:
    assert_reward_like_one(fine_tuned, pairs, tmp_path, strategy)


@pytest.mark.parametrize("strategy", ["ddp", SLOW_FSDP])
def test_two_processes_train_a_reward_model_on_a_trunk_with_an_untied_lm_head(
    pairs: tuple[Path, Path], tmp_path: Path, strategy: str
) -> None:
    # the reward head reads hidden states, so that LM head gets no gradient: DDP must not wait
    # for one (it would fail the second step)
    args = [*PRETRAIN, "model.tie_embeddings=false", "train.max_steps=2"]
    pretrain(C.load(PretrainConfig, None, args), tmp_path / "base", progress=False)
    assert_reward_like_one(tmp_path / "base", pairs, tmp_path, strategy)


@pytest.mark.parametrize("strategy", ["ddp", SLOW_FSDP])
def test_two_processes_optimise_dpo_like_one(
    fine_tuned: Path, pairs: tuple[Path, Path], tmp_path: Path, strategy: str
) -> None:
    args = [
        f"policy={fine_tuned}",
        f"data={pairs[0]}",
        f"val_data={pairs[1]}",
        "eval_prompts=0",
        "optim.lr=1e-3",
        *PAIRWISE,
    ]
    dpo(C.load(DPOConfig, None, args), tmp_path / "one", progress=False)
    run_two_ranks("dpo", "--out", str(tmp_path / "two"), *args, f"train.dist.strategy={strategy}")
    keys = ("loss", "grad_norm", "val_loss", "val_acc", "val_margin")
    assert_same_run(tmp_path / "one", tmp_path / "two", range(1, 5), keys)
    assert rows(tmp_path / "one")[4]["loss"] != rows(tmp_path / "one")[1]["loss"]  # it trained


# PPO and GRPO on the gold reward of the world's short tasks, with rollouts of 8 responses
# in minibatches of 4: each rank samples 4 of them and holds a varying part of each minibatch.
RL = (
    "reward=gold",
    "tasks.tasks=reverse,capitalise",
    "tasks.n_rl=20",
    "eval_prompts=0",
    "sampling.max_new_tokens=8",
    "minibatch_size=4",
    "optim.lr=1e-3",
    "train.dtype=float32",
    "train.batch_size=8",
    "train.max_steps=2",
    "train.ckpt_every=1",
    "train.dist.timeout_s=60",
)
RL_KEYS = ("score", "gold", "kl", "response_len", "stop_rate", "policy_loss", "entropy")
RL_KEYS += ("clipfrac", "approx_kl", "value_loss", "explained_var", "kl_term", "solved_groups")


def rl_rows(out: Path) -> dict[int, dict]:
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "score" in r]
    assert len({r["step"] for r in logged}) == len(logged), "an iteration logged twice"
    return {r["step"]: r for r in logged}


def assert_same_rl_run(a: Path, b: Path) -> None:
    ra, rb = rl_rows(a), rl_rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2]
    for step in ra:
        assert ra[step].keys() == rb[step].keys()
        for key in RL_KEYS:
            if key in ra[step]:
                assert ra[step][key] == pytest.approx(rb[step][key], abs=TOLERANCE), (step, key)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(bool((wa[k] - wb[k]).abs().max() < 1e-5) for k in wa)


@pytest.mark.parametrize(
    ("stage", "cls", "args"),
    [
        ("ppo", PPOConfig, ("ppo_epochs=2", "critic=shared")),
        ("ppo", PPOConfig, ("ppo_epochs=2", "critic=separate")),
        ("grpo", GRPOConfig, ("group_size=4",)),
    ],
)
def test_two_processes_optimise_a_policy_with_rl_like_one(
    stage: str, cls: type, args: tuple[str, ...], fine_tuned: Path, tmp_path: Path
) -> None:
    """Rollouts are a function of (seed, iteration, row), advantages are whitened with the
    whole batch's statistics, minibatch gradients and logged numbers are reduced over ranks:
    2 processes follow 1 process's run, and their checkpoint resumes in 1 process."""
    argv = [f"policy={fine_tuned}", *RL, *args]
    train = ppo if stage == "ppo" else grpo
    train(C.load(cls, None, argv), tmp_path / "one", progress=False)
    run_two_ranks(stage, "--out", str(tmp_path / "two"), *argv)
    assert_same_rl_run(tmp_path / "one", tmp_path / "two")
    one = rl_rows(tmp_path / "one")
    assert one[2]["policy_loss"] != one[1]["policy_loss"] and 0 < one[2]["response_len"] <= 8
    assert same_weights(
        tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors"
    )
    # the 2-process run's checkpoint of iteration 1 (weights, optimizer; for PPO the critic and
    # the KL coefficient) resumes in 1 process and repeats iteration 2
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "state" / "step_00000002")
    train(load_resume_config(cls, resumed), resumed, resume=True, progress=False)
    assert_same_rl_run(tmp_path / "one", resumed)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("arch", ["encoder", "encoder-decoder"])
def test_the_other_families_pretrain_like_one_process(
    arch: str, strategy: str, tmp_path: Path
) -> None:
    # grad_accum=1: ranks split every micro-batch's rows; masked tokens differ per row
    args = [*PRETRAIN, "train.grad_accum=1", f"arch={arch}"]
    pretrain(C.load(PretrainConfig, None, args), tmp_path / "one", progress=False)
    torchrun("pretrain", "--out", str(tmp_path / "two"), *args, f"train.dist.strategy={strategy}")
    assert_same_run(tmp_path / "one", tmp_path / "two", range(1, 9), ("loss", "val_loss"))


@pytest.mark.slow
def test_fsdp_checkpoint_of_one_process_resumes_in_two(one_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*PRETRAIN, *FSDP, "train.max_steps=4"]
    pretrain(C.load(PretrainConfig, None, args), out, progress=False)
    torchrun("pretrain", "--out", str(out), "--resume", "train.max_steps=8")
    assert_same_run(one_process, out, range(1, 9), ("loss", "grad_norm", "val_loss"))
    assert len(list((out / "state" / "step_00000008" / "shards").iterdir())) == 2  # 2 ranks


def test_activation_checkpointing_keeps_the_gradients_and_the_parameter_names() -> None:
    # the encoder-decoder has both kinds of block; the decoder is tested in the resume above
    cfg = TransformerConfig(vocab_size=40, n_layer=2, n_embd=16, n_head=2, max_seq_len=16)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = EncoderDecoder(cfg)
        dist = DistConfig(activation_checkpointing=ac)
        wrapped = distributed.wrap(model, torch.device("cpu"), dist, torch.float32)
        wrapped(x, x).square().mean().backward()
        grads.append({k: v.grad for k, v in model.named_parameters()})
        # the wrappers' names stay out of state dicts, so checkpoints are the same files
        assert all("checkpoint" not in k for k in model.state_dict())
    assert all("checkpoint" in k for k in grads[1] if k.startswith(("encoder.", "decoder.")))
    plain, recomputed = grads[0].values(), grads[1].values()
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed, strict=True))


# Train a tiny encoder-decoder for 3 steps, then generate: under FSDP, generation calls the
# model's encode/decode and each block's memory_kv apart from forward, which must gather weights.
SEQ2SEQ = """
import json, sys, torch
import torch.nn.functional as F
from lmforge import distributed
from lmforge.distributed import DistConfig
from lmforge.generation.generate import SamplingConfig, generate_seq2seq
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.transformer import TransformerConfig
from lmforge.training.optim import OptimConfig, build_optimizer

device = distributed.init(DistConfig(), torch.device("cpu"))
torch.manual_seed(0)
cfg = TransformerConfig(vocab_size=50, n_layer=2, n_embd=16, n_head=2, max_seq_len=32)
dist = DistConfig(strategy="fsdp", activation_checkpointing=True)
model = distributed.wrap(EncoderDecoder(cfg), device, dist, torch.float32)
optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
g = torch.Generator().manual_seed(1)
src, tgt = torch.randint(0, 50, (4, 10), generator=g), torch.randint(0, 50, (4, 8), generator=g)
losses = []
for _ in range(3):
    loss = F.cross_entropy(model(src, tgt).flatten(0, 1), tgt.roll(-1, 1).flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
sampling = SamplingConfig(max_new_tokens=5, temperature=0.0)
out = generate_seq2seq(model, [[1, 2, 3, 4], [5, 6, 7]], sampling, start_id=1, eos_id=None)
if distributed.is_main():
    with open(sys.argv[1], "w") as f:
        json.dump({"losses": losses, "out": out}, f)
distributed.shutdown()
"""


@pytest.mark.slow
def test_fsdp_encoder_decoder_trains_and_generates_like_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-c", SEQ2SEQ, str(one)], env=_env(), check=True)
    ranks = start_ranks("-c", SEQ2SEQ, str(two))
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], errors[0][-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["out"] == b["out"]
    assert a["losses"] == pytest.approx(b["losses"], abs=TOLERANCE)


@pytest.mark.parametrize(
    ("batch_size", "grad_accum", "world"), [(8, 1, 1), (8, 4, 2), (8, 2, 4), (6, 3, 3), (4, 1, 4)]
)
def test_batch_share_covers_every_row_of_a_step_exactly_once(
    batch_size: int, grad_accum: int, world: int
) -> None:
    shares = [batch_share(batch_size, grad_accum, world, r) for r in range(world)]
    taken = [
        (m, row)
        for s in shares
        for m in s.micro
        for row in range(batch_size)[s.rows]  # rows of micro-batch m this rank trains
    ]
    assert sorted(taken) == [(m, r) for m in range(grad_accum) for r in range(batch_size)]
    if grad_accum % world == 0:  # whole micro-batches: each rank keeps the configured size
        assert all(s.rows == ALL_ROWS and len(s.micro) == grad_accum // world for s in shares)


def test_a_batch_that_cannot_be_shared_is_refused() -> None:
    with pytest.raises(UserError, match="cannot be split over 4 processes"):
        batch_share(6, 3, 4, 0)


# Rank 1 of a 2-process pretraining run fails in its second step: it raises, or hangs.
FAULTY_RANK = """
import os, sys, time
import lmforge.training.pretrain as stage
from lmforge.cli import main

real, calls = stage.token_loss, [0]

def token_loss(logits, targets):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        if sys.argv[1] == "hang":
            time.sleep(600)
        raise RuntimeError("injected fault in rank 1")
    return real(logits, targets)

stage.token_loss = token_loss
sys.exit(main(sys.argv[2:]))
"""


def start_faulty_ranks(fault: str, out: Path, timeout_s: int) -> list[subprocess.Popen[str]]:
    args = [*TINY_PRETRAIN, "train.grad_accum=2", f"train.dist.timeout_s={timeout_s}"]
    return start_ranks("-c", FAULTY_RANK, fault, "pretrain", "--quiet", "--out", str(out), *args)


def test_a_rank_raising_mid_step_ends_every_rank_promptly(
    one_process: Path, tmp_path: Path
) -> None:
    # one_process: the tokenizer and token shards are cached, so the ranks start training fast
    out = tmp_path / "run"
    ranks = start_faulty_ranks("raise", out, timeout_s=120)
    t0 = time.monotonic()
    errors = [p.communicate(timeout=60)[1] for p in ranks]
    # far below the 120 s timeout: the survivor learns of the failure from the closed
    # connection, not by waiting the timeout out
    assert time.monotonic() - t0 < 40
    assert ranks[1].returncode != 0 and "injected fault in rank 1" in errors[1]
    assert ranks[0].returncode != 0 and "injected fault" not in errors[0], errors[0][-2000:]
    assert not out.exists()  # a fresh run that failed before its first checkpoint is removed


def test_a_hung_rank_fails_the_job_after_the_collective_timeout_and_is_named(
    one_process: Path, tmp_path: Path
) -> None:
    ranks = start_faulty_ranks("hang", tmp_path / "run", timeout_s=2)
    try:
        _, err = ranks[0].communicate(timeout=60)
        assert ranks[0].returncode == 2  # one error line, as for any bad run
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: rank 0: a collective timed out"), err[-2000:]
        assert "rank(s) 1 did not arrive" in last
        assert ranks[1].poll() is None  # still asleep: rank 0 gave up on it
    finally:
        for p in ranks:
            p.kill()
            p.communicate()


# Rank 1 of a torchrun job fails in its 6th step (after the checkpoint of step 4), only in the
# job's first attempt: torchrun --max-restarts 1 then restarts both ranks.
FAILS_ONCE = """
import os, sys
import lmforge.training.pretrain as stage
from lmforge.cli import main

real, calls = stage.token_loss, [0]

def token_loss(logits, targets):
    calls[0] += 1
    first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    if os.environ["RANK"] == "1" and calls[0] == 6 and first_attempt:
        raise RuntimeError("injected fault in rank 1")
    return real(logits, targets)

stage.token_loss = token_loss
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(
    two_processes: Path, tmp_path: Path
) -> None:
    script, out = tmp_path / "fails_once.py", tmp_path / "run"
    script.write_text(FAILS_ONCE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "1", str(script), "pretrain", "--quiet", "--out", str(out)]
    done = subprocess.run(
        [*cmd, *PRETRAIN], env=_env(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "injected fault in rank 1" in done.stderr  # the first attempt did fail
    assert f"torchrun restart 1: resuming from the checkpoint of step 4 in {out}" in done.stdout
    # the same run as an uninterrupted one: steps 5-8 were trained again from step 4's state
    assert_same_run(two_processes, out, range(1, 9), ("loss", "grad_norm", "val_loss"))


def test_a_restarted_stage_resumes_only_in_the_folder_of_its_first_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    with run_dir(out, fresh=True, overwrite=False):  # the first attempt starts afresh
        (out / "metrics.jsonl").write_text("")
    assert restart_resume(out, False, False) == (False, False)  # first attempt: flags as given
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # no complete checkpoint: start over what the first attempt left
    (out / "state" / ".tmp-step_00000004").mkdir(parents=True)  # a half-written one
    assert restart_resume(out, False, False) == (False, True)
    (out / "state" / "step_00000004").mkdir()
    (out / "state" / "step_00000004" / "state.json").write_text('{"step": 4}')
    # resume, and --overwrite may not wipe what the first attempt trained
    assert restart_resume(out, False, True) == (True, False)
    # another job's folder (one the first attempt refused): the flags as given, refused again
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")
    assert restart_resume(out, False, False) == (False, False)
