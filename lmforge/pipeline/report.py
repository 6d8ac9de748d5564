"""The report card of a run: `report.md`, the same as `report.html`, and PNG plots.

Built only from what the stages wrote: each stage's `metrics.jsonl`, the eval folders'
`answers.jsonl` (sample conversations) and the run's `stages.json` (wall times), so
`lmforge report RUN` rebuilds it at any time and every number in it can be traced to a file.
The document is a list of blocks (headings, paragraphs, tables, images, quotes) rendered twice,
as Markdown and as HTML; nothing from a model is ever written into the HTML unescaped.
"""

from __future__ import annotations

import html
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.io import atomic_write_text
from lmforge.pipeline.recipe import FOLDERS, STAGES
from lmforge.training.metrics import read_metrics
from lmforge.training.rundir import final_row

MODELS = ("sft", "best_of_n", "ppo", "dpo", "grpo")  # the alignment table's rows
LABELS = {"base": "base (3-shot)", "sft": "SFT", "best_of_n": "best-of-n", "ppo": "PPO",
          "dpo": "DPO", "grpo": "GRPO"}  # fmt: skip


@dataclass
class Block:
    kind: str  # h1, h2, p, table, img, quote
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def fmt(v: Any) -> str:
    """One number as the report prints it (tests compare against this)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


class Run:
    """Read access to a run folder's stage outputs."""

    def __init__(self, run: Path):
        self.dir = run

    def path(self, stage: str) -> Path:
        return self.dir / FOLDERS.get(stage, stage)

    def rows(self, stage: str) -> list[dict[str, Any]]:
        p = self.path(stage) / "metrics.jsonl"
        return read_metrics(p) if p.is_file() else []

    def last(self, stage: str) -> dict[str, Any]:
        """The last value of every metric of a stage (empty if it has not run)."""
        return final_row(self.path(stage)) if (self.path(stage) / "metrics.jsonl").is_file() else {}

    def wall(self) -> dict[str, float]:
        """Seconds per node ("sft", "eval:ppo"), in pipeline order."""
        p = self.dir / "stages.json"
        nodes = json.loads(p.read_text())["nodes"] if p.is_file() else {}
        order = sorted(nodes, key=lambda k: (STAGES.index(k.split(":")[0]), k))
        return {k: nodes[k]["wall_s"] for k in order if "wall_s" in nodes[k] and k != "report"}


def build(run: Path, conversations: int) -> tuple[list[Block], dict[str, Any]]:
    """The report's blocks, and the plots to draw: {file name: plot spec}."""
    r = Run(run)
    recipe = (
        json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").is_file() else {}
    )
    blocks = [Block("h1", f"lmforge run: {recipe.get('name', run.name)}")]
    blocks.append(
        Block("p", f"Run folder `{run}`. Every number below is read from the stages' "
                   "`metrics.jsonl` files; `lmforge report` rebuilds this page.")
    )  # fmt: skip
    plots: dict[str, Any] = {}
    blocks += _summary(r)
    for section in (_tokenizer, _pretrain, _sft, _reward, _alignment):
        new_blocks, new_plots = section(r)
        blocks += new_blocks
        plots |= new_plots
    blocks += _conversations(r, conversations)
    blocks += _time(r)
    blocks += _machine()
    return blocks, plots


# ---------------------------------------------------------------------------------------------
# Sections


def _summary(r: Run) -> list[Block]:
    """Each stage against its own baseline: did it learn?"""
    rows = []

    def verdict(stage: str, metric: str, value: float, baseline: str, better: bool) -> None:
        rows.append((stage, metric, fmt(value), baseline, fmt(better)))

    base, sft, rm, ev_base = (
        r.last("pretrain"),
        r.last("eval/sft"),
        r.last("reward"),
        r.last("eval/base"),
    )
    if "val_loss" in base and "unigram_val_loss" in base:
        verdict("pretraining", "held-out loss (nats/token), lower is better", base["val_loss"],
                f"unigram {fmt(base['unigram_val_loss'])}",
                base["val_loss"] < base["unigram_val_loss"])  # fmt: skip
    if "em" in sft and "em" in ev_base:
        verdict("SFT", "exact match, test prompts (greedy)", sft["em"],
                f"base 3-shot {fmt(ev_base['em'])}", sft["em"] > ev_base["em"])  # fmt: skip
    if "val_acc" in rm:
        ceiling = fmt(rm.get("val_ceiling"))
        verdict("reward model", "held-out pairwise accuracy", rm["val_acc"],
                f"chance 0.500 (ceiling {ceiling})", rm["val_acc"] > 0.5)  # fmt: skip
    if "gold" in sft:
        for m in MODELS[1:]:
            gold = _model_row(r, m).get("gold")
            if gold is not None:
                verdict(LABELS[m], "gold reward of samples, test prompts (0-1)", gold,
                        f"SFT {fmt(sft['gold'])}", gold > sft["gold"])  # fmt: skip
    if not rows:
        return []
    return [Block("h2", "Summary"),
            Block("table", header=("stage", "gold metric", "value", "baseline", "better"),
                  rows=tuple(rows))]  # fmt: skip


