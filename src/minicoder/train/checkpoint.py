"""Training checkpoints: a Hugging Face model directory plus one trainer-state file, written atomically.

  OUT/checkpoints/step-000100/
    config.json  model.safetensors  generation_config.json   <- loads in stock transformers
    tokenizer.json  tokenizer_config.json  special_tokens_map.json
    trainer_state.pt   <- optimizer moments, step, RNG states, settings (what --resume needs)

A checkpoint is built in a hidden temporary directory, fsynced, then renamed into place: a run killed
mid-save leaves the previous checkpoints intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.io import fsync_tree
from ..errors import MinicoderError

def read_training_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / TRAINING_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def copy_tokenizer(tokenizer_dir: Path, out: Path):
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINING_INFO = "minicoder.json"  # what made this model: stage, preset, steps, tokens trained


def save_model_dir(model, tokenizer_dir: Path, out: Path, extra_state: dict | None = None, info: dict | None = None):
    """Write a complete, atomically-renamed model directory (plus trainer state when given)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        copy_tokenizer(tokenizer_dir, tmp)
        if info is not None:
            (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if extra_state is not None:
            torch.save(extra_state, tmp / STATE_FILE)
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    ckpt_dir = out_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(model, optimizer, step: int, settings: dict, tokenizer_dir: Path, out_dir: Path, keep: int,
                    info: dict | None = None) -> Path:
    path = out_dir / "checkpoints" / f"step-{step:06d}"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "settings": settings}
    save_model_dir(model, tokenizer_dir, path, state, info)
    for _, old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_trainer_state(path: Path) -> dict:
    file = path / STATE_FILE
    if not file.is_file():
        raise MinicoderError(f"{file}: missing; {path} is not a resumable checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated zip/pickle data
        raise MinicoderError(f"{file}: cannot read trainer state ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
