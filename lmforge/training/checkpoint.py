"""The only module that writes and reads checkpoints.

Two artefacts, both safetensors plus JSON, never pickle:
- a model folder: `model.safetensors` + `config.json` (the resolved run config, the model
  family, step and tokenizer fingerprint), loadable for generation or the next stage;
- resume state: `state/step_XXXXXXXX/` holding `model.safetensors`, `optim.safetensors`
  (AdamW moments, step counters and RNG states as tensors) and `state.json` (step, optimizer
  hyper-parameters, anything else the trainer needs). The folder is written under a temporary
  name and renamed when complete, so a checkpoint counts only once it is whole.

Both carry a `manifest.json` (manifest.py) written last: loading checks every file's size and
SHA-256 against it. `--resume` picks the newest state folder that passes that check, reporting
any partial (`.tmp-*`) or damaged one it passes over; where checkpoints exist but none is
valid it refuses, so a run never silently starts again from random weights. The newest `keep`
states (at least 2) are kept, and older ones are deleted only after a new one is complete, so
a failed save (a full disk) always leaves the last good one.

Runs with train.dist.strategy=fsdp write their resume state sharded instead (`"layout":
"sharded"` in state.json): `shards/` holds one safetensors file per rank with its part of the
model and the optimizer state (`distributed.save_shards`), `rng.safetensors` rank 0's RNG
states; its manifest lists the shards too. Any number of ranks resumes from it; the model
folder beside it is the whole model, gathered on rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_into_module

from lmforge import distributed
from lmforge.config import build
from lmforge.errors import UserError
from lmforge.io import atomic_dir, atomic_write, atomic_write_json, pickle_note
from lmforge.models import FAMILIES, Model
from lmforge.models.hf import import_hf, is_hf_dir
from lmforge.models.reward import RewardModel
from lmforge.models.transformer import Transformer, TransformerConfig
from lmforge.runtime import DTYPES
from lmforge.tokenizers import Tokenizer, load_tokenizer
from lmforge.training.manifest import MANIFEST, CorruptCheckpoint, verify_manifest, write_manifest

STATE_DIR = "state"
SHARDS_DIR = "shards"
# 2: model folders and state folders carry a manifest (1: written before manifests existed).
FORMAT_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Model folders


def save_model_dir(out: Path, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write `out/model.safetensors` and `out/config.json` atomically, then their manifest
    (with the tokenizer's files, when `out/tokenizer` exists)."""
    # save_model drops tied duplicates (lm_head == tok_emb) that save_file would refuse.
    _write_model_dir(out, lambda p: save_model(_unwrap(model), str(p)), config)


