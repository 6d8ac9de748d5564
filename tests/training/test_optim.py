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
