"""The default model: which model a command uses when none is given.

minicoder ships its recipe's model in the repository, under models/minicoder-small/:
  base/       completion and fill-in-the-middle (the annealed pretrained model): `generate`, `eval`
  instruct/   chat template (the SFT model): `serve`, `chat`, `agent`
  MODEL_CARD.md
each a Hugging Face model directory in bf16 (written by `minicoder export ship`).

`$MINICODER_MODEL` overrides it: a model directory (used by every command), or a folder laid out as above
(each command takes its kind from it). An installed wheel does not carry the weights, so without either the
command fails with an error saying how to get a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MinicoderError

SHIPPED_NAME = "minicoder-small"
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"  # the source checkout's models/ folder
KINDS = ("base", "instruct")
ENV = "MINICODER_MODEL"


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def default_model(kind: str) -> str:
    """The model directory a command uses when it was given none: `kind` is base or instruct."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    env = os.environ.get(ENV)
    if env:
        root = Path(env).expanduser()
        if is_model_dir(root):
            return str(root)
        if is_model_dir(root / kind):
            return str(root / kind)
        raise MinicoderError(f"${ENV}={env}: neither a model directory (config.json) nor a folder with {kind}/ in it")
    path = MODELS_DIR / SHIPPED_NAME / kind
    if is_model_dir(path):
        return str(path)
    raise MinicoderError(
        f"no model given, and the default {kind} model {path} is not there (an installed package does not include "
        f"the weights): pass a model directory, set ${ENV}, or build one in a source checkout with `make model` "
        f"and `minicoder export ship runs/model --out models/{SHIPPED_NAME}`")


def resolve_model(model: str | None, kind: str) -> str:
    """`model` when given, else the default model of that kind."""
    return model if model else default_model(kind)


def default_help(kind: str) -> str:
    """The sentence --help gives a command's optional MODEL argument."""
    return (f"a model directory (default: ${ENV}, else the shipped {kind} model "
            f"models/{SHIPPED_NAME}/{kind} of a source checkout)")


def served_name(model_dir: Path) -> str:
    """The API's model name for a directory: its name, with its folder's for a shipped layout (minicoder-small-instruct)."""
    path = model_dir.resolve()
    return f"{path.parent.name}-{path.name}" if path.name in KINDS and path.parent.name else path.name
