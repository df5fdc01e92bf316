"""Held-out loss and bits per byte of a model on a packed data directory's validation split.

Bits per byte (= loss / ln 2 x tokens / UTF-8 bytes) compares models with different tokenizers; the
validation split is whole held-out repositories and never FIM-transformed (see data/pack.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import MinicoderError
from ..model import LlamaForCausalLM
from ..tokenizer import Tokenizer
from ..train.checkpoint import read_training_info
from ..train.data import TokenWindows
from ..train.loop import loss_fn


@torch.inference_mode()
def heldout_loss(model_dir: str | Path, data_dir: str | Path, seq_len: int | None = None, batch_size: int = 8,
                 max_windows: int | None = None, progress: bool = True, quantize: str | None = None,
                 kv_cache_dtype: str = "auto", dtype: torch.dtype | str = torch.float32) -> dict:
    """`quantize` / `kv_cache_dtype` compute as the engine's `--quantize` / `--kv-cache-dtype` do; `dtype` as
    `--dtype` (auto: bf16 where the CPU runs it natively)."""
    from ..engine.options import resolve_dtype

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype)[0])
    model.set_kv_cache_dtype(kv_cache_dtype)
    if quantize:
        from ..quant.apply import quantize_model

        quantize_model(model, quantize)
    # Default: the length the model was trained at (longer windows would measure extrapolation, not fit).
    seq_len = seq_len or read_training_info(model_dir).get("seq_len") or min(1024, model.config.max_position_embeddings)
    data = TokenWindows(data_dir, "val", seq_len)
    if Tokenizer(model_dir).fingerprint() != data.meta.get("tokenizer_fingerprint"):
        raise MinicoderError(f"{data_dir}: packed with a different tokenizer than {model_dir} (fingerprints differ)")
    n = min(len(data), max_windows) if max_windows else len(data)
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc="loss", unit="batch", disable=not progress):
        x, y = data.get(list(range(i, min(n, i + batch_size))))
        total += loss_fn(model(x), y).item() * len(x)
    loss = total / n
    val = data.meta["splits"]["val"]
    return {"loss": loss, "bits_per_byte": loss / math.log(2) * val["tokens"] / val["bytes"], "windows": n,
            "seq_len": data.seq_len, "tokens": n * data.seq_len}
