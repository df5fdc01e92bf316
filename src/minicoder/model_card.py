"""MODEL_CARD.md for a recipe run: data and licences, tokens, wall time per stage, loss curves, every score,
limitations, and how to reproduce -- all read from what the stages wrote, nothing typed in by hand."""

from __future__ import annotations

import json
from pathlib import Path

from .train.checkpoint import read_training_info


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _scores(summary: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.get("scores", {}).items())


def write_model_card(out: Path, state: dict) -> Path:
    corpus, data, tasks = _json(out / "corpus" / "meta.json"), _json(out / "data" / "meta.json"), _json(out / "tasks" / "meta.json")
    lines = ["# minicoder model card", "",
             f"Built by `minicoder recipe {state['recipe']} --out {out}`; base model `anneal/final` (completion and "
             "fill-in-the-middle), instruct model `sft/final` (chat template).", ""]
    settings = _json(out / "pretrain" / "settings.json")
    if settings:
        m = settings["model"]
        lines += ["## Model", "", f"Llama-style decoder: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
                  f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV), vocabulary {m['vocab_size']}, "
                  f"trained at {settings['train']['seq_len']} tokens of context.", ""]
    lines += ["## Data", ""]
    if corpus:
        sources = ", ".join(s["spec"] for s in corpus.get("sources", []))
        lines.append(f"- corpus: {sources}; filters, dedup and decontamination counts in `corpus/meta.json`")
    for name, info in (corpus.get("package_licences") or {}).items():
        lines.append(f"  - package {name} {info['version']}: {info['licence']}")
    if data:
        tr, va = data["splits"]["train"], data["splits"]["val"]
        lines.append(f"- pretraining data: {tr['tokens']:,} train tokens ({tr['repositories']} repositories), "
                     f"{va['tokens']:,} held-out tokens ({va['repositories']} repositories, never FIM-transformed); "
                     f"FIM rate {data['fim']['rate']} per chunk inside {data['fim']['window']}-token windows")
    if tasks:
        lines.append(f"- annealing data: {tasks['exercises_kept']} sandbox-verified exercises, documents {tasks['documents']}; "
                     f"{tasks['decontamination']}")
    lines += ["", "## Training", "", "| stage | wall time (s) | tokens trained (cumulative) | final loss |", "| --- | ---: | ---: | ---: |"]
    for stage, record in state["stages"].items():
        info = read_training_info(out / stage / "final") if stage in ("pretrain", "anneal", "sft") else {}
        summary = _json(out / stage / "summary.json")
        tokens = f"{info['tokens_trained']:,}" if info.get("tokens_trained") else ""
        loss = f"{summary['loss']:.4f}" if summary.get("loss") is not None else ""
        lines.append(f"| {stage} | {record['seconds']} | {tokens} | {loss} |")
    lines += [""] + [f"![{s} loss]({s}/loss.png)" for s in ("pretrain", "anneal", "sft") if (out / s / "loss.png").exists()]
    lines += ["", "## Scores", "", "| model | evaluation | scores |", "| --- | --- | --- |"]
    for summary_file in sorted((out / "eval").glob("*/*/*_summary.json")):
        s = _json(summary_file)
        lines.append(f"| {summary_file.parts[-3]} | {s['task']} | {_scores(s)} |")
    lines += ["", "Commands: each score's command is in the recipe log; `results.md` holds the same rows.", "",
              "## Limitations", "",
              "- A small model trained on a few CPU hours: it completes short, common Python idioms; it does not "
              "reliably solve multi-step problems, and its chat answers are only as good as its base model.",
              "- Python only; the corpus is the standard library and the listed packages, so other styles and domains are unseen.",
              "- Evaluation data (HumanEval and its infilling set) was kept out by 10-gram decontamination and "
              "entry-point names; the exercises were written from scratch.", "",
              "## Reproduce", "", "```", f"minicoder recipe {state['recipe']} --out {out}",
              f"# in sittings: add --stop-after STAGE, then rerun with --resume", "```", ""]
    card = out / "MODEL_CARD.md"
    card.write_text("\n".join(lines))
    return card