def _write_model_dir(
    out: Path, write_weights: Callable[[Path], None], config: dict[str, Any]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with _save_errors(out):
        # The old manifest goes first: a save cut short leaves none, never a stale one.
        (out / MANIFEST).unlink(missing_ok=True)
        atomic_write(out / "model.safetensors", write_weights)
        atomic_write_json(out / "config.json", {"format_version": FORMAT_VERSION, **config})
        tok_files = [
            str(f.relative_to(out)) for f in sorted((out / "tokenizer").glob("*")) if f.is_file()
        ]
        write_manifest(out, ["model.safetensors", "config.json", *tok_files])


def verify_model_dir(model_dir: Path, config: dict[str, Any]) -> None:
    """Check a model folder against its manifest; folders from before manifests have none."""
    if (model_dir / MANIFEST).exists() or config.get("format_version", 1) >= 2:
        verify_manifest(model_dir)


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def _model_config(config: dict[str, Any], model_dir: Path) -> tuple[TransformerConfig, int]:
    """The saved model shape and the extra (sentinel) ids past the tokenizer's vocabulary."""
    source = str(model_dir / "config.json")
    if not isinstance(config.get("model"), dict):
        raise UserError(f"{source}: field 'model': missing or not a table of fields")
    extra = config.get("extra_vocab", 0)
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise UserError(f"{source}: field 'extra_vocab': expected an integer >= 0")
    return build(TransformerConfig, config["model"], source), extra


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: weights file not found{pickle_note(path.parent)}")
    try:
        missing, unexpected = load_into_module(_unwrap(model), str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:  # torch lists shape mismatches on lines
        raise UserError(f"{path}: cannot load weights ({' '.join(str(e).split())})") from None
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# ---------------------------------------------------------------------------------------------
# Resume state


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / STATE_DIR / f"step_{step:08d}"


def save_state(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    *,
    sharded: bool = False,
) -> Path:
    """Write resume state for `step` (steps completed) and prune to the newest `keep`. With
    `sharded` (strategy=fsdp, any number of ranks) every rank must call it."""
    final = _step_dir(run_dir, step)
    meta = {"format_version": FORMAT_VERSION, "step": step, **extra}
    if sharded:
        _save_sharded_state(final, model, optimizer, meta)
    else:
        tensors, groups = _flatten_optimizer(optimizer)
        tensors.update(_rng_states())
        with _save_errors(final), atomic_dir(final) as tmp:
            save_model(_unwrap(model), str(tmp / "model.safetensors"))
            save_file(tensors, str(tmp / "optim.safetensors"))
            _write_state_json(tmp, {**meta, "param_groups": groups})
            write_manifest(tmp, ["model.safetensors", "optim.safetensors", "state.json"])
    if distributed.is_main():
        prune_states(run_dir, keep)
    return final


@contextmanager
def _save_errors(path: Path) -> Iterator[None]:
    """A failed write (a full disk) as one clear error; what was saved before stays."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(
            f"{path}: cannot save the checkpoint ({reason}); earlier checkpoints are kept"
        ) from None


def prune_states(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete states, and folders of saves that a killed
    process left half-written (another process's `.tmp-*`). Called only after a save succeeded,
    so the previous good state is never the one deleted."""
    for old in list_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    mine = f"-{os.getpid()}"
    for stale in partial_states(run_dir):
        if not stale.name.endswith(mine):
            shutil.rmtree(stale, ignore_errors=True)


def _save_sharded_state(
    final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    """The ranks write their shards into a staging folder whose name they all know; rank 0 then
    moves it into its temporary state folder beside the RNG states and state.json, and renames
    that when complete."""
    staging = final.parent / f".tmp-{final.name}-{SHARDS_DIR}"
    if distributed.is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    # returns on rank 0 only once every rank has written its file
    groups = distributed.save_shards(staging, model, optimizer)
    if distributed.is_main():
        with _save_errors(final), atomic_dir(final) as tmp:
            os.rename(staging, tmp / SHARDS_DIR)
            save_file(_rng_states(), str(tmp / "rng.safetensors"))
            _write_state_json(tmp, {**meta, "layout": "sharded", "param_groups": groups})
            shards = [f"{SHARDS_DIR}/{f.name}" for f in sorted((tmp / SHARDS_DIR).iterdir())]
            write_manifest(tmp, ["rng.safetensors", "state.json", *shards])
    distributed.barrier()


def _write_state_json(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    run_config: dict[str, Any],
    dtype: torch.dtype,
    keep: int,
    extra: dict[str, Any] | None = None,
    *,
    sharded: bool = False,
) -> None:
    """Resume state for `step` and the model folder beside it: what every stage saves. Under
    torchrun rank 0 alone writes them (every rank holds the same weights); with `sharded`
    (train.dist.strategy=fsdp) every rank writes its shards of the state and the model folder
    holds the whole model gathered on rank 0, so every rank must call this. `extra`: more
    JSON-able state for state.json."""
    meta = {"stage": run_config["stage"], "autocast": str(dtype).removeprefix("torch.")}
    meta.update(extra or {})
    config = {**run_config, "step": step}
    if sharded:
        save_state(out, step, model, optimizer, meta, keep=keep, sharded=True)
    # on rank 0; {} on the others
    full = distributed.full_model_state(model) if distributed.is_sharded(model) else None
    if not distributed.is_main():
        return
    if not sharded:
        save_state(out, step, model, optimizer, meta, keep=keep)
    if full is None:
        save_model_dir(out, model, config)
    else:
        save_full_model_dir(out, full, _unwrap(model), config)


def save_full_model_dir(
    out: Path, state: dict[str, torch.Tensor], model: torch.nn.Module, config: dict[str, Any]
) -> None:
    """`save_model_dir` for `model`'s whole `state`, gathered apart from it: a weight two
    modules share (the tied LM head) is written once, as `save_model` writes it."""
    tied = distributed.tied_names(model)
    tensors = {k: v.contiguous() for k, v in state.items() if k not in tied}
    _write_model_dir(out, lambda p: save_file(tensors, str(p)), config)


def list_states(run_dir: Path) -> list[Path]:
    """Complete state folders, oldest first. Half-written `.tmp-*` folders are not listed."""
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return []
    dirs = [
        d for d in root.iterdir() if d.name.startswith("step_") and (d / "state.json").is_file()
    ]
    return sorted(dirs, key=lambda d: d.name)


def partial_states(run_dir: Path) -> list[Path]:
    """State folders of saves that never finished: a killed save's `.tmp-*` folder, or a
    `step_*` folder without its state.json (a partial copy)."""
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(
        d
        for d in root.iterdir()
        if d.is_dir() and (d.name.startswith(".tmp-") or not (d / "state.json").is_file())
    )


def latest_state(run_dir: Path) -> Path | None:
    """The newest state folder that passes its manifest check; None if there is none at all.

    Partial and damaged folders are reported on stderr and passed over, falling back to the
    previous checkpoint. If there are checkpoints but none is valid, a UserError: resuming
    (or a restart) must never begin again from random weights."""
    for partial in partial_states(run_dir):
        _report(f"{partial}: partial checkpoint folder ignored (its save was interrupted)")
    states = list_states(run_dir)
    for i, state in enumerate(reversed(states)):
        try:
            verify_state(state)
        except CorruptCheckpoint as e:
            _report(f"{e}; checkpoint ignored")
            continue
        if i:
            _report(f"falling back to the previous valid checkpoint {state}")
        return state
    if states:
        raise UserError(
            f"{run_dir / STATE_DIR}: no valid checkpoint ({len(states)} damaged, see the "
            "warnings above); start a new run without --resume"
        )
    return None


def verify_state(state_dir: Path) -> None:
    """Check a state folder against its manifest (those from before manifests have none)."""
    if (state_dir / MANIFEST).exists():
        verify_manifest(state_dir)
        return
    try:
        version = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        version = version.get("format_version", 1)
    except (OSError, ValueError, AttributeError):
        version = FORMAT_VERSION
    if version >= 2:
        verify_manifest(state_dir)  # raises: it has no manifest


def _report(message: str) -> None:
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def load_state(
    state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Check a state folder against its manifest, then restore model, optimizer and RNG from
    it; return its `state.json`. Under torchrun every rank calls it; sharded state loads into
    any number of ranks."""
    verify_state(state_dir)
    try:
        meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{state_dir}: unreadable checkpoint ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{state_dir / 'state.json'}: not a resume state (not a JSON object)")
    if meta.get("layout") == "sharded":
        _load_sharded_state(state_dir, model, optimizer, meta)
        return meta
    if distributed.is_sharded(model):
        raise UserError(
            f"{state_dir}: holds a whole-model checkpoint (train.dist.strategy=ddp); "
            "a run with strategy=fsdp resumes only from its own sharded checkpoints"
        )
    try:
        tensors = load_file(str(state_dir / "optim.safetensors"))
    except (OSError, ValueError, RecursionError, SafetensorError) as e:
        raise UserError(f"{state_dir}: unreadable checkpoint ({e})") from None
    step = meta.get("step")
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or not isinstance(meta.get("autocast"), str)
        or meta["autocast"] not in DTYPES
        or not isinstance(meta.get("param_groups"), list)
    ):
        raise UserError(f"{state_dir / 'state.json'}: not a resume state (step, autocast, groups)")
    load_model_weights(model, state_dir / "model.safetensors")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["param_groups"]))
        _set_rng_states(tensors)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        # torch checks the groups against the optimizer; anything else is a mangled file
        why = " ".join(str(e).split())
        raise UserError(f"{state_dir}: optimizer state does not fit this run ({why})") from None
    return meta


def _load_sharded_state(
    state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    try:
        rng = load_file(str(state_dir / "rng.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{state_dir}: unreadable checkpoint ({e})") from None
    distributed.load_shards(state_dir / SHARDS_DIR, model, optimizer, _groups(meta["param_groups"]))
    _set_rng_states(rng)


def _rng_states() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def _set_rng_states(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def _groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer param groups as read from JSON: AdamW's betas back to a tuple."""
    return [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state as flat tensors (`opt.<param>.<name>`) plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{pid}.{name}"] = t.detach().cpu().contiguous()
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, groups


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": _groups(groups)}


def load_model(
    model_dir: Path, family: str | None = None, device: torch.device | str = "cpu"
) -> tuple[Model, Tokenizer, dict[str, Any]]:
    """A trained model, its tokenizer and its saved config from a model folder; with `family`,
    a folder holding another family is refused. A Hugging Face causal-LM folder (Llama, Qwen2,
    GPT-2) loads as a decoder (`models.hf.import_hf`)."""
    if is_hf_dir(model_dir):
        if family not in (None, "decoder"):
            raise UserError(
                f"{model_dir}: holds a Hugging Face decoder; this command needs a {family}"
            )
        decoder, tok, config = import_hf(model_dir)
        return decoder.to(device), tok, config
    config = read_config_json(model_dir)
    verify_model_dir(model_dir, config)
    found = config.get("family")
    if not isinstance(found, str) or found not in FAMILIES:
        raise UserError(f"{model_dir / 'config.json'}: field 'family': unknown family {found!r}")
    if family is not None and found != family:
        raise UserError(f"{model_dir}: holds a '{found}' model; this command needs a {family}")
    # Sentinel ids of span corruption sit past the tokenizer's vocabulary (T5's "extra ids").
    model_cfg, extra = _model_config(config, model_dir)
    tokenizer = load_tokenizer(
        model_dir / "tokenizer", expected_vocab_size=model_cfg.vocab_size - extra
    )
    model = FAMILIES[found](model_cfg)
    load_model_weights(model, model_dir / "model.safetensors")
    return model.to(device).eval(), tokenizer, config


def load_reward_model(
    model_dir: Path, device: torch.device | str = "cpu"
) -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """A reward model (trunk + scalar head) saved by the reward stage."""
    config = read_config_json(model_dir)
    if config.get("head") != "reward":
        raise UserError(f"{model_dir}: not a reward model (train one with `lmforge reward`)")
    verify_model_dir(model_dir, config)
    found = config.get("family")
    if found not in ("decoder", "encoder"):
        raise UserError(f"{model_dir / 'config.json'}: field 'family': unknown trunk {found!r}")
    model_cfg, _ = _model_config(config, model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer", expected_vocab_size=model_cfg.vocab_size)
    trunk = FAMILIES[found](model_cfg)
    assert isinstance(trunk, Transformer)
    likelihood = config.get("likelihood", False) is True
    if likelihood and found != "decoder":
        raise UserError(f"{model_dir / 'config.json'}: field 'likelihood': needs a decoder trunk")
    model = RewardModel(trunk, likelihood)
    load_model_weights(model, model_dir / "model.safetensors")
    return model.to(device).eval(), tokenizer, config
