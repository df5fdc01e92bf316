"""`minicoder export ship RUN --out DIR`: a finished recipe run -> the copy minicoder ships as its default model.

  DIR/base/       the annealed model (RUN/anneal/final), bf16 safetensors + tokenizer + minicoder.json
  DIR/instruct/   the SFT model (RUN/sft/final), the same
  DIR/figures/    the stages' loss curves
  DIR/MODEL_CARD.md   the run's card, pointing at the paths above

Written atomically (a temporary folder renamed into place): a killed export leaves the old DIR or the new one.
bf16 halves the files (the weights are what git carries); the engine computes in fp32 from them by default.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..data.io import atomic_output_dir
from ..errors import MinicoderError
from ..model_card import TRAINING_STAGES, CardLayout, render_model_card
from ..shipped import SHIPPED_NAME, is_model_dir
from ..train.checkpoint import TRAINING_INFO, copy_tokenizer, read_training_info

SOURCES = {"base": "anneal/final", "instruct": "sft/final"}  # shipped name -> the recipe's output


def export_bf16(source: Path, out: Path, info: dict) -> int:
    """One model directory in bf16 (weights, config, tokenizer, minicoder.json); returns its weights' bytes."""
    import torch

    from ..model import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(source)
    model.save_pretrained(out, dtype=torch.bfloat16)
    copy_tokenizer(source, out)
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return (out / "model.safetensors").stat().st_size


def ship(run: str | Path, out: str | Path, force: bool = False) -> dict:
    run = Path(run)
    state_file = run / "recipe.json"
    if not state_file.is_file():
        raise MinicoderError(f"{run}: not a recipe run (no recipe.json); make one with `minicoder recipe small --out {run}`")
    state = json.loads(state_file.read_text())
    for kind, rel in SOURCES.items():
        if not is_model_dir(run / rel):
            raise MinicoderError(f"{run / rel}: missing, so there is no {kind} model to ship yet; finish the recipe "
                                 f"with `minicoder recipe {state['recipe']} --out {run} --resume`")
    summary = {"out": str(out), "bytes": 0, "evaluated": (run / "eval").is_dir()}
    with atomic_output_dir(out, force=force) as tmp:
        for kind, rel in SOURCES.items():
            info = {**read_training_info(run / rel), "shipped_from": str(run / rel), "dtype": "bfloat16"}
            summary["bytes"] += export_bf16(run / rel, tmp / kind, info)
        (tmp / "figures").mkdir()
        for stage in TRAINING_STAGES:
            if (run / stage / "loss.png").is_file():
                shutil.copy2(run / stage / "loss.png", tmp / "figures" / f"{stage}_loss.png")
        layout = CardLayout(base="base", instruct="instruct", figures="figures")
        (tmp / "MODEL_CARD.md").write_text(render_model_card(run, state, layout))
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `minicoder export ship`."""
    parser.add_argument("run", type=Path, metavar="RUN", help="a finished `minicoder recipe` output folder (e.g. runs/model)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help=f"where base/, instruct/ and MODEL_CARD.md go (the default model: models/{SHIPPED_NAME})")
    parser.add_argument("--force", action="store_true", help="replace an existing DIR (only once the new copy is complete)")


def run(args: argparse.Namespace) -> None:
    s = ship(args.run, args.out, force=args.force)
    note = "" if s["evaluated"] else "; the recipe's eval stage has not run, so the card has no scores yet"
    print(f"shipped: base + instruct in bf16 ({s['bytes'] / 1e6:.1f} MB of weights) and MODEL_CARD.md -> {s['out']}{note}")
