"""Training checkpoints: a Hugging Face model directory plus one trainer-state file, written atomically.

  OUT/checkpoints/step-000100/
    config.json  model.safetensors  generation_config.json   <- loads in stock transformers
    tokenizer.json  tokenizer_config.json  special_tokens_map.json
    trainer_state.pt   <- optimizer moments, step, RNG states, settings (what --resume needs)

A checkpoint is built in a hidden temporary directory, fsynced, then renamed into place; an old checkpoint
is renamed to a hidden name before it is deleted, and `final/` is replaced the same way (data/io.py). So a
run killed at any moment leaves under real names only complete checkpoints, and `--resume` takes the newest
one that loads completely (trainer state and weights), setting aside newer ones that do not.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.io import clean_stale_temps, remove_dir, replace_dir, work_dir
from ..errors import MinicoderError
from ..model import LlamaForCausalLM

def read_training_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / TRAINING_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinicoderError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from None


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
    tmp = work_dir(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        copy_tokenizer(tokenizer_dir, tmp)
        if info is not None:
            (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if extra_state is not None:
            torch.save(extra_state, tmp / STATE_FILE)
        replace_dir(tmp, out)
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
        remove_dir(old)
    return path


def load_trainer_state(path: Path) -> dict:
    file = path / STATE_FILE
    if not file.is_file():
        raise MinicoderError(f"{file}: missing; {path} is not a resumable checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated zip/pickle data
        raise MinicoderError(f"{file}: cannot read trainer state ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise MinicoderError(f"{file}: not a minicoder trainer state (no step, optimizer and rng entries)")
    return state


def clean_run_dir(out_dir: Path) -> None:
    """Tidy what killed runs left in a run folder: partial checkpoints, checkpoints half-deleted by rotation,
    a `final/` caught mid-replacement (put back), temporary copies of the log and the small JSON files."""
    clean_stale_temps(out_dir / "checkpoints", r"step-\d+")
    clean_stale_temps(out_dir, r"final|log\.jsonl|settings\.json|summary\.json")


@dataclass
class ResumePoint:
    step: int
    path: Path
    state: dict  # the trainer state (optimizer, RNG, settings)
    info: dict  # its minicoder.json (steps, tokens trained, ...)
    model: LlamaForCausalLM  # the checkpoint's weights, loaded on the CPU


def newest_loadable_checkpoint(out_dir: Path) -> tuple[ResumePoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose trainer state and weights both load, and (path, why) for each newer one that did not."""
    unloadable = []
    for step, path in reversed(list_checkpoints(out_dir)):
        try:
            state = load_trainer_state(path)
            model = LlamaForCausalLM.from_pretrained(path)
            info = read_training_info(path)
        except MinicoderError as e:
            unloadable.append((path, str(e)))
            continue
        return ResumePoint(state["step"], path, state, info, model), unloadable
    return None, unloadable


def set_aside(path: Path) -> Path:
    """Rename an unloadable checkpoint out of the step-N namespace (kept for inspection, never rotated into use)."""
    aside = path.with_name(path.name + ".unloadable")
    if aside.exists():
        remove_dir(aside)  # an older broken copy of the same step
    os.rename(path, aside)
    print(f"warning: {path} does not load; kept as {aside}", file=sys.stderr)
    return aside
