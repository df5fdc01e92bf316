"""Calibration tokens for AWQ: windows of the model's own code data, never anything from the internet.

A source is a packed data directory (`minicoder data pack`: its train split, same tokenizer required) or a
corpus directory (`minicoder data corpus`: documents tokenized here). With no source, the data the model was
trained on (recorded in its run's settings.json) is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import MinicoderError


def default_source(model_dir: Path) -> Path:
    """The packed data named by the run's settings.json (RUN/final/ or RUN/checkpoints/step-N/)."""
    run = model_dir.resolve().parent
    settings = next((d / "settings.json" for d in (run, run.parent) if (d / "settings.json").is_file()), None)
    data = json.loads(settings.read_text()).get("data") if settings else None
    if not data or not Path(data).is_dir():
        raise MinicoderError(f"{model_dir}: no calibration data recorded with this model; pass --calib DIR "
                             "(a packed data directory or a corpus directory of the model's kind of code)")
    return Path(data)


def _spread(n_available: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_available) (deterministic, covering the whole source)."""
    return np.linspace(0, n_available - 1, num=min(n, n_available)).round().astype(int).tolist()


def _from_packed(source: Path, model_dir: Path, samples: int, seqlen: int) -> torch.Tensor:
    from ..tokenizer import Tokenizer
    from ..train.data import TokenWindows

    windows = TokenWindows(source, "train", seqlen)
    if Tokenizer(model_dir).fingerprint() != windows.meta.get("tokenizer_fingerprint"):
        raise MinicoderError(f"{source}: packed with a different tokenizer than {model_dir} (fingerprints differ)")
    x, _ = windows.get(_spread(len(windows), samples))
    return x


def _from_corpus(source: Path, model_dir: Path, samples: int, seqlen: int) -> torch.Tensor:
    from ..tokenizer import Tokenizer, corpus_texts

    tok = Tokenizer(model_dir)
    ids: list[int] = []
    for text in corpus_texts(source, max_bytes=samples * seqlen * 6):  # ~3-4 bytes per token of code
        if text.strip():
            ids += tok.encode(text) + [tok.eos_id]
    n = len(ids) // seqlen
    if n == 0:
        raise MinicoderError(f"{source}: no usable text for calibration ({len(ids)} tokens, fewer than "
                             f"--calib-seqlen {seqlen})")
    windows = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
    return windows[_spread(n, samples)]


def calibration_tokens(model_dir: Path, source: Path | None, samples: int, seqlen: int) -> tuple[torch.Tensor, Path]:
    """(samples, seqlen) token ids (fewer rows when the source is small) and the source used."""
    if samples < 1 or seqlen < 2:
        raise MinicoderError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2, got {samples} and {seqlen}")
    source = Path(source) if source else default_source(model_dir)
    if (source / "meta.json").is_file() and (source / "docs").is_dir():
        tokens = _from_corpus(source, model_dir, samples, seqlen)
    elif (source / "meta.json").is_file():
        tokens = _from_packed(source, model_dir, samples, seqlen)
    elif source.is_dir() and (source / "docs").is_dir():
        tokens = _from_corpus(source, model_dir, samples, seqlen)
    else:
        raise MinicoderError(f"{source}: not a packed data directory (meta.json) nor a corpus directory (docs/)")
    return tokens, source
