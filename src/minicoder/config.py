"""Settings: model and training hyper-parameters from a TOML preset, with command-line overrides.

A preset has a [model] table (fields of `ModelConfig`) and a [train] table (fields of `TrainConfig`).
Any field can be overridden on the command line as `--name VALUE` (`--lr 3e-4`, `--hidden-size 128`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import MinicoderError
from .model import ModelConfig


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # the run's length; sets the learning-rate schedule
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, see train/schedule.py)
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    optimizer: str = "adamw"  # adamw | muon (hidden weight matrices on torch.optim.Muon, the rest on AdamW: train/optim.py)
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast); auto picks bf16 only where the hardware has fast bf16
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    keep_checkpoints: int = 2
    init: str = ""  # a checkpoint to start from (SFT); empty = random init


def _convert(value: str, typ):
    if typ in (bool, "bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    for t in (int, float, str):
        if typ in (t, t.__name__):
            return t(value)
    if "int" in str(typ):  # `int | None`
        return None if value.lower() == "none" else int(value)
    return value


def _apply(obj, values: dict, where: str):
    names = {f.name: f.type for f in fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise MinicoderError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(names))})")
        if isinstance(value, str) and names[key] not in (str, "str"):
            try:
                value = _convert(value, names[key])
            except ValueError as e:
                raise MinicoderError(f"{where}: bad value for {key}: {e}") from None
        setattr(obj, key, value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[ModelConfig, TrainConfig]:
    model, train = ModelConfig(), TrainConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise MinicoderError(f"{path}: config file does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise MinicoderError(f"{path}: invalid TOML ({e})") from None
        unknown = set(data) - {"model", "train"}
        if unknown:
            raise MinicoderError(f"{path}: unknown table(s) {sorted(unknown)}; expected [model] and [train]")
        _apply(model, data.get("model", {}), f"{path} [model]")
        _apply(train, data.get("train", {}), f"{path} [train]")
    apply_overrides(model, train, overrides)
    return model, train


def apply_overrides(model: ModelConfig, train: TrainConfig, overrides: list[str]):
    """Parse leftover `--name value` / `--name=value` arguments onto whichever config has that field."""
    model_names = {f.name for f in fields(model)}
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise MinicoderError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise MinicoderError(f"{arg} needs a value")
            value = args.pop(0)
        name = name.replace("-", "_")
        target = model if name in model_names else train
        _apply(target, {name: value}, "command line")


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
