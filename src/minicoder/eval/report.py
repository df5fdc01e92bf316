"""Evaluation reports: one JSON summary per run, and a row appended to a Markdown results table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..train.checkpoint import read_training_info

HEADER = ("| date | evaluation | model | stage / preset | tokens trained | scores |\n"
          "| --- | --- | --- | --- | ---: | --- |\n")


def describe_model(model: str | None, endpoint: str | None) -> dict:
    if endpoint:
        return {"model": endpoint, "stage": "endpoint", "preset": "", "tokens_trained": None}
    if not model:  # scoring an existing samples file
        return {"model": None, "stage": "samples", "preset": "", "tokens_trained": None}
    info = read_training_info(model)
    return {"model": str(model), "stage": info.get("stage", "?"), "preset": info.get("preset", "?"),
            "tokens_trained": info.get("tokens_trained")}


def write_report(task: str, scores: dict, model_info: dict, out_dir: Path, results_md: str | Path | None,
                 command: str | None = None) -> dict:
    """`command`: the command line that produced the scores (the model card quotes it)."""
    summary = {"task": task, "date": time.strftime("%Y-%m-%d %H:%M"), **model_info, "scores": scores,
               **({"command": command} if command else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{task}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if results_md:
        path = Path(results_md)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("# Evaluation results\n\nRows are appended by `minicoder eval`.\n\n" + HEADER)
        tokens = model_info["tokens_trained"]
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
        with open(path, "a") as f:
            f.write(f"| {summary['date']} | {task} | `{model_info['model']}` | {model_info['stage']} / {model_info['preset']} | "
                    f"{f'{tokens:,}' if tokens else '?'} | {shown} |\n")
    return summary
