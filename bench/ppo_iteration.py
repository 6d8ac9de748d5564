"""One PPO iteration (rollout + update): lmforge vs Hugging Face TRL's PPOTrainer, same shape.

Runs in an environment holding both (TRL 0.11.4, the last release with the original
`PPOTrainer.step` API, needs transformers 4.44; see bench/README.md):

    python bench/ppo_iteration.py [--repeats 5] [--quick]

Work per iteration, the same on both sides: 64 world chat prompts (the first 64 of the `rl`
split, rendered with the chat template, `world_tokenizer` of bench/_common.py), one sampled
response each of exactly 32 tokens (temperature 1, top-p 1, no end token: every row has the
same length), a fixed reward per response (drawn once, seeded), then 4 PPO epochs of 4
minibatches of 16: policy log-probs, reference log-probs, values, KL-shaped per-token rewards,
GAE (gamma 1, lambda 0.95), whitened advantages, clipped surrogate (0.2) and clipped value loss
(0.2), AdamW lr 3e-5.

Models: the default `TransformerConfig()` decoder (4 layers, 128 wide) on the world tokenizer,
random init. lmforge: `Decoder` policy, a frozen copy as reference, and a separate critic
(`RewardModel(copy of the policy)`, its per-token value head) — the stage's default. TRL:
`AutoModelForCausalLMWithValueHead` around `LlamaForCausalLM` holding the same weights
(`llama_from_decoder`), its own reference copy; its value head shares the policy trunk, so TRL
does one forward/backward per minibatch where lmforge does two (policy and critic): the ratio
below favours TRL on that count.

Timing: `--repeats` iterations per side, interleaved, after one untimed warm-up iteration each;
reported per side the median iteration time and its split into generation and update. fp32.
Results: bench/results/ppo_iteration.json (`--quick`: 1 repeat, 8-token responses).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import _common as common
import torch

from lmforge.data.world_tasks import TaskConfig, make_splits
from lmforge.feedback.sampling import prompt_ids, task_prompts
from lmforge.generation.generate import SamplingConfig, generate
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.rl import gae, kl_penalty, masked_whiten, token_rewards
from lmforge.training.optim import OptimConfig, build_optimizer
from lmforge.training.ppo import PPOConfig, ppo_update
from lmforge.training.rollout import build_rollout, response_logprobs

TARGET = 3.0
B, MB, EPOCHS, LR = 64, 16, 4, 3e-5


def lmforge_iteration(policy, reference, critic, optimizer, cfg, prompts, scores, new, seed):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new, seed=seed)
    responses = generate(policy, prompts, sampling, eos_id=None, pad_id=0)
    t_gen = time.perf_counter() - t0
    ro = build_rollout(prompts, responses, [False] * B, [""] * B, [None] * B, 0)  # type: ignore[list-item]
    with torch.no_grad():
        old, _ = response_logprobs(policy, ro)
        ref, _ = response_logprobs(reference, ro)
        values = ro.gather(critic.values(ro.ids)) * ro.mask
        rewards = token_rewards(scores, kl_penalty(old, ref) * ro.mask, cfg.kl_coef, ro.mask)
        adv, returns = gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, ro.mask)
    ppo_update(cfg, policy, critic, optimizer, ro, old, values, adv, returns, seed)
    return t_gen, time.perf_counter() - t0


def main() -> None:
    p = common.base_parser(__doc__, default_repeats=5)
    args = p.parse_args()
    new = 8 if args.quick else 32
    repeats = 1 if args.quick else args.repeats
    common.setup(args.threads, args.seed)

    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOTrainer
    from trl import PPOConfig as TRLConfig

    tok = common.world_tokenizer(args.seed)
    shape = TransformerConfig(vocab_size=tok.vocab_size)
    examples = make_splits(TaskConfig())["rl"]
    prompts = [p for p in prompt_ids(tok, task_prompts(examples, "rl")) if len(p) <= 80][:B]
    scores = torch.randn(B, generator=torch.Generator().manual_seed(args.seed))

    # lmforge
    policy = Decoder(shape).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = RewardModel(copy.deepcopy(policy)).train()
    cfg = PPOConfig(
        policy="-", reward="gold", minibatch_size=MB, ppo_epochs=EPOCHS, kl_coef=0.05,
        optim=OptimConfig(lr=LR, weight_decay=0.0, warmup_steps=0, schedule="constant"),
    )  # fmt: skip
    optimizer = build_optimizer(policy, cfg.optim, also=[(critic, LR)])

    # TRL, the same weights
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
        cliprange_value=0.2, vf_coef=0.5, seed=args.seed, log_with=None,
    )  # fmt: skip
    trainer = PPOTrainer(trl_cfg, trl_policy, trl_ref, hf_tok)
    queries = [torch.tensor(x) for x in prompts]
    gen_kwargs: dict[str, Any] = dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new,
        min_new_tokens=new, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip

    def trl_iteration() -> tuple[float, float]:
        t0 = time.perf_counter()
        responses = trainer.generate(
            queries, return_prompt=False, batch_size=B, remove_padding=False, **gen_kwargs
        )
        t_gen = time.perf_counter() - t0
        assert all(len(r) == new for r in responses), "TRL responses must all have the length"
        trainer.step(queries, list(responses), list(scores))
        return t_gen, time.perf_counter() - t0

    times: dict[str, list[tuple[float, float]]] = {"lmforge": [], "trl": []}
    run = {
        "lmforge": lambda i: lmforge_iteration(
            policy, reference, critic, optimizer, cfg, prompts, scores, new, i
        ),
        "trl": lambda i: trl_iteration(),
    }
    for name in run:  # warm-up
        run[name](0)
    for i in range(repeats):
        for name in run:
            times[name].append(run[name](i + 1))
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
    ratio = result["trl"]["iteration_s"] / result["lmforge"]["iteration_s"]
    rows = [
        [n, r["iteration_s"], r["generation_s"], r["update_s"], f"{r['generation_share']:.0%}"]
        for n, r in result.items()
    ]
    print(common.table(["side", "iteration s", "generation s", "update s", "gen share"], rows))
    print(f"lmforge is {ratio:.2f}x TRL (target {TARGET}x)")
    common.write_json(
        common.result_path("ppo_iteration", args.quick),
        {
            "benchmark": "ppo_iteration",
            "machine": common.machine_info(),
            "trl": __import__("trl").__version__,
            "batch": B, "minibatch": MB, "epochs": EPOCHS, "response_tokens": new,
            "repeats": repeats,
            "results": result,
            "speedup": ratio,
            "target": TARGET,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