def summary_table(run: Path) -> str:
    """The report's summary table as Markdown ("" before any stage has a verdict)."""
    blocks = _summary(Run(run))
    return to_markdown(blocks[1:]).strip() if blocks else ""


def _tokenizer(r: Run) -> tuple[list[Block], dict[str, Any]]:
    t = r.last("tokenizer")
    if not t:
        return [], {}
    row = (t["algo"], fmt(t["vocab_size"]), fmt(t["bytes_per_token_heldout"]), fmt(t["train_docs"]))
    return [Block("h2", "Tokenizer"),
            Block("table", header=("algorithm", "vocabulary", "bytes per token (held-out)",
                                   "training documents"), rows=(row,))], {}  # fmt: skip


def _pretrain(r: Run) -> tuple[list[Block], dict[str, Any]]:
    rows, last = r.rows("pretrain"), r.last("pretrain")
    if "val_loss" not in last:
        return [], {}
    table = (fmt(last.get("params")), fmt(last.get("step")), fmt(last.get("tokens")),
             fmt(last["val_loss"]), fmt(last.get("unigram_val_loss")), fmt(last.get("val_bpb")),
             fmt(last.get("val_acc")), fmt(last.get("tokens_per_s")))  # fmt: skip
    plot = {"title": "pretraining loss", "x": "step", "y": "loss (nats/token)",
            "series": _series(rows, {"train": "loss", "held-out": "val_loss"}),
            "hline": (last.get("unigram_val_loss"), "unigram baseline")}  # fmt: skip
    return [Block("h2", "Pretraining"),
            Block("table", header=("parameters", "steps", "tokens", "val loss", "unigram val loss",
                                   "val bits/byte", "val accuracy", "tokens/s"), rows=(table,)),
            Block("img", "plots/pretrain_loss.png")], {"pretrain_loss.png": plot}  # fmt: skip


def _sft(r: Run) -> tuple[list[Block], dict[str, Any]]:
    ev_sft, ev_base, train = r.last("eval/sft"), r.last("eval/base"), r.rows("sft")
    if not train:
        return [], {}
    plot = {"title": "SFT loss", "x": "step", "y": "loss (reply tokens)",
            "series": _series(train, {"train": "loss", "held-out": "val_loss"})}  # fmt: skip
    blocks = [Block("h2", "Supervised fine-tuning")]
    if ev_sft:  # world tasks: exact match per task, against the base model few-shot
        tasks = [k.removeprefix("em/") for k in ev_sft if k.startswith("em/")]
        rows = [(t, fmt(ev_base.get(f"em/{t}")), fmt(ev_sft[f"em/{t}"])) for t in tasks]
        rows.append(("all", fmt(ev_base.get("em")), fmt(ev_sft.get("em"))))
        blocks += [
            Block("p", "Exact match per task, test prompts, greedy decoding."),
            Block("table", header=("task", "base (3-shot)", "SFT"), rows=tuple(rows)),
        ]
    return [*blocks, Block("img", "plots/sft_loss.png")], {"sft_loss.png": plot}  # fmt: skip


