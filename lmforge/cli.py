"""The `lmforge` command line: one subcommand per pipeline stage, thin by design.

Each command parses arguments, loads and validates a config (file + dotted overrides), and
calls a library function. A `UserError` (or a usage error) becomes one `error: ...` line on
stderr and exit code 2; a training run stopped by SIGTERM (after saving a checkpoint) exits
with code 143 (`training/preempt.py`). The options of a stage's config are listed in its
`--help`, generated from the config fields' own help strings.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from lmforge import config as C
from lmforge import distributed
from lmforge.data.corpora import DataConfig, load_corpus
from lmforge.data.instruction import Message
from lmforge.data.preference import Preference, load_preferences
from lmforge.data.world import WorldConfig, write_world
from lmforge.errors import UserError
from lmforge.evaluation.tasks import EvalConfig
from lmforge.feedback.cai import (
    AILabelConfig,
    ReviseConfig,
    label_ai,
    label_summary,
    prompt_examples,
    read_responses,
    record_examples,
    revise_records,
)
from lmforge.feedback.judges import make_judge
from lmforge.feedback.sampling import SampleConfig, file_prompts, sample_responses, world_prompts
from lmforge.feedback.simulated import Annotator, label_simulated
from lmforge.generation.chat import ChatSession
from lmforge.generation.generate import SamplingConfig, generate_seq2seq
from lmforge.generation.generate import generate as run_generate
from lmforge.io import atomic_write_jsonl
from lmforge.models.decoder import Decoder
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.hf import export_hf
from lmforge.objectives.reward import pairwise_accuracy
from lmforge.pipeline.recipe import STAGES, load_recipe
from lmforge.pipeline.report import summary_table, write_report
from lmforge.pipeline.run import run_pipeline
from lmforge.tokenizers import check_vocab_size, load_tokenizer, train_tokenizer
from lmforge.training.best_of_n import BestOfNConfig
from lmforge.training.best_of_n import best_of_n as run_best_of_n
from lmforge.training.checkpoint import load_model, load_reward_model, read_config_json
from lmforge.training.dpo import DPOConfig
from lmforge.training.dpo import dpo as run_dpo
from lmforge.training.evaluate import eval_table
from lmforge.training.evaluate import evaluate as run_eval
from lmforge.training.grpo import GRPOConfig
from lmforge.training.grpo import grpo as run_grpo
from lmforge.training.ppo import PPOConfig
from lmforge.training.ppo import ppo as run_ppo
from lmforge.training.preempt import PREEMPTED_EXIT_CODE, Preempted
from lmforge.training.pretrain import PretrainConfig
from lmforge.training.pretrain import pretrain as run_pretrain
from lmforge.training.reward import RewardConfig, render_pairs, score_pairs
from lmforge.training.reward import reward as run_reward
from lmforge.training.rundir import check_new_output, load_resume_config, restart_resume
from lmforge.training.sft import SFTConfig
from lmforge.training.sft import sft as run_sft

T = TypeVar("T")

# Commands that share their work between the processes of `torchrun --nproc-per-node N`.
TORCHRUN_COMMANDS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")  # not `reward score`


def _options_epilog(cls: type) -> str:
    rows = C.describe(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["\b", "Config options (set in --config FILE or as KEY=VALUE arguments):"]
    for key, tp, default, help_ in rows:
        lines.append(f"  {key:<{width}}  {help_} [{tp}, default: {default or repr(default)}]")
    return "\n".join(lines)


def _stage_config(
    cls: type[T],
    out: Path,
    config_file: Path | None,
    overrides: Sequence[str],
    resume: bool,
    model_dir: Path | None = None,
    data: Sequence[str] = (),
    fields: Mapping[str, Path | str | None] | None = None,
) -> T:
    """A training stage's config: the run's saved one when resuming (else the defaults), with
    the config file, the --model/--data flags (or other `fields` given as flags) and KEY=VALUE
    overrides laid over it."""
    flags = [f"model={model_dir}"] if model_dir else []
    flags += [f"data={','.join(data)}"] if data else []
    flags += [f"{k}={v}" for k, v in (fields or {}).items() if v]
    if resume:
        return load_resume_config(cls, out, config_file, [*flags, *overrides])
    return C.load(cls, config_file, [*flags, *overrides])


def _stage_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Shared options of a training stage: --out, --config, --resume, --overwrite, overrides.
    Under `torchrun --max-restarts`, a restarted stage resumes (`rundir.restart_resume`)."""

    @functools.wraps(command)
    def f(*, out: Path, resume: bool, overwrite: bool, **kwargs: Any) -> Any:
        resume, overwrite = restart_resume(out, resume, overwrite)
        return command(out=out, resume=resume, overwrite=overwrite, **kwargs)

    f = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")(f)
    f = click.option(
        "--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."
    )(f)
    f = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML or YAML config file; KEY=VALUE arguments override it.",
    )(f)
    f = click.option(
        "--out", required=True, type=click.Path(path_type=Path), help="Run directory."
    )(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lmforge")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """lmforge: the whole LLM training workflow, from raw text to an aligned chat model."""
    world = distributed.launched_world_size()
    if world > 1 and ctx.invoked_subcommand not in TORCHRUN_COMMANDS:
        # every process would do the whole job and write the same files
        raise UserError(
            f"WORLD_SIZE={world}: `lmforge {ctx.invoked_subcommand}` runs in one process; "
            f"under torchrun run {_torchrun_commands()}"
        )


def _torchrun_commands() -> str:
    return ", ".join(TORCHRUN_COMMANDS[:-1]) + f" or {TORCHRUN_COMMANDS[-1]}"


# ---------------------------------------------------------------------------------------------
# world


@cli.command(epilog=_options_epilog(WorldConfig))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def world(out: Path, config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Write the built-in task world's corpus to OUT for inspection."""
    cfg = C.load(WorldConfig, config_file, overrides)
    check_new_output(out)
    summary = write_world(cfg, out)
    click.echo(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------------------
# tokenizer


@cli.group()
def tokenizer() -> None:
    """Train and inspect tokenizers."""


@tokenizer.command("train")
@click.option("--algo", type=click.Choice(["bpe", "wordpiece", "unigram", "char"]), default="bpe")
@click.option("--vocab-size", type=int, default=2048, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--text-field", default="text", show_default=True, help="Text field in .jsonl.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tokenizer folder.")
@click.argument("inputs", nargs=-1)
def tokenizer_train(
    algo: str, vocab_size: int, out: Path, text_field: str, overwrite: bool, inputs: tuple[str, ...]
) -> None:
    """Train a tokenizer on INPUTS (files, folders or 'world'; default 'world').

    A tenth of the text is held out to report compression (bytes per token).
    """
    check_new_output(out, overwrite=overwrite)
    check_vocab_size(algo, vocab_size)
    data = C.build(DataConfig, {"inputs": list(inputs or ("world",)), "text_field": text_field})
    corpus = load_corpus(data)
    tok = train_tokenizer(algo, corpus.train, vocab_size, show_progress=True)
    tok.save(out)
    report = {
        "algo": algo,
        "vocab_size": tok.vocab_size,
        "bytes_per_token_heldout": round(tok.bytes_per_token(corpus.val), 4),
        "out": str(out),
    }
    click.echo(json.dumps(report, indent=2))


@tokenizer.command("encode")
@click.option("--tokenizer", "tok_dir", required=True, type=click.Path(path_type=Path))
@click.option("--tokens", is_flag=True, help="Show token strings beside the ids.")
@click.argument("text")
def tokenizer_encode(tok_dir: Path, tokens: bool, text: str) -> None:
    """Print the token ids of TEXT."""
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text)
    if tokens:
        for i in ids:
            click.echo(f"{i}\t{tok.id_to_token(i)!r}")
    else:
        click.echo(" ".join(map(str, ids)))


@tokenizer.command("decode")
@click.option("--tokenizer", "tok_dir", required=True, type=click.Path(path_type=Path))
@click.argument("ids", nargs=-1, type=int, required=True)
def tokenizer_decode(tok_dir: Path, ids: tuple[int, ...]) -> None:
    """Print the text of token IDS."""
    tok = load_tokenizer(tok_dir)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
    click.echo(tok.decode(list(ids)))


# ---------------------------------------------------------------------------------------------
# pretrain


@cli.command(epilog=_options_epilog(PretrainConfig))
@_stage_options
@click.option(
    "--arch",
    type=click.Choice(["decoder", "encoder", "encoder-decoder"]),
    help="Model family (same as arch=...): decoder (next-token), encoder (masked tokens), "
    "encoder-decoder (span corruption).",
)
def pretrain(
    arch: str | None,
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Pretrain a model from scratch on text (default: a decoder on the task world)."""
    if arch:
        overrides = (f"arch={arch}", *overrides)
    cfg = _stage_config(PretrainConfig, out, config_file, overrides, resume)
    last = run_pretrain(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    keys = ("step", "loss", "val_loss", "val_acc", "val_bpb", "tokens_per_s")
    distributed.print0(json.dumps({k: last[k] for k in keys if k in last}))


# ---------------------------------------------------------------------------------------------
# sft


@cli.command(epilog=_options_epilog(SFTConfig))
@_stage_options
@click.option(
    "--model", "model_dir", type=click.Path(path_type=Path), help="Base model folder (model=...)."
)
@click.option(
    "--data",
    multiple=True,
    help="Instruction file (.json/.jsonl, Alpaca/Dolly/chat/prompt-completion), hf:NAME, or "
    "'world' (default); repeat for several.",
)
def sft(
    model_dir: Path | None,
    data: tuple[str, ...],
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Fine-tune a pretrained model on instructions (default: the task world's tasks)."""
    cfg = _stage_config(SFTConfig, out, config_file, overrides, resume, model_dir, data)
    last = run_sft(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    keys = ("step", "loss", "val_loss", "val_em", "val_stop_rate", "tokens_per_s")
    distributed.print0(json.dumps({k: last[k] for k in keys if k in last}))


# ---------------------------------------------------------------------------------------------
# sample, label


@cli.command(epilog=_options_epilog(SampleConfig))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--prompts",
    default="world",
    show_default=True,
    help="'world' (the tasks' prompts, split=...) or a .jsonl of {prompt} / {messages} records.",
)
@click.option("--n", type=int, help="Responses per prompt (same as n=...).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="responses.jsonl")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def sample(
    model_dir: Path,
    prompts: str,
    n: int | None,
    out: Path,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Sample K responses per prompt from a fine-tuned model (input for `lmforge label`)."""
    cfg = C.load(SampleConfig, None, ((f"n={n}",) if n else ()) + overrides)
    _check_new_file(out, overwrite)
    plist = world_prompts(cfg) if prompts == "world" else file_prompts(Path(prompts), cfg.limit)
    model, tok, _ = load_model(model_dir)
    records = sample_responses(model, tok, plist, cfg, str(model_dir), progress=not quiet)
    atomic_write_jsonl(out, records)
    click.echo(f"{out}: {len(records)} prompts x {cfg.n} responses")


@cli.command(epilog=_options_epilog(Annotator) + "\n\n" + _options_epilog(AILabelConfig))
@click.option(
    "--simulated",
    "simulated",
    type=click.Path(dir_okay=False, path_type=Path),
    help="responses.jsonl of world prompts, judged by a simulated annotator.",
)
@click.option(
    "--serve",
    "serve_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="responses.jsonl to rank by hand on a local web page.",
)
@click.option(
    "--ai",
    "ai_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="responses.jsonl judged by an AI judge under a constitution (RLAIF): soft labels.",
)
@click.option("--judge", help="AI: 'rules' (the world's checkers) or a model folder.")
@click.option("--constitution", help="AI: 'world', 'chat' or a constitution .toml file.")
@click.option(
    "--clamp", help="AI: clamp soft labels into LO..HI (e.g. 0.2..0.8; same as clamp=...)."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="prefs.jsonl")
@click.option("--overwrite", is_flag=True, help="Simulated/AI: replace an existing output file.")
@click.option("--quiet", is_flag=True, help="AI: no progress bar.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Serve: address to bind.")
@click.option("--port", type=int, default=8765, show_default=True, help="Serve: port.")
@click.option("--allow-remote", is_flag=True, help="Serve: allow a non-loopback address.")
@click.option("--open", "open_browser", is_flag=True, help="Serve: open the page in a browser.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def label(
    simulated: Path | None,
    serve_file: Path | None,
    ai_file: Path | None,
    judge: str | None,
    constitution: str | None,
    clamp: str | None,
    out: Path,
    overwrite: bool,
    quiet: bool,
    host: str,
    port: int,
    allow_remote: bool,
    open_browser: bool,
    overrides: tuple[str, ...],
) -> None:
    """Turn sampled responses into preference records: a simulated annotator (--simulated),
    people on a ranking page (--serve; judgments are appended to --out as they come) or an AI
    judge under a constitution (--ai; soft labels, asked both ways round)."""
    if sum(x is not None for x in (simulated, serve_file, ai_file)) != 1:
        raise UserError("label: give exactly one of --simulated, --serve or --ai RESPONSES")
    given = [f for f, v in (("--judge", judge), ("--constitution", constitution),
                            ("--clamp", clamp)) if v is not None]  # fmt: skip
    if given and ai_file is None:
        raise UserError(f"label: {given[0]} is an option of --ai")
    if ai_file is not None:
        flags = {"judge.model": judge, "judge.constitution": constitution, "clamp": clamp}
        cfg = C.load(AILabelConfig, None, [*_flags(flags), *overrides])
        _check_new_file(out, overwrite)
        records = read_responses(ai_file)
        ai_judge, rules = make_judge(cfg.judge, record_examples(records), load_model)
        prefs = label_ai(records, ai_judge, cfg, rules, progress=not quiet)
        atomic_write_jsonl(out, prefs)
        summary = {
            k: round(v, 4) if isinstance(v, float) else v for k, v in label_summary(prefs).items()
        }
        click.echo(
            f"{out}: {len(prefs)} preference pairs (soft labels) from {len(records)} "
            f"prompts; {json.dumps(summary)}"
        )
        return
    if serve_file is not None:
        from lmforge.feedback.ranking_page import serve

        serve(
            serve_file,
            out,
            host=host,
            port=port,
            allow_remote=allow_remote,
            open_browser=open_browser,
        )
        return
    assert simulated is not None
    annotator = C.load(Annotator, None, overrides)
    _check_new_file(out, overwrite)
    records = read_responses(simulated)
    prefs = label_simulated(records, annotator)
    atomic_write_jsonl(out, prefs)
    click.echo(f"{out}: {len(prefs)} preference pairs from {len(records)} prompts")


def _flags(values: Mapping[str, str | None]) -> list[str]:
    """KEY=VALUE overrides for the options given as flags."""
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def _check_new_file(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_dir() or not overwrite):
        raise UserError(f"{out}: already exists; use --overwrite to replace it")


# ---------------------------------------------------------------------------------------------
# cai


@cli.group()
def cai() -> None:
    """Constitutional AI: critique-revision data from an AI judge (SL-CAI). For AI preference
    labels (RLAIF) see `lmforge label --ai`."""


@cai.command("revise", epilog=_options_epilog(ReviseConfig))
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The chat model whose responses are revised (the SFT model).",
)
@click.option(
    "--prompts",
    default="world",
    show_default=True,
    help="'world' (the tasks' prompts, sample.split=...) or a .jsonl of {prompt} / {messages}.",
)
@click.option("--judge", help="'rules' (the world's checkers) or a model folder (judge.model).")
@click.option("--constitution", help="'world', 'chat' or a .toml file (judge.constitution).")
@click.option("--rounds", type=int, help="Critique-revision rounds per response (rounds=...).")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="SFT records (prompt -> final revision), for `lmforge sft --data`.",
)
@click.option(
    "--prefs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Preference records (revision over initial response) [OUT_prefs.jsonl].",
)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def cai_revise(
    model_dir: Path,
    prompts: str,
    judge: str | None,
    constitution: str | None,
    rounds: int | None,
    out: Path,
    prefs: Path | None,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Sample a response per prompt from MODEL, critique it under a randomly drawn principle,
    revise it, ROUNDS times; write the final revisions as SFT data and as preferences."""
    flags = {
        "judge.model": judge,
        "judge.constitution": constitution,
        "rounds": None if rounds is None else str(rounds),
    }
    cfg = C.load(ReviseConfig, None, [*_flags(flags), *overrides])
    prefs = prefs or out.with_name(out.stem + "_prefs.jsonl")
    for path in (out, prefs):
        _check_new_file(path, overwrite)
    world = prompts == "world"
    plist = world_prompts(cfg.sample) if world else file_prompts(Path(prompts), cfg.sample.limit)
    # The judge first: a bad constitution or judge folder fails before any sampling.
    ai_judge, rules = make_judge(cfg.judge, prompt_examples(plist), load_model)
    model, tok, _ = load_model(model_dir)
    records = sample_responses(model, tok, plist, cfg.sample, str(model_dir), progress=not quiet)
    sft_recs, pref_recs, row = revise_records(
        records, ai_judge, rules, cfg.rounds, cfg.seed, progress=not quiet
    )
    atomic_write_jsonl(out, sft_recs)
    atomic_write_jsonl(prefs, pref_recs)
    click.echo(f"SFT records (prompt -> revision): {out} ({len(sft_recs)})")
    click.echo(f"preference records (revision over initial): {prefs} ({len(pref_recs)})")
    click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


# ---------------------------------------------------------------------------------------------
# reward


class _DefaultGroup(click.Group):
    """A group whose bare use runs its `train` subcommand: `lmforge reward --model ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = ["train", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultGroup)
def reward() -> None:
    """Train a reward model on preference pairs (`lmforge reward --model SFT --data prefs.jsonl
    --out RM`), or score with one (`lmforge reward score`)."""


@reward.command("train", epilog=_options_epilog(RewardConfig))
@_stage_options
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Trunk checkpoint.")
@click.option("--data", multiple=True, help="Preference file(s); repeat for several.")
def reward_train(
    model_dir: Path | None,
    data: tuple[str, ...],
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train a reward model (Bradley-Terry) from a decoder or encoder checkpoint."""
    cfg = _stage_config(RewardConfig, out, config_file, overrides, resume, model_dir, data)
    last = run_reward(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    keys = (
        "step",
        "loss",
        "val_acc",
        "val_ceiling",
        "val_gold_agreement",
        "test_correct_over_wrong",
        "pairs_per_s",
    )
    distributed.print0(json.dumps({k: last[k] for k in keys if k in last}))


@reward.command("score")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--data", multiple=True, help="Preference file(s): report pairwise accuracy.")
@click.option("--prompt", help="A prompt whose --response texts to score.")
@click.option("--response", "responses", multiple=True, help="Repeat to score several.")
def reward_score(
    model_dir: Path, data: tuple[str, ...], prompt: str | None, responses: tuple[str, ...]
) -> None:
    """Score responses with a reward model, or measure its accuracy on preference pairs."""
    world = distributed.launched_world_size()
    if world > 1:
        raise UserError(
            f"WORLD_SIZE={world}: `lmforge reward score` runs in one process; under torchrun "
            f"run {_torchrun_commands()}"
        )
    model, tok, _ = load_reward_model(model_dir)
    block = model.cfg.max_seq_len
    if data:
        pairs = render_pairs(tok, load_preferences(data), block)
        rc, rr = score_pairs(model, pairs, torch.device("cpu"), torch.float32)
        click.echo(json.dumps({"pairs": len(pairs), "accuracy": pairwise_accuracy(rc, rr)}))
        return
    if prompt is None or not responses:
        raise UserError("reward score: give --data FILE, or --prompt and one or more --response")
    prefs = [Preference((Message("user", prompt),), r, r + " ") for r in responses]
    rc, _ = score_pairs(model, render_pairs(tok, prefs, block), torch.device("cpu"), torch.float32)
    for r, score in zip(responses, rc.tolist(), strict=True):
        click.echo(json.dumps({"response": r, "reward": score}))


# ---------------------------------------------------------------------------------------------
# alignment: ppo, dpo, grpo, best-of-n


def _policy_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--policy", type=click.Path(path_type=Path), help="SFT model folder (policy=...)."
    )(f)


def _show(last: dict[str, Any], keys: Sequence[str]) -> None:
    distributed.print0(json.dumps({k: last[k] for k in keys if k in last}))


ALIGN_KEYS = ("step", "score", "kl", "val_gold", "val_em", "val_rm_score", "val_kl")


@cli.command(epilog=_options_epilog(PPOConfig))
@_stage_options
@_policy_option
@click.option(
    "--reward", "reward_dir", type=click.Path(path_type=Path), help="Reward model (reward_model=)."
)
def ppo(
    policy: Path | None,
    reward_dir: Path | None,
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Optimise the SFT policy with PPO against a reward model (RLHF)."""
    fields = {"policy": policy, "reward_model": reward_dir}
    cfg = _stage_config(PPOConfig, out, config_file, overrides, resume, fields=fields)
    _show(run_ppo(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet), ALIGN_KEYS)


@cli.command(epilog=_options_epilog(DPOConfig))
@_stage_options
@_policy_option
@click.option("--data", multiple=True, help="Preference file(s); repeat for several.")
@click.option(
    "--reward", "reward_dir", type=click.Path(path_type=Path), help="Optional: RM for the eval."
)
def dpo(
    policy: Path | None,
    data: tuple[str, ...],
    reward_dir: Path | None,
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Optimise the SFT policy directly on preference pairs (DPO; loss=ipo for IPO)."""
    fields = {"policy": policy, "reward_model": reward_dir}
    cfg = _stage_config(DPOConfig, out, config_file, overrides, resume, data=data, fields=fields)
    last = run_dpo(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    _show(last, ("step", "loss", "val_acc", "val_margin", *ALIGN_KEYS[3:]))


@cli.command(epilog=_options_epilog(GRPOConfig))
@_stage_options
@_policy_option
@click.option(
    "--reward",
    "reward_dir",
    type=click.Path(path_type=Path),
    help="Reward model: score with it (reward=model) instead of the task checker.",
)
def grpo(
    policy: Path | None,
    reward_dir: Path | None,
    out: Path,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Optimise the SFT policy with GRPO: group-relative advantages, no critic; rewards from
    the world's task checker (verifiable) by default."""
    fields = {"policy": policy, "reward_model": reward_dir, "reward": reward_dir and "model"}
    cfg = _stage_config(GRPOConfig, out, config_file, overrides, resume, fields=fields)
    _show(run_grpo(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet), ALIGN_KEYS)


@cli.command("best-of-n", epilog=_options_epilog(BestOfNConfig))
@_policy_option
@click.option("--reward", "reward_dir", type=click.Path(path_type=Path), help="Reward model.")
@click.option("--n", type=int, help="Responses per prompt (n=...).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def best_of_n(
    policy: Path | None,
    reward_dir: Path | None,
    n: int | None,
    out: Path,
    overwrite: bool,
    overrides: tuple[str, ...],
) -> None:
    """Baseline: keep the highest-scoring of n samples per held-out prompt (no training)."""
    flags = [f"{k}={v}" for k, v in (("policy", policy), ("reward_model", reward_dir), ("n", n))]
    cfg = C.load(
        BestOfNConfig, None, [f for f in flags if not f.endswith("=None")] + list(overrides)
    )
    row = run_best_of_n(cfg, out, overwrite=overwrite)
    _show(row, ("n", "gold", "sample_em", "rm_score", "kl", "gold_n1", "rm_score_n1"))


# ---------------------------------------------------------------------------------------------
# eval


@cli.command("eval", epilog=_options_epilog(EvalConfig))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--tasks",
    type=click.Choice(["world"]),
    default="world",
    show_default=True,
    help="Task suite: the world's held-out instruction tasks.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder for metrics.jsonl and answers.jsonl [default: MODEL/eval].",
)
@click.option(
    "--reward",
    "reward_dir",
    type=click.Path(path_type=Path),
    help="Reward model: also report its score of the samples.",
)
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Reference model (the SFT model): also report the KL to it.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def eval_(
    model_dir: Path,
    tasks: str,
    out: Path | None,
    reward_dir: Path | None,
    reference: Path | None,
    quiet: bool,
    overrides: tuple[str, ...],
) -> None:
    """Exact-match accuracy per task on held-out prompts, greedy decoding (few-shot for base
    models, the chat template for fine-tuned ones); for chat models also the gold reward of
    sampled answers, and with --reward/--reference the reward score and KL to the reference."""
    cfg = C.load(EvalConfig, None, overrides)
    row = run_eval(
        model_dir,
        cfg,
        out or model_dir / "eval",
        reward_model=reward_dir,
        reference=reference,
        progress=not quiet,
    )
    for line in eval_table(row):
        click.echo(line)


# ---------------------------------------------------------------------------------------------
# run, report


@cli.command("run")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder [default: runs/NAME].")
@click.option("--only", "only", type=click.Choice(STAGES), help="Run this stage only.")
@click.option(
    "--from", "start", type=click.Choice(STAGES), help="Redo this stage and every later one."
)
@click.option("--overwrite", is_flag=True, help="Replace a folder that is not an lmforge run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE]...")
def run(
    out: Path | None,
    only: str | None,
    start: str | None,
    overwrite: bool,
    quiet: bool,
    args: tuple[str, ...],
) -> None:
    """Run the whole workflow from a recipe (TOML/YAML; default: the built-in task world):
    tokenizer, pretrain, SFT, sample, label, reward model, PPO, DPO, GRPO, best-of-n, eval and
    the report. A stage whose config and inputs are unchanged is skipped; an interrupted run
    continues where it stopped. Overrides address a stage's section: sft.train.max_steps=100."""
    recipe_file = Path(args[0]) if args and "=" not in args[0] else None
    recipe = load_recipe(recipe_file, out, args[1:] if recipe_file else args)
    run_pipeline(recipe, only=only, start=start, overwrite=overwrite, progress=not quiet)
    report_md = recipe.run / "report.md"
    if report_md.is_file():
        summary = summary_table(recipe.run)  # each stage against its baseline
        if summary:
            click.echo(summary)
        click.echo(f"report: {report_md} (and report.html)")


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--conversations", type=int, help="Sample conversations per model [recipe's].")
def report(run_dir: Path, conversations: int | None) -> None:
    """Rebuild RUN_DIR/report.md, report.html and plots/ from the stages' metrics files."""
    click.echo(str(write_report(run_dir, conversations)))


# ---------------------------------------------------------------------------------------------
# chat


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--system", default="", help="System prompt.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def chat(
    model_dir: Path, system: str, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> None:
    """Talk with a fine-tuned model in the terminal; /reset starts over, /quit leaves."""
    sampling = C.build(
        SamplingConfig,
        {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        },
        source="chat options",
    )
    model, tok, config = load_model(model_dir)
    if config.get("stage") == "pretrain":
        click.echo("note: this is a base model; it has not learned the chat format", err=True)
    session = ChatSession(model, tok, sampling, system)
    click.echo("chat: /reset starts over, /quit leaves")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            session.reset()
            click.echo("(conversation cleared)")
            continue
        if not text.strip():
            continue
        click.echo("model> ", nl=False)
        dropped = session.dropped
        try:
            session.reply(text, on_text=lambda piece: click.echo(piece, nl=False))
        except UserError as e:
            click.echo(f"\n(error: {e})")
            continue
        click.echo()
        if session.dropped > dropped:
            click.echo(
                f"(dropped the oldest exchange to fit the context of {model.cfg.max_seq_len})"
            )


# ---------------------------------------------------------------------------------------------
# generate


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Repeat for a batch.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-cache", is_flag=True, help="Re-encode the whole sequence every step.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per prompt.")
def generate(
    model_dir: Path,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Continue each PROMPT with a decoder, or map it to an output with an encoder-decoder."""
    sampling = C.build(
        SamplingConfig,
        {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "use_cache": not no_cache,
        },
        source="generate options",
    )
    model, tok, _ = load_model(model_dir)
    ids = [tok.encode(p, add_bos=False) for p in prompts]
    if isinstance(model, EncoderDecoder):  # input -> output
        outs = generate_seq2seq(
            model, ids, sampling, start_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
        )
    elif isinstance(model, Decoder):  # continuation
        outs = run_generate(model, ids, sampling, eos_id=tok.eos_id, pad_id=tok.pad_id)
    else:
        raise UserError(f"{model_dir}: an encoder cannot generate; use `lmforge fill-mask`")
    for prompt, new in zip(prompts, outs, strict=True):
        # Span-corruption sentinels sit past the tokenizer's vocabulary; show them T5-style.
        text = (
            "".join(
                f"<extra_id_{t - tok.vocab_size}>" if t >= tok.vocab_size else tok.decode([t])
                for t in new
            )
            if isinstance(model, EncoderDecoder)
            else tok.decode(new)
        )
        if as_json:
            click.echo(json.dumps({"prompt": prompt, "completion": text}))
        else:
            sep = " => " if isinstance(model, EncoderDecoder) else ""
            click.echo(prompt + sep + text)


@cli.command("fill-mask")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=int, default=5, show_default=True)
@click.argument("text")
def fill_mask(model_dir: Path, top_k: int, text: str) -> None:
    """Show an encoder's top candidates for each [MASK] in TEXT."""
    model, tok, _ = load_model(model_dir, family="encoder")
    if "[MASK]" not in text:
        raise UserError("fill-mask: the text has no [MASK] to fill")
    mask_token = tok.id_to_token(tok.mask_id)
    pieces = text.split("[MASK]")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids += tok.encode(piece, allow_special=False)
        if i < len(pieces) - 1:
            ids.append(tok.mask_id)
    if len(ids) > model.cfg.max_seq_len:
        raise UserError(f"fill-mask: {len(ids)} tokens exceed the model's context")
    with torch.no_grad():
        probs = model(torch.tensor([ids])).softmax(-1)[0]  # (T, V)
    for n, pos in enumerate(i for i, t in enumerate(ids) if t == tok.mask_id):
        top = probs[pos].topk(min(top_k, tok.vocab_size))
        cands = ", ".join(
            f"{tok.decode([int(t)])!r} {float(p):.3f}"
            for p, t in zip(top.values, top.indices, strict=True)
        )
        click.echo(f"{mask_token} #{n + 1}: {cands}")


# ---------------------------------------------------------------------------------------------
# export


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--to", "fmt", required=True, type=click.Choice(["hf"]), help="hf: a Hugging Face Llama."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it holds files.")
@click.argument("out_dir", type=click.Path(path_type=Path))
def export(model_dir: Path, fmt: str, out_dir: Path, overwrite: bool) -> None:
    """Write a decoder to OUT_DIR in another format; `--to hf` gives a folder that
    transformers' AutoModelForCausalLM and AutoTokenizer load (Llama architecture)."""
    del fmt  # hf is the only format so far
    try:
        import transformers  # noqa: F401 - the Llama config comes from it
    except ImportError:
        raise UserError(
            "export --to hf needs the 'transformers' package: pip install 'lmforge[hf]'"
        ) from None
    if read_config_json(model_dir).get("head") == "reward":
        raise UserError(f"{model_dir}: holds a reward model; export --to hf needs a decoder")
    src, dst = model_dir.resolve(), out_dir.resolve()
    if src.is_relative_to(dst):  # --overwrite would delete the model being exported
        raise UserError(f"{out_dir}: holds the model folder {model_dir}; pick another OUT_DIR")
    model, tok, _ = load_model(model_dir, family="decoder")
    assert isinstance(model, Decoder)
    export_hf(model, tok, out_dir, overwrite=overwrite)
    click.echo(f"wrote {out_dir}")


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI, mapping bad input to one `error:` line and exit code 2."""
    try:
        with distributed.naming_hung_ranks():
            rv = cli.main(
                args=list(argv) if argv is not None else None,
                prog_name="lmforge",
                standalone_mode=False,
            )
        distributed.shutdown()  # after a failure the process just exits: a peer may be gone
        return rv if isinstance(rv, int) else 0
    except UserError as e:
        _fail(str(e))
    except click.exceptions.NoArgsIsHelpError as e:  # bare `lmforge` or `lmforge tokenizer`
        click.echo(e.ctx.get_help())
        return 0
    except click.ClickException as e:
        _fail(e.format_message())
    except click.exceptions.Abort:
        _fail("aborted")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        distributed.shutdown()
        return PREEMPTED_EXIT_CODE
    return 2


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)
