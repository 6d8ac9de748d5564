"""Typed, frozen configs: declaration, loading from TOML/YAML, dotted overrides, validation, help.

Every component declares its options as a frozen keyword-only dataclass whose fields are made
with `opt(default, "help text")`. The help text lives only there: the CLI help and the docs are
generated from it. A run config nests component configs (`PretrainConfig.model`, `.train`, ...).

Loading walks the nested dataclasses with the raw dict from a file plus `key=value` overrides,
converts each value to its field's declared type, and rejects unknown keys. Each config checks
its own invariants in `__post_init__` via `check(...)`; a failure there is re-raised as a
`UserError` naming the source file and the dotted field, e.g.
`error: run.toml: field 'model.n_layer': must be >= 1 (got 0)`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import tomllib

from lmforge.errors import UserError

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best at the call site
    """A config field with its one and only documentation string."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are immutable")
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigFieldError(ValueError):
    """Raised by `check` inside a config's `__post_init__`; the loader adds file and path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def check(condition: bool, field: str, message: str) -> None:
    """Validate one field inside `__post_init__`."""
    if not condition:
        raise ConfigFieldError(field, message)


# --------------------------------------------------------------------------------------------
# Reading files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict; syntax errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    # Editors on Windows often save a byte-order mark, which both parsers refuse.
    text = _read_text(p).removeprefix("\ufeff")
    if p.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{p}: invalid TOML: {e}") from None
        except (RecursionError, ValueError) as e:  # deep nesting, ints past Python's digit limit
            raise UserError(f"{p}: invalid TOML: {_too_much(e)}") from None
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            # libyaml's loader when built in: the same safe constructors, much faster, and it
            # refuses deep nesting itself where the pure-Python one recurses for seconds.
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
            raise UserError(f"{p}{line}: invalid YAML: {why}") from None
        except (RecursionError, ValueError) as e:
            raise UserError(f"{p}: invalid YAML: {_too_much(e)}") from None
        data = {} if data is None else data
    else:
        raise UserError(f"{p}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a table of sections")
    _check_size(data, p)
    return data


def _too_much(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else "a number too long"


MAX_DEPTH, MAX_NODES = 32, 100_000


def _check_size(data: object, p: Path) -> None:
    """Refuse configs nested past any real one or too large once YAML aliases are expanded
    (a few nested `*refs` make billions of nodes): both would only fail later, deep in a
    recursive merge or while printing the value in an error."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_NODES:
            raise UserError(f"{p}: nested too deeply or too large to be a config")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not valid UTF-8 (byte {e.start})") from None


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Merge `a.b.c=value` strings into a nested dict (values stay strings until typed)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value, e.g. train.max_steps=200")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _OverrideStr(value)
    return out


class _OverrideStr(str):
    """A value typed on the command line: parsed according to the field type."""


# --------------------------------------------------------------------------------------------
# Building typed configs


def build(cls: type[T], data: dict[str, Any] | None = None, source: str = "config") -> T:
    """Build the dataclass `cls` from a nested dict, converting and validating every field."""
    try:
        return _build(cls, data or {}, prefix="")
    except _PathError as e:
        raise UserError(f"{source}: field '{e.path}': {e.message}") from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, section by section."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    base: dict[str, Any] | None = None,
    source: str | None = None,
) -> T:
    """Load a config from an optional TOML/YAML file plus dotted overrides, laid over `base`
    (a saved config, when continuing a run) or the defaults."""
    data = merge(base or {}, read_config_file(path) if path else {})
    data = apply_overrides(data, overrides)
    if source is None:
        source = str(path) if path else "command line"
        if path and overrides:
            source = f"{path} (with command-line overrides)"
    return build(cls, data, source)


class _PathError(Exception):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise _PathError(prefix.rstrip(".") or "<root>", "expected a table of fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):  # YAML allows numbers, lists, ... as keys
            raise _PathError(f"{prefix}{key!r}", "field names must be strings")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise _PathError(prefix + key, f"unknown field{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            # Start from the parent's default for this section (SFT's TrainConfig has its own
            # defaults), so overriding one key keeps the section's other defaults.
            section, default = data[name], _default(f)
            if isinstance(section, dict) and dataclasses.is_dataclass(default):
                section = merge(to_dict(default), section)
            kwargs[name] = _build(tp, section, prefix + name + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _convert(data[name], tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigFieldError as e:
        raise _PathError(prefix + e.field, e.message) from None


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` to type `tp`; command-line strings are parsed, file values checked."""
    origin = get_origin(tp)
    from_cli = isinstance(value, _OverrideStr)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (
            value is None or (from_cli and value.lower() in ("none", "null", ""))
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except _PathError as e:
                errors.append(e.message)
        raise _PathError(path, errors[0] if errors else f"invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        v = str(value) if from_cli else value
        if v not in choices:
            raise _PathError(path, f"must be one of {', '.join(map(str, choices))} (got {value!r})")
        return v
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if from_cli:
            value = [v for v in value.split(",") if v] if value else []
            value = [_OverrideStr(v) for v in value]
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise _PathError(path, f"expected a list (got {value!r})")
        return tuple(_convert(v, item_tp, path) for v in value)
    if tp is bool:
        if from_cli:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise _PathError(path, f"expected true or false (got {value!r})")
    if tp is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise _PathError(path, f"expected an integer (got {value!r})") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _PathError(path, f"expected an integer (got {value!r})")
    if tp is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                raise _PathError(path, f"expected a number (got {value!r})") from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _PathError(path, f"expected a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise _PathError(path, f"expected a string (got {value!r})")
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


# --------------------------------------------------------------------------------------------
# Saving and documenting


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists), for JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """Rows of (dotted key, type, default, help) for every leaf option, for `--help`.
    `defaults` is the section's default instance when a parent sets its own."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        default = _default(f)
        if defaults is not None:
            default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            section = default if dataclasses.is_dataclass(default) else None
            rows.extend(describe(tp, prefix + f.name + ".", section))  # type: ignore[arg-type]
            continue
        rows.append((prefix + f.name, _type_name(tp), _fmt(default), f.metadata.get("help", "")))
    return rows


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + "|none"
    if origin is tuple:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)
