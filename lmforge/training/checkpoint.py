"""The only module that writes and reads checkpoints.

Two artefacts, both safetensors plus JSON, never pickle:
- a model folder: `model.safetensors` + `config.json` (the resolved run config, the model
  family, step and tokenizer fingerprint), loadable for generation or the next stage;
- resume state: `state/step_XXXXXXXX/` holding `model.safetensors`, `optim.safetensors`
  (AdamW moments, step counters and RNG states as tensors) and `state.json` (step, optimizer
  hyper-parameters, anything else the trainer needs). The folder is written under a temporary
  name and renamed when complete, so a checkpoint counts only once it is whole; the newest
  complete one is what `--resume` picks. The last `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
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

STATE_DIR = "state"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Model folders


def save_model_dir(out: Path, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write `out/model.safetensors` and `out/config.json` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    # save_model drops tied duplicates (lm_head == tok_emb) that save_file would refuse.
    atomic_write(out / "model.safetensors", lambda p: save_model(_unwrap(model), str(p)))
    atomic_write_json(out / "config.json", {"format_version": FORMAT_VERSION, **config})


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
) -> Path:
    """Write resume state for `step` (steps completed) and prune to the newest `keep`."""
    tensors, groups = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"format_version": FORMAT_VERSION, "step": step, "param_groups": groups, **extra}
    final = _step_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    for old in list_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    run_config: dict[str, Any],
    dtype: torch.dtype,
    keep: int,
) -> None:
    """Resume state for `step` and the model folder beside it: what every stage saves. Under
    torchrun rank 0 alone writes them (every rank holds the same weights)."""
    if not distributed.is_main():
        return
    meta = {"stage": run_config["stage"], "autocast": str(dtype).removeprefix("torch.")}
    save_state(out, step, model, optimizer, meta, keep=keep)
    save_model_dir(out, model, {**run_config, "step": step})


def list_states(run_dir: Path) -> list[Path]:
    """Complete state folders, oldest first. Half-written `.tmp-*` folders are not listed."""
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return []
    dirs = [
        d for d in root.iterdir() if d.name.startswith("step_") and (d / "state.json").is_file()
    ]
    return sorted(dirs, key=lambda d: d.name)


def latest_state(run_dir: Path) -> Path | None:
    states = list_states(run_dir)
    return states[-1] if states else None


def load_state(
    state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a state folder; return its `state.json`."""
    try:
        meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(state_dir / "optim.safetensors"))
    except (OSError, ValueError, RecursionError, SafetensorError) as e:
        raise UserError(f"{state_dir}: unreadable checkpoint ({e})") from None
    step = meta.get("step") if isinstance(meta, dict) else None
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
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        # torch checks the groups against the optimizer; anything else is a mangled file
        why = " ".join(str(e).split())
        raise UserError(f"{state_dir}: optimizer state does not fit this run ({why})") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


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
    restored = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": restored}


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
    found = config.get("family")
    if found not in ("decoder", "encoder"):
        raise UserError(f"{model_dir / 'config.json'}: field 'family': unknown trunk {found!r}")
    model_cfg, _ = _model_config(config, model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer", expected_vocab_size=model_cfg.vocab_size)
    trunk = FAMILIES[found](model_cfg)
    assert isinstance(trunk, Transformer)
    model = RewardModel(trunk)
    load_model_weights(model, model_dir / "model.safetensors")
    return model.to(device).eval(), tokenizer, config
