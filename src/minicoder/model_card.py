"""MODEL_CARD.md for a recipe run: data and licences, tokens, wall time per stage, loss curves, every score with
the command that produced it, limitations, and how to reproduce -- all read from what the stages wrote, nothing
typed in by hand. `write_model_card` puts it in the run folder; `minicoder export ship` renders the same card for
the shipped copy (its own model paths, the loss curves copied beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .train.checkpoint import read_training_info

SOURCE_LICENCES = {"stdlib": "Python Software Foundation License 2.0"}  # corpus sources that are not packages
TRAINING_STAGES = ("pretrain", "anneal", "sft")


@dataclass(frozen=True)
class CardLayout:
    """Where the card's reader finds the models and the loss curves, relative to the card."""

    base: str = "anneal/final"
    instruct: str = "sft/final"
    figures: str = ""  # "" = each stage's own folder (STAGE/loss.png); else FOLDER/STAGE_loss.png

    def figure(self, stage: str) -> str:
        return f"{self.figures}/{stage}_loss.png" if self.figures else f"{stage}/loss.png"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _scores(summary: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.get("scores", {}).items())


def _data(out: Path) -> list[str]:
    corpus, data, tasks = _json(out / "corpus" / "meta.json"), _json(out / "data" / "meta.json"), _json(out / "tasks" / "meta.json")
    lines = ["## Data", ""]
    if corpus:
        c = corpus.get("counts", {})
        lines.append(f"- corpus: {c.get('files_kept', 0):,} files, {c.get('bytes_kept', 0) / 1e6:.1f} MB from "
                     f"{c.get('repositories_kept', 0)} repositories (of {c.get('files_seen', 0):,} files seen); "
                     f"removed: {c.get('exact_duplicates', 0)} exact and {c.get('near_duplicates_file', 0)} near-duplicate "
                     f"files, {c.get('decontaminated', 0)} files overlapping HumanEval (10-gram), "
                     + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in c.get("dropped", {}).items()))
        for s in corpus.get("sources", []):
            if s["spec"] in SOURCE_LICENCES:
                lines.append(f"  - {s['spec']}: {SOURCE_LICENCES[s['spec']]}")
    for name, info in sorted((corpus.get("package_licences") or {}).items(), key=lambda kv: kv[0].lower()):
        lines.append(f"  - package {name} {info['version']}: {info['licence']}")
    if data:
        tr, va = data["splits"]["train"], data["splits"]["val"]
        lines.append(f"- pretraining data: {tr['tokens']:,} train tokens ({tr['repositories']} repositories), "
                     f"{va['tokens']:,} held-out tokens ({va['repositories']} repositories, never FIM-transformed); "
                     f"FIM rate {data['fim']['rate']} per chunk inside {data['fim']['window']}-token windows")
    if tasks:
        documents = ", ".join(f"{n:,} {kind}" for kind, n in tasks["documents"].items())
        lines.append(f"- annealing data: {tasks['exercises_kept']:,} sandbox-verified exercises; documents: {documents}; "
                     f"decontamination: {tasks['decontamination']}")
    return lines + [""]


def _training(out: Path, state: dict, layout: CardLayout) -> list[str]:
    lines = ["## Training", "", "| stage | wall time (s) | tokens trained (cumulative) | final loss | validation bits/byte |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for stage, record in state["stages"].items():
        info = read_training_info(out / stage / "final") if stage in TRAINING_STAGES else {}
        summary = _json(out / stage / "summary.json")
        tokens = f"{info['tokens_trained']:,}" if info.get("tokens_trained") else ""
        loss = f"{summary['loss']:.4f}" if summary.get("loss") is not None else ""
        bpb = f"{summary['val_bpb']:.4f}" if summary.get("val_bpb") is not None else ""
        lines.append(f"| {stage} | {record['seconds']} | {tokens} | {loss} | {bpb} |")
    total = sum(r["seconds"] for r in state["stages"].values())
    lines += ["", f"Total stage time {total / 3600:.2f} h.", ""]
    lines += [f"![{s} loss]({layout.figure(s)})" for s in TRAINING_STAGES if (out / s / "loss.png").exists()]
    return lines + [""]


def _scores_table(out: Path) -> list[str]:
    lines = ["## Scores", "", "| model | evaluation | scores | command |", "| --- | --- | --- | --- |"]
    for summary_file in sorted((out / "eval").glob("*/*/*_summary.json")):
        s = _json(summary_file)
        command = f"`{s['command']}`" if s.get("command") else ""
        lines.append(f"| {summary_file.parts[-3]} | {s['task']} | {_scores(s)} | {command} |")
    if len(lines) == 4:
        lines.append("| | not evaluated yet: run the recipe's eval stage | | |")
    return lines + [""]


def render_model_card(out: Path, state: dict, layout: CardLayout = CardLayout()) -> str:
    recipe = Path(state["recipe"])
    recipe = recipe.stem.removeprefix("recipe_") if recipe.parent.name == "configs" else str(recipe)  # a shipped preset
    lines = ["# minicoder model card", "",
             f"Built by `minicoder recipe {recipe} --out {out}`; base model `{layout.base}` (completion and "
             f"fill-in-the-middle), instruct model `{layout.instruct}` (chat template).", ""]
    settings = _json(out / "pretrain" / "settings.json")
    if settings:
        m, t = settings["model"], settings["train"]
        lines += ["## Model", "", f"Llama-style decoder: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
                  f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV), vocabulary {m['vocab_size']}, "
                  f"trained at {t['seq_len']} tokens of context with {t.get('optimizer', 'adamw')}.", ""]
    lines += _data(out) + _training(out, state, layout) + _scores_table(out)
    lines += ["## Limitations", "",
              "- A small model trained on a few CPU hours: it completes short, common Python idioms; it does not "
              "reliably solve multi-step problems, and its chat answers are only as good as its base model.",
              "- Python only; the corpus is the standard library and the listed packages, so other styles and domains are unseen.",
              "- Evaluation data (HumanEval and its infilling set) was kept out by 10-gram decontamination and "
              "entry-point names; the exercises were written from scratch.", "",
              "## Reproduce", "", "```", f"minicoder recipe {recipe} --out {out}",
              "# in sittings: add --stop-after STAGE, then rerun with --resume",
              f"minicoder export ship {out} --out DIR   # the bf16 base + instruct copies and this card", "```", ""]
    return "\n".join(lines)


def write_model_card(out: Path, state: dict) -> Path:
    card = out / "MODEL_CARD.md"
    card.write_text(render_model_card(out, state))
    return card
