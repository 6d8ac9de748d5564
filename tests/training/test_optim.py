from __future__ import annotations

import math

import torch

from lmforge.config import build
from lmforge.training.optim import OptimConfig, lr_at, newton_schulz


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    for shape in [(32, 96), (96, 32)]:
        s = torch.linalg.svdvals(newton_schulz(torch.randn(shape)).float())
        # The quintic iteration trades exactness for speed: singular values land near 1.
        assert s.min() > 0.5 and s.max() < 1.3, s


def test_schedules_warm_up_then_decay_to_the_floor() -> None:
    cos = build(OptimConfig, {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_at(0, 100, cos) == 0.1 and lr_at(9, 100, cos) == 1.0
    assert math.isclose(lr_at(100, 100, cos), 0.1)
    assert lr_at(50, 100, cos) > lr_at(80, 100, cos)
    wsd = build(OptimConfig, {"lr": 1.0, "warmup_steps": 10, "schedule": "wsd", "decay_frac": 0.2})
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(90, 100, wsd) < 1.0
    assert math.isclose(lr_at(100, 100, wsd), 0.1)


def test_non_finite_gradient_never_reaches_the_weights() -> None:
    import pytest

    from lmforge.errors import UserError
    from lmforge.training.loop import train_step

    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters())

    # A finite loss whose gradient is infinite, as after an overflow in backward.
    model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()

    x, y = torch.ones(1, 2), torch.zeros(1, 1)
    with pytest.raises(UserError, match="gradient norm became"):
        train_step(model, opt, [(x, y)], loss_fn, n_micro=1, device=torch.device("cpu"),
                   dtype=torch.float32, grad_clip=1.0, step=1)  # fmt: skip
    assert torch.equal(model.weight, before)


def test_vectors_follow_vector_lr_through_the_schedule() -> None:
    from lmforge.training.optim import build_optimizer, set_lr

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    critic = torch.nn.Linear(4, 1)
    cfg = build(OptimConfig, {"lr": 1e-3, "vector_lr": 5e-2})
    opt = build_optimizer(model, cfg, also=[(critic, 2e-4)])
    set_lr(opt, 0.5e-3, peak=1e-3)  # half way down some schedule
    got = {(len(g["params"]), round(g["lr"], 8)) for g in opt.param_groups}
    # policy matrices, policy vectors (bias + two LayerNorm vectors), critic matrix, critic bias
    assert got == {(1, 5e-4), (3, 2.5e-2), (1, 1e-4)}, got
    assert [g["lr"] for g in opt.param_groups[2:]] == [1e-4, 1e-4]
    # one step moves a vector by about its lr (Adam's first step is lr * sign(grad))
    model(torch.randn(2, 4)).sum().backward()
    critic(torch.randn(2, 4)).sum().backward()
    gain, weight = model[1].weight.detach().clone(), model[0].weight.detach().clone()
    opt.step()
    assert torch.allclose((model[1].weight - gain).abs(), torch.full((4,), 2.5e-2), rtol=1e-3)
    assert (model[0].weight - weight).abs().max() < 1e-3

    plain = build_optimizer(model, build(OptimConfig, {"lr": 1e-3}))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
