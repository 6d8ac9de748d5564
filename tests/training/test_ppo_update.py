"""PPO's update passes: the shared value head trains with the trunk, packed rows give what the
padded rows give, and the critic options are validated."""

from __future__ import annotations

import pytest
import torch

from lmforge import config as C
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder
from lmforge.models.reward import RewardModel, ValueHead
from lmforge.models.transformer import TransformerConfig
from lmforge.objectives.lm import token_logprobs
from lmforge.objectives.rl import clipped_value_loss, entropy
from lmforge.training.ppo import PPOConfig
from lmforge.training.rollout import Rollout, UpdateForward, build_rollout

CFG = TransformerConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, max_seq_len=64)


def tiny_rollout(
    prompt_lens: tuple[int, ...] = (3, 9, 5, 1, 12),
    response_lens: tuple[int, ...] = (4, 2, 7, 1, 3),
) -> Rollout:
    """Prompts and responses of uneven lengths (one response of a single token)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(1, 50, (n,), generator=g).tolist() for n in response_lens]
    B = len(prompts)
    return build_rollout(prompts, responses, [True] * B, [""] * B, [None] * B, 0)  # type: ignore[list-item]


def padded_outputs(
    policy: Decoder, critic: RewardModel | ValueHead, ro: Rollout, temperature: float
) -> tuple[torch.Tensor, ...]:
    """Log-probs, entropies and values computed the plain way, on the right-padded rows."""
    h = ro.gather(policy.hidden_states(ro.ids))  # (B, R, D)
    logits = policy.lm_head(h) / temperature
    logp = token_logprobs(logits, ro.response) * ro.mask
    shared = isinstance(critic, ValueHead)
    values = critic(h) if shared else ro.gather(critic.values(ro.ids))
    return logp, entropy(logits) * ro.mask, values * ro.mask


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_packed_rows_give_the_padded_rows_outputs(kind: str) -> None:
    torch.manual_seed(0)
    policy = Decoder(CFG)
    critic = ValueHead(32, 0.02) if kind == "shared" else RewardModel(Decoder(CFG))
    ro = tiny_rollout()
    assert ro.packed().ids.size(0) < len(ro)  # the short rows share packed rows
    logp, ent, values = UpdateForward(policy, critic)(ro, 0.7)
    assert values is not None
    want = padded_outputs(policy, critic, ro, 0.7)
    for got, expected in zip((logp, ent, values * ro.mask), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rows_of_one_length_run_unpacked_and_give_the_same_outputs() -> None:
    torch.manual_seed(0)
    policy, head = Decoder(CFG), ValueHead(32, 0.02)
    ro = tiny_rollout((6, 6, 6), (3, 3, 3))
    pk = ro.packed()
    assert pk.mask is None and pk.ids.shape == ro.ids.shape  # nothing to gain from packing
    logp, ent, values = UpdateForward(policy, head)(ro, 1.0)
    assert values is not None
    for got, expected in zip(
        (logp, ent, values), padded_outputs(policy, head, ro, 1.0), strict=True
    ):
        torch.testing.assert_close(got * ro.mask, expected * ro.mask, atol=1e-5, rtol=1e-5)


def test_the_shared_value_loss_trains_the_value_head_and_the_trunk() -> None:
    torch.manual_seed(0)
    policy, head = Decoder(CFG), ValueHead(32, 0.02)
    ro = tiny_rollout()
    _, _, values = UpdateForward(policy, head)(ro, 1.0)
    assert values is not None
    returns = torch.ones_like(values)
    loss, _ = clipped_value_loss(values, values.detach(), returns, ro.mask, clip=10.0)
    loss.backward()
    assert head.head.weight.grad is not None and head.head.weight.grad.abs().sum() > 0
    trunk_grads = [p.grad for p in [*policy.blocks.parameters(), policy.tok_emb.weight]]
    assert all(g is not None for g in trunk_grads)
    assert sum(float(g.abs().sum()) for g in trunk_grads if g is not None) > 0


def test_the_policy_loss_alone_leaves_the_value_head_untouched() -> None:
    torch.manual_seed(0)
    policy, head = Decoder(CFG), ValueHead(32, 0.02)
    logp, _, _ = UpdateForward(policy, head)(tiny_rollout(), 1.0)
    logp.sum().backward()
    assert head.head.weight.grad is None
    assert next(policy.blocks[0].mlp.parameters()).grad is not None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["critic=both"], "field 'critic': must be one of separate, shared"),
        (["critic=shared", "critic_init=reward"], "critic_init=reward needs critic=separate"),
    ],
)
def test_bad_critic_options_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        C.load(PPOConfig, None, ["policy=p", "reward=gold", *overrides])


def test_critic_separate_accepts_a_reward_model_trunk() -> None:
    cfg = C.load(
        PPOConfig, None, ["policy=p", "reward=gold", "critic=separate", "critic_init=reward"]
    )
    assert cfg.critic == "separate"


def test_a_likelihood_reward_model_scores_a_rollout_by_its_response_tokens() -> None:
    """model_rewards marks each row's response (tiny_rollout's have different starts and
    lengths), so the likelihood term is the policy-style log-prob sum of exactly those tokens."""
    from lmforge.training.rollout import model_rewards

    torch.manual_seed(0)
    rm = RewardModel(Decoder(CFG), likelihood=True).eval()
    ro = tiny_rollout()
    with torch.no_grad():
        got = model_rewards(rm, ro, batch_size=2)  # batches of rows cut from the rollout
        head = rm.head(rm.trunk.hidden_states(ro.ids).reshape(-1, 32)[ro.last_index()])
        logp = token_logprobs(ro.gather(rm.trunk(ro.ids)), ro.response) * ro.mask
    torch.testing.assert_close(got, head.squeeze(-1) + logp.sum(1), atol=1e-5, rtol=1e-5)


def test_a_critic_started_from_the_frozen_reward_model_trains() -> None:
    """critic_init=reward copies the reward model, which alignment loads frozen: the copy's
    trunk and head must be trainable (they were not: the critic never learned), and the reward
    model itself stays frozen."""
    from lmforge.training.ppo import _critic

    cfg = C.load(PPOConfig, None, ["policy=p", "reward_model=r", "critic_init=reward"])
    rm = RewardModel(Decoder(CFG), likelihood=True)
    rm.requires_grad_(False)  # as align.load_reward hands it over
    critic = _critic(cfg, Decoder(CFG), rm, torch.device("cpu"))
    assert isinstance(critic, RewardModel) and not critic.likelihood
    assert all(p.requires_grad for p in critic.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
    torch.testing.assert_close(critic.head.weight, rm.head.weight)


def test_the_update_runs_in_the_configured_precision() -> None:
    """train.dtype reaches the PPO update: under bf16 autocast the trunk's matmuls round, so
    the same minibatch step moves the weights a little differently than in fp32 (before, the
    option was recorded and ignored). The RL stages default to fp32."""
    from lmforge.training.ppo import ppo_update

    assert PPOConfig(policy="p", reward="gold").train.dtype == "float32"
    cfg = C.load(
        PPOConfig, None, ["policy=p", "reward=gold", "train.batch_size=5", "minibatch_size=5",
                          "ppo_epochs=1"],
    )  # fmt: skip
    ro = tiny_rollout()
    after = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        policy = Decoder(CFG)
        model = UpdateForward(policy, RewardModel(Decoder(CFG)))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        with torch.no_grad():
            old_logp, _, old_values = model(ro, 1.0)
        assert old_values is not None
        adv = torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(1)) * ro.mask
        ppo_update(cfg, model, model, opt, ro, slice(0, 5), old_logp, old_values, adv,
                   old_values + 1.0, 0, dtype=dtype)  # fmt: skip
        after[dtype] = policy.blocks[0].attn.qkv.weight.detach().clone()
    torch.manual_seed(0)  # the draw both started from
    start = Decoder(CFG).blocks[0].attn.qkv.weight.detach()
    step32, step16 = after[torch.float32] - start, after[torch.bfloat16] - start
    assert step32.abs().max() > 0
    assert not torch.equal(step32, step16)
    torch.testing.assert_close(step16, step32, atol=0.05 * step32.abs().max().item(), rtol=0.1)