def _reward(r: Run) -> tuple[list[Block], dict[str, Any]]:
    rm, label = r.last("reward"), r.last("label")
    if "val_acc" not in rm:
        return [], {}
    row = (fmt(label.get("pairs", rm.get("n_train"))), fmt(label.get("val_pairs", rm.get("n_val"))),
           fmt(label.get("gold_agreement")), fmt(rm["val_acc"]), fmt(rm.get("val_ceiling")),
           fmt(rm.get("val_gold_agreement")), fmt(rm.get("test_correct_over_wrong")))  # fmt: skip
    plots: dict[str, Any] = {
        "reward_loss.png": {"title": "reward model", "x": "step", "y": "loss / accuracy",
                            "series": _series(r.rows("reward"), {"train loss": "loss",
                                                                 "held-out accuracy": "val_acc"})},
    }  # fmt: skip
    blocks = [Block("h2", "Preferences and reward model"),
              Block("table", header=("train pairs", "val pairs", "annotators agree with gold",
                                     "RM val accuracy", "noise ceiling", "RM agrees with gold",
                                     "RM: correct over wrong"), rows=(row,)),
              *_ai_labels(label), Block("img", "plots/reward_loss.png")]  # fmt: skip
    if rm.get("val_calibration"):
        cal = rm["val_calibration"]
        plots["reward_calibration.png"] = {
            "title": "reward model calibration (held-out pairs)", "x": "predicted P(first wins)",
            "y": "observed share", "series": {"RM": ([c[0] for c in cal], [c[1] for c in cal])},
            "diagonal": True, "markers": True}  # fmt: skip
        blocks.append(Block("img", "plots/reward_calibration.png"))
    return blocks, plots


def _ai_labels(label: dict[str, Any]) -> list[Block]:
    """With AI feedback (recipe `feedback = "ai"`), how its labels compare with the simulated
    annotators' on the same pairs."""
    if label.get("source") != "ai":
        return []
    judge = label.get("judge", {}).get("judge", {})
    return [Block("p", f"Labels from an AI judge ({judge.get('model')}, constitution "
                       f"{judge.get('constitution')}), soft, mean {fmt(label.get('mean_label'))}. "
                       f"Where the gold reward decides a pair they side with it "
                       f"{fmt(label.get('gold_agreement'))} of the time; simulated annotators "
                       f"would {fmt(label.get('annotator_gold_agreement'))}. Expected agreement "
                       f"of the simulated annotators with the AI labels: "
                       f"{fmt(label.get('annotator_agreement'))}.")]  # fmt: skip


def _model_row(r: Run, model: str) -> dict[str, Any]:
    """A model's held-out numbers: from its eval, or (best-of-n, which trains nothing) from
    its own stage metrics."""
    src = r.last("best_of_n") if model == "best_of_n" else r.last(f"eval/{model}")
    if not src:
        return {}
    out = {k: src.get(k) for k in ("gold", "em", "gold_greedy", "rm_score", "kl", "sample_em")}
    if model == "sft":
        out["kl"] = 0.0  # the reference itself
    return out


def _alignment(r: Run) -> tuple[list[Block], dict[str, Any]]:
    rows = []
    for m in MODELS:
        row = _model_row(r, m)
        if row:
            rows.append(
                (
                    LABELS[m],
                    *(
                        fmt(row[k])
                        for k in ("gold", "sample_em", "em", "gold_greedy", "rm_score", "kl")
                    ),
                )
            )
    plots: dict[str, Any] = {}
    blocks: list[Block] = []
    if len(rows) >= 2:
        blocks += [Block("h2", "Alignment: held-out test prompts"),
                   Block("p", "gold: mean gold reward (0-1) of samples at temperature 1; sample "
                              "EM: their exact match; EM and greedy gold: greedy decoding; RM: "
                              "the reward model's mean score of the samples; KL: nats per "
                              "response to the SFT model."),
                   Block("table", header=("model", "gold", "sample EM", "EM", "greedy gold",
                                          "RM", "KL to SFT"), rows=tuple(rows))]  # fmt: skip
    elif any(r.rows(m) for m in ("ppo", "dpo", "grpo")):
        blocks.append(Block("h2", "Alignment: training curves"))
    for m in ("ppo", "grpo"):
        train = [row for row in r.rows(m) if "score" in row]
        if train:
            plots[f"{m}_curves.png"] = {
                "title": f"{LABELS[m]}: per iteration", "x": "iteration", "y": "value",
                "series": _series(train, {"reward (score)": "score", "gold": "gold",
                                          "KL to SFT": "kl"})}  # fmt: skip
            blocks.append(Block("img", f"plots/{m}_curves.png"))
    dpo = [row for row in r.rows("dpo") if "loss" in row]
    if dpo:
        plots["dpo_loss.png"] = {
            "title": "DPO",
            "x": "step",
            "y": "loss / accuracy",
            "series": _series(r.rows("dpo"), {"loss": "loss", "held-out accuracy": "val_acc"}),
        }
        blocks.append(Block("img", "plots/dpo_loss.png"))
    return blocks, plots


