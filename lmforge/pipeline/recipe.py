"""A recipe: the whole workflow in one TOML/YAML file, a section per stage.

Each section is that stage's own config (what `lmforge sft --config` reads), so every option a
stage has can be set in a recipe or as a dotted override (`sft.train.max_steps=100`). The paths
that connect the stages (the SFT model's base, the reward model's data, ...) are left out: the
recipe loader fills each empty one with the output folder of the stage that produces it, when
that stage runs. A recipe sets such a path only to bring its own input (a preference file, a
tokenizer, a model).

`tasks` is shared: it is laid under every stage's own `tasks` section, so `tasks.n_train=300`
changes the world for all stages alike. Loading builds and validates every stage's typed config
up front, so a bad recipe fails before any stage runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import config as C
from lmforge.config import check, opt
from lmforge.errors import UserError
from lmforge.evaluation.tasks import EvalConfig
from lmforge.feedback.cai import AILabelConfig
from lmforge.feedback.sampling import SampleConfig
from lmforge.feedback.simulated import Annotator
from lmforge.training.best_of_n import BestOfNConfig
from lmforge.training.dpo import DPOConfig
from lmforge.training.grpo import GRPOConfig
from lmforge.training.ppo import PPOConfig
from lmforge.training.pretrain import PretrainConfig
from lmforge.training.reward import RewardConfig
from lmforge.training.sft import SFTConfig

# Pipeline order. `eval` scores every model the run trains; `report` reads all metrics.
STAGES = (
    "tokenizer", "pretrain", "sft", "sample", "label", "reward",
    "ppo", "dpo", "grpo", "best_of_n", "eval", "report",
)  # fmt: skip
# Output of each stage in the run folder.
FOLDERS = {s: s for s in STAGES} | {"pretrain": "base", "reward": "rm", "report": "report.md"}


# The label stage's config by source of feedback (`RunOptions.feedback`).
FEEDBACK: dict[str, type] = {"simulated": Annotator, "ai": AILabelConfig}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The recipe's top-level keys (everything outside the stage sections)."""

    name: str = opt("world", "the recipe's name; the run folder defaults to runs/NAME")
    stages: tuple[str, ...] = opt(STAGES, "stages to run, from: " + ", ".join(STAGES))
    policy: str = opt("", "chat model to sample from when the recipe has no sft stage")
    prompts: str = opt("world", "sample: 'world' (the tasks' train split) or a .jsonl of prompts")
    sample_val: bool = opt(
        True, "world prompts: also sample the val split, for the reward model's held-out pairs"
    )
    conversations: int = opt(3, "report: sample conversations shown per model")
    feedback: str = opt(
        "simulated",
        "label stage: 'simulated' annotators ([label] holds their options) or 'ai', an AI judge "
        "under a constitution ([label] holds `lmforge label --ai` options: judge, swap, clamp)",
    )

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        check(
            not unknown, "stages", f"unknown stage {unknown[:1]}; choose from {', '.join(STAGES)}"
        )
        check(len(set(self.stages)) == len(self.stages), "stages", "a stage is listed twice")
        check(self.name != "" and "/" not in self.name, "name", "must be a plain, non-empty name")
        check(self.conversations >= 0, "conversations", "must be >= 0")
        check(self.feedback in FEEDBACK, "feedback", f"must be one of {', '.join(FEEDBACK)}")


# Each section's config class, and the recipe's defaults where they differ from the command's:
# a held-out set of 50 test prompts per task for the evals and best-of-n (the commands score
# the whole split), 1,200 prompts sampled for preference labels, and shorter RL runs so that
# the whole run fits 15 minutes on 2 CPU cores (the held-out gold of the 60-iteration PPO and
# GRPO runs and the 200-step DPO run was already reached by iteration 40 and step 100).
SECTIONS: dict[str, tuple[type, dict[str, Any]]] = {
    "pretrain": (PretrainConfig, {}),
    "sft": (SFTConfig, {}),
    "sample": (SampleConfig, {"limit": 1200, "sampling": {"temperature": 1.0,
                                                          "max_new_tokens": 32}}),
    "label": (Annotator, {}),
    "reward": (RewardConfig, {}),
    "ppo": (PPOConfig, {"train": {"max_steps": 40}}),
    "dpo": (DPOConfig, {"train": {"max_steps": 100}}),
    # GRPO on PPO's footing: the reward model's score (the command defaults to the checker).
    "grpo": (GRPOConfig, {"reward": "model", "train": {"max_steps": 40}}),
    "best_of_n": (BestOfNConfig, {"limit": 50}),
    "eval": (EvalConfig, {"samples": 2, "limit": 50}),
}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    run: Path  # the run folder
    options: RunOptions
    configs: dict[str, Any]  # stage -> its typed config, paths filled (stages that run only)
    deps: dict[str, tuple[str, ...]]  # stage -> the stages whose output it reads
    raw: dict[str, Any]  # the recipe as loaded (file + overrides), for recipe.json

    def runs(self, stage: str) -> bool:
        return stage in self.options.stages

    def resolved(self) -> dict[str, Any]:
        """The recipe as it runs, every default and filled path included (recipe.json)."""
        return {**C.to_dict(self.options), **{s: C.to_dict(c) for s, c in self.configs.items()}}


