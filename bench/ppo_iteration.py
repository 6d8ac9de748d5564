"""One PPO iteration (rollout + update): lmforge vs Hugging Face TRL's PPOTrainer, same shape.

Runs in an environment holding both (TRL 0.11.4, the last release with the original
`PPOTrainer.step` API, needs transformers 4.44; see bench/README.md):

    python bench/ppo_iteration.py [--repeats 5] [--quick]

Work per iteration, the same on every side: 64 world chat prompts (the first 64 of the `rl`
split, rendered with the chat template, `world_tokenizer` of bench/_common.py), one sampled
response each of exactly 32 tokens (temperature 1, top-p 1, no end token: every row has the
same length), a fixed reward per response (drawn once, seeded), then 4 PPO epochs of 4
minibatches of 16: policy log-probs, reference log-probs, values, KL-shaped per-token rewards,
GAE (gamma 1, lambda 0.95), whitened advantages, clipped surrogate (0.2) and clipped value loss
(0.2), AdamW lr 3e-5.

Models: the default `TransformerConfig()` decoder (4 layers, 128 wide) on the world tokenizer,
random init, the same weights on every side. TRL: `AutoModelForCausalLMWithValueHead` around
`LlamaForCausalLM` (`llama_from_decoder`), its own reference copy; its value head shares the
policy trunk, one forward/backward per minibatch. lmforge runs twice: `lmforge_shared`
(`critic=shared`, a value head on the policy's trunk: TRL's configuration) and
`lmforge_separate` (`critic=separate`, the stage's default: a critic network of its own,
`RewardModel(copy of the policy)`, two trunk forward/backward passes per minibatch). Both run
the stage's own functions (`rollout_outputs`, `ppo_update`), whose passes pack each batch's rows
(prompt + response, block-diagonal causal mask); TRL pads them.

Timing: `--repeats` iterations per side, interleaved, after one untimed warm-up iteration each;
reported per side the median iteration time and its split into generation and update (all after
generation: the log-prob and value passes and the minibatch steps), and
each lmforge side's speed-up over TRL (TRL's median over its own). fp32. `--sides` picks a
subset (TRL needs its own environment; the lmforge sides run in the project's). On a machine
shared with other work, `--threads 1 --cpu-time` times CPU seconds instead of wall seconds.
Results: bench/results/ppo_iteration.json (`--quick`: 1 repeat, 8-token responses).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import _common as common
import torch

from lmforge.data.world_tasks import TaskConfig, make_splits
from lmforge.feedback.sampling import prompt_ids, task_prompts
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel, ValueHead
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.rl import gae, kl_penalty, masked_whiten, token_rewards
from lmforge.training.loop import TrainConfig
from lmforge.training.optim import OptimConfig, build_optimizer
from lmforge.training.ppo import PPOConfig, ppo_update, rollout_outputs
from lmforge.training.rollout import UpdateForward, build_rollout, response_logprobs

TARGET = 3.0
B, MB, EPOCHS, LR = 64, 16, 4, 3e-5
clock = time.perf_counter  # --cpu-time: time.process_time
SIDES = ("lmforge_shared", "lmforge_separate", "trl")


Iteration = Callable[[list[list[int]], torch.Tensor, int], tuple[float, float]]


def lmforge_side(policy: Decoder, critic: str, new: int) -> Iteration:
    """One lmforge iteration as the PPO stage runs it, with its own copies of the weights."""
    policy = copy.deepcopy(policy).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = PPOConfig(
        policy="-", reward="gold", critic=critic, minibatch_size=MB, ppo_epochs=EPOCHS,
        kl_coef=0.05, critic_lr=LR, train=TrainConfig(batch_size=B),
        optim=OptimConfig(lr=LR, weight_decay=0.0, warmup_steps=0, schedule="constant"),
    )  # fmt: skip
    value = (
        ValueHead(policy.cfg.n_embd, policy.cfg.init_std)
        if critic == "shared"
        else RewardModel(copy.deepcopy(policy))
    ).train()
    model = UpdateForward(policy, value)
    optimizer = build_optimizer(policy, cfg.optim, also=[(value, cfg.critic_lr)])

    def iteration(prompts: list[list[int]], scores: torch.Tensor, seed: int) -> tuple[float, float]:
        t0 = clock()
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=new, seed=seed)
        responses = generate(policy, prompts, sampling, eos_id=None, pad_id=0)
        t_gen = clock() - t0
        ro = build_rollout(prompts, responses, [False] * B, [""] * B, [None] * B, 0)  # type: ignore[list-item]
        with torch.no_grad():
            old, values = rollout_outputs(policy, value, ro, cfg)
            ref, _ = response_logprobs(reference, ro)
            rewards = token_rewards(scores, kl_penalty(old, ref) * ro.mask, cfg.kl_coef, ro.mask)
            adv, returns = gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
            adv = masked_whiten(adv, ro.mask)
        ppo_update(cfg, model, model, optimizer, ro, slice(0, B), old, values, adv, returns, seed)
        return t_gen, clock() - t0

    return iteration


def trl_side(policy: Decoder, tok: Any, seed: int, new: int) -> Iteration:
    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOTrainer
    from trl import PPOConfig as TRLConfig

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok._hf, pad_token="<|pad|>", eos_token="<|eos|>"
    )
    hf_tok.padding_side = "left"
    trl_policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        common.llama_from_decoder(policy)
    )
    trl_ref = AutoModelForCausalLMWithValueHead.from_pretrained(common.llama_from_decoder(policy))
    trl_cfg = TRLConfig(
        batch_size=B, mini_batch_size=MB, ppo_epochs=EPOCHS, learning_rate=LR, init_kl_coef=0.05,
        adap_kl_ctrl=False, kl_penalty="kl", gamma=1.0, lam=0.95, cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.5, seed=seed, log_with=None,
    )  # fmt: skip
    trainer = PPOTrainer(trl_cfg, trl_policy, trl_ref, hf_tok)
    gen_kwargs: dict[str, Any] = dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new,
        min_new_tokens=new, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip

    def iteration(prompts: list[list[int]], scores: torch.Tensor, seed: int) -> tuple[float, float]:
        queries = [torch.tensor(x) for x in prompts]
        t0 = clock()
        responses = trainer.generate(
            queries, return_prompt=False, batch_size=B, remove_padding=False, **gen_kwargs
        )
        t_gen = clock() - t0
        assert all(len(r) == new for r in responses), "TRL responses must all have the length"
        trainer.step(queries, list(responses), list(scores))
        return t_gen, clock() - t0

    return iteration


def main() -> None:
    p = common.base_parser(__doc__, default_repeats=5)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {SIDES}")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU seconds, not wall seconds: steadier on a busy machine; "
        "comparable across sides with --threads 1 only",
    )
    args = p.parse_args()
    if args.cpu_time:
        global clock
        clock = time.process_time
    new = 8 if args.quick else 32
    repeats = 1 if args.quick else args.repeats
    common.setup(args.threads, args.seed)
    sides = args.sides.split(",")
    if unknown := set(sides) - set(SIDES):
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {SIDES}")
    tok = common.world_tokenizer(args.seed)
    shape = TransformerConfig(vocab_size=tok.vocab_size)
    examples = make_splits(TaskConfig())["rl"]
    prompts = [p for p in prompt_ids(tok, task_prompts(examples, "rl")) if len(p) <= 80][:B]
    scores = torch.randn(B, generator=torch.Generator().manual_seed(args.seed))
    policy = Decoder(shape)
    run = {
        name: trl_side(policy, tok, args.seed, new)
        if name == "trl"
        else lmforge_side(policy, name.removeprefix("lmforge_"), new)
        for name in sides
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in run}
    for name in run:  # warm-up
        run[name](prompts, scores, 0)
    for i in range(repeats):
        for name in run:
            times[name].append(run[name](prompts, scores, i + 1))
            print(f"{name} iteration {i + 1}: {times[name][-1][1]:.2f} s", flush=True)

    result: dict[str, Any] = {}
    for name, ts in times.items():
        total = common.median([t for _, t in ts])
        gen = common.median([g for g, _ in ts])
        result[name] = {
            "iteration_s": total,
            "generation_s": gen,
            "update_s": total - gen,
            "generation_share": gen / total,
            "all_s": ts,
        }
    speedup = {
        name: result["trl"]["iteration_s"] / result[name]["iteration_s"]
        for name in result
        if "trl" in result and name != "trl"
    }
    rows = [
        [n, r["iteration_s"], r["generation_s"], r["update_s"], f"{r['generation_share']:.0%}"]
        for n, r in result.items()
    ]
    print(common.table(["side", "iteration s", "generation s", "update s", "gen share"], rows))
    for name, ratio in speedup.items():
        print(f"{name} is {ratio:.2f}x TRL (target {TARGET}x)")
    common.write_json(
        common.result_path("ppo_iteration", args.quick),
        {
            "benchmark": "ppo_iteration",
            "machine": common.machine_info(),
            "trl": __import__("trl").__version__ if "trl" in run else None,
            "batch": B, "minibatch": MB, "epochs": EPOCHS, "response_tokens": new,
            "repeats": repeats,
            "threads": args.threads,
            "clock": "process_time" if args.cpu_time else "perf_counter",
            "results": result,
            "speedup": speedup,
            "target": TARGET,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