def _conversations(r: Run, n: int) -> list[Block]:
    if n == 0:
        return []
    blocks: list[Block] = []
    for m in ("base", "sft", "ppo", "dpo", "grpo"):
        p = r.path(f"eval/{m}") / "answers.jsonl"
        if not p.is_file():
            continue
        answers = [json.loads(line) for line in p.read_text().splitlines()[:n]]
        if not blocks:
            blocks.append(Block("h2", "Sample conversations (test prompts, greedy)"))
        blocks.append(Block("p", f"**{LABELS[m]}**"))
        for a in answers:
            mark = "correct" if a.get("correct") else f"wrong; expected {a.get('answer')!r}"
            blocks.append(Block("quote", f"user: {a['prompt']}\nmodel: {a['response']}  ({mark})"))
    return blocks


def _time(r: Run) -> list[Block]:
    wall = r.wall()
    if not wall:
        return []
    tokens = {
        "pretrain": r.last("pretrain").get("tokens"),
        "sample": r.last("sample").get("tokens"),
    }
    sft = r.last("sft")
    if "train_tokens" in sft and "epoch" in sft:
        tokens["sft"] = round(sft["train_tokens"] * sft["epoch"])
    rows = tuple((name, f"{w:.1f}", fmt(tokens.get(name))) for name, w in wall.items())
    total = sum(wall.values())
    return [Block("h2", "Time and tokens"),
            Block("p", f"Wall time of each stage's last (re)run, {total / 60:.1f} minutes in all. "
                       "Tokens: trained on (pretrain, SFT: reply and prompt tokens of the "
                       "epochs run) or generated (sample)."),
            Block("table", header=("stage", "wall time (s)", "tokens"), rows=rows)]  # fmt: skip


def _machine() -> list[Block]:
    import lmforge

    rows = (
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("lmforge", getattr(lmforge, "__version__", "?")),
        ("platform", platform.platform()),
        ("CPU threads", str(torch.get_num_threads())),
        ("GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    )
    return [Block("h2", "Machine"), Block("table", header=("", ""), rows=rows)]


def _series(rows: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, tuple[list, list]]:
    out = {}
    for label, key in keys.items():
        pts = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
        if pts:
            out[label] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "img":
            out.append(f"![{Path(b.text).stem}]({b.text})")
        elif b.kind == "quote":
            out.append("\n".join("> " + _md_escape(line) + "  " for line in b.text.splitlines()))
        elif b.kind == "table":
            lines = ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    """Model output as literal text: no tables broken, no HTML or links rendered."""
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "img":
            body.append(f'<p><img src="{e(b.text)}" alt="{e(Path(b.text).stem)}"></p>')
        elif b.kind == "quote":
            body.append(f"<blockquote><pre>{e(b.text)}</pre></blockquote>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in b.rows)  # fmt: skip
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
             "img{max-width:100%}pre{white-space:pre-wrap;margin:0}")  # fmt: skip
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src 'self'; style-src 'unsafe-inline'\">"
        f"<title>{e(title)}</title><style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def draw(path: Path, spec: dict[str, Any]) -> None:
    """One line plot from a spec built above (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (x, y) in spec["series"].items():
        ax.plot(x, y, "o-" if spec.get("markers") else "-", label=label, lw=1.4, ms=4)
    hline = spec.get("hline")
    if hline and hline[0] is not None:
        ax.axhline(hline[0], color="gray", ls="--", lw=1, label=hline[1])
    if spec.get("diagonal"):
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    ax.set(title=spec["title"], xlabel=spec["x"], ylabel=spec["y"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_report(run: Path, conversations: int | None = None) -> Path:
    """Write RUN/report.md, RUN/report.html and RUN/plots/*.png; return the Markdown path.
    `conversations` per model (default: the recipe's `conversations`)."""
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    if not (run / "stages.json").is_file() or not (run / "recipe.json").is_file():
        raise UserError(f"{run}: not an lmforge run folder (no stages.json); see `lmforge run`")
    if conversations is None:
        conversations = int(json.loads((run / "recipe.json").read_text()).get("conversations", 3))
    blocks, plots = build(run, conversations)
    (run / "plots").mkdir(exist_ok=True)
    for name, spec in plots.items():
        if spec["series"]:
            draw(run / "plots" / name, spec)
    blocks = [b for b in blocks if b.kind != "img" or (run / b.text).is_file()]
    atomic_write_text(run / "report.md", to_markdown(blocks))
    atomic_write_text(run / "report.html", to_html(blocks, blocks[0].text))
    return run / "report.md"