def load_recipe(
    path: Path | None, run: Path | None = None, overrides: tuple[str, ...] | list[str] = ()
) -> Recipe:
    """The recipe in `path` (TOML/YAML; None: the built-in world) with dotted overrides, every
    stage's config built for the run folder `run` (default: runs/NAME)."""
    raw = C.apply_overrides(C.read_config_file(path) if path else {}, overrides)
    source = str(path) if path else "recipe"
    if path and overrides:
        source += " (with command-line overrides)"
    top = {k: v for k, v in raw.items() if k not in SECTIONS and k != "tasks"}
    options = C.build(RunOptions, top, source)
    run = run or Path("runs") / options.name
    on = set(options.stages)
    shared = raw.get("tasks", {})
    if not isinstance(shared, dict):
        raise UserError(f"{source}: field 'tasks': expected a table of fields")
    for name in raw:
        if name in SECTIONS and not isinstance(raw[name], dict):
            raise UserError(f"{source}: field '{name}': expected a table of fields")

    def out(stage: str) -> str:
        return str(run / FOLDERS[stage])

    policy = out("sft") if "sft" in on else options.policy
    world_val = options.sample_val and options.prompts == "world"
    prefs, val_prefs = [out("label") + "/prefs.jsonl"], [out("label") + "/prefs_val.jsonl"]
    # field -> (producing stage, value), filled where the recipe leaves the field empty
    links: dict[str, dict[str, tuple[str, Any]]] = {
        "pretrain": {},
        "sft": {"model": ("pretrain", out("pretrain"))},
        "reward": {"model": ("sft", policy), "data": ("label", prefs),
                   "val_data": ("label", val_prefs if world_val else [])},
        "ppo": {"policy": ("sft", policy), "reward_model": ("reward", out("reward"))},
        "dpo": {"policy": ("sft", policy), "data": ("label", prefs),
                "val_data": ("label", val_prefs if world_val else []),
                "reward_model": ("reward", out("reward"))},
        "grpo": {"policy": ("sft", policy), "reward_model": ("reward", out("reward"))},
        "best_of_n": {"policy": ("sft", policy), "reward_model": ("reward", out("reward"))},
    }  # fmt: skip
    if "sample" in on and not policy:
        raise UserError(f"{source}: the sample stage needs a chat model: add 'sft' to stages "
                        "or set policy")  # fmt: skip
    if "label" in on and "sample" not in on:
        raise UserError(
            f"{source}: the label stage labels the sample stage's responses; "
            "add 'sample' to stages, or drop 'label' and set reward.data"
        )
    configs: dict[str, Any] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for stage in STAGES:
        if stage not in on or stage == "report":
            continue
        if stage == "tokenizer":
            stage_deps: list[str] = []
            section = _section(raw, "pretrain", shared)
        else:
            section, stage_deps = _section(raw, stage, shared), []
            for field, (producer, value) in links.get(stage, {}).items():
                if stage == "grpo" and field == "reward_model" and not _grpo_uses_rm(section):
                    continue  # checker or gold reward: no reward model to wait for
                if section.get(field) in (None, "", [], ()) and producer in on:
                    section[field] = value
                    stage_deps.append(producer)
            if stage == "pretrain" and "tokenizer" in on:
                tok = section.setdefault("tokenizer", {})
                if isinstance(tok, dict) and not tok.get("path"):
                    tok["path"] = out("tokenizer")
                    stage_deps.append("tokenizer")
        cls, defaults = SECTIONS["pretrain" if stage == "tokenizer" else stage]
        if stage == "label":
            cls = FEEDBACK[options.feedback]
        where = "pretrain" if stage == "tokenizer" else stage
        configs[stage] = C.build(cls, C.merge(defaults, section), f"{source}: [{where}]")
        deps[stage] = tuple(stage_deps)
    if "sample" in on:
        deps["sample"] = ("sft",) if "sft" in on else ()
    if "label" in on:
        deps["label"] = ("sample",)
    return Recipe(run, options, configs, deps, raw)


def _section(raw: dict[str, Any], stage: str, shared: dict[str, Any]) -> dict[str, Any]:
    """A copy of the recipe's section for `stage`, with the shared `tasks` laid under its own."""
    section = C.merge({}, raw.get(stage, {}))
    cls, _ = SECTIONS[stage]
    if shared and any(f.name == "tasks" for f in dataclasses.fields(cls)):
        own = section.get("tasks", {})
        section["tasks"] = C.merge(shared, own) if isinstance(own, dict) else own
    return section


def _grpo_uses_rm(section: dict[str, Any]) -> bool:
    return C.merge(SECTIONS["grpo"][1], section).get("reward") == "model"
