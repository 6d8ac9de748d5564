from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lmforge import config as C
from lmforge.errors import UserError
from lmforge.training.pretrain import PretrainConfig


@dataclass(frozen=True, kw_only=True)
class Inner:
    n: int = C.opt(3, "a count")
    xs: tuple[str, ...] = C.opt(("a",), "names")

    def __post_init__(self) -> None:
        C.check(self.n >= 1, "n", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Outer:
    inner: Inner = C.opt(Inner(), "nested")
    mode: Literal["x", "y"] = C.opt("x", "a choice")
    rate: float = C.opt(0.5, "a number")
    flag: bool = C.opt(False, "a switch")
    name: str | None = C.opt(None, "optional")


def test_overrides_are_typed_from_fields() -> None:
    cfg = C.load(
        Outer, None, ["inner.n=7", "inner.xs=p,q", "mode=y", "rate=2", "flag=true", "name=none"]
    )
    assert cfg == Outer(inner=Inner(n=7, xs=("p", "q")), mode="y", rate=2.0, flag=True, name=None)


def test_file_then_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('mode = "y"\n[inner]\nn = 4\n')
    assert C.load(Outer, toml, ["inner.n=5"]) == Outer(inner=Inner(n=5), mode="y")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("rate: 0.25\ninner:\n  xs: [u, v]\n")
    assert C.load(Outer, yaml) == Outer(rate=0.25, inner=Inner(xs=("u", "v")))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["inner.nn=1"], "field 'inner.nn': unknown field (did you mean 'inner.n'?)"),
        (["inner.n=0"], "field 'inner.n': must be >= 1"),
        (["inner.n=two"], "field 'inner.n': expected an integer"),
        (["mode=z"], "field 'mode': must be one of x, y"),
        (["flag=maybe"], "field 'flag': expected true or false"),
        (["rate"], "expected key=value"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as e:
        C.load(Outer, None, overrides)
    assert needle in str(e.value)


def test_file_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        C.load(Outer, bad)
    wrong_type = tmp_path / "t.toml"
    wrong_type.write_text('rate = "fast"\n')
    with pytest.raises(UserError, match=r"t.toml: field 'rate': expected a number"):
        C.load(Outer, wrong_type)
    with pytest.raises(UserError, match="config file not found"):
        C.load(Outer, tmp_path / "missing.toml")


def test_every_option_is_documented_and_round_trips() -> None:
    rows = C.describe(PretrainConfig)
    assert len(rows) > 40
    assert all(help_ for *_, help_ in rows), [k for k, *_, h in rows if not h]
    cfg = PretrainConfig()
    assert C.build(PretrainConfig, C.to_dict(cfg), "saved") == cfg


def test_every_shipped_config_loads() -> None:
    root = Path(__file__).parents[1]
    shipped = sorted(root.glob("bench/configs/*.toml"))  # recipes/: tests/pipeline
    assert shipped, "no shipped configs found"
    for path in shipped:
        cfg = C.load(PretrainConfig, path)
        assert cfg.model.max_seq_len >= cfg.block_size


def test_yaml_exponent_floats_and_toml_dates(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("rate: 1e-3\n")  # YAML 1.1 reads this as a string
    assert C.load(Outer, y).rate == 0.001
    t = tmp_path / "c.toml"
    t.write_text("rate = 2024-01-01\n")
    with pytest.raises(UserError, match="field 'rate': expected a number"):
        C.load(Outer, t)


def test_overriding_one_key_keeps_the_parents_own_section_defaults() -> None:
    # SFTConfig sets its own TrainConfig defaults; one override must not reset the others.
    from lmforge.training.sft import SFTConfig

    cfg = C.load(SFTConfig, None, ["model=base", "train.max_steps=7"])
    assert cfg.train.max_steps == 7
    assert cfg.train.batch_size == SFTConfig(model="base").train.batch_size != 16
    rows = {k: d for k, _, d, _ in C.describe(SFTConfig)}
    assert rows["train.max_steps"] == str(SFTConfig(model="x").train.max_steps)
