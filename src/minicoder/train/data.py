"""Training batches from packed token shards.

The data order is a pure function of (seed, step): the shards are cut into fixed windows of
`seq_len + 1` tokens, each epoch visits them in a seeded permutation, and the sample for global
position g is window perm_epoch[g % n]. A resumed run therefore needs no data cursor beyond the step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MinicoderError


def read_data_meta(data_dir: str | Path) -> dict:
    meta_file = Path(data_dir) / "meta.json"
    if not meta_file.is_file():
        raise MinicoderError(f"{data_dir}: no meta.json (pack a corpus with `minicoder data pack`)")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise MinicoderError(f"{meta_file}: invalid JSON ({e})") from None


class TokenWindows:
    """Fixed windows of seq_len + 1 tokens over one split's shards (inputs = w[:-1], targets = w[1:])."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        data_dir = Path(data_dir)
        self.meta = read_data_meta(data_dir)
        info = self.meta["splits"].get(split)
        if not info or not info["tokens"]:
            raise MinicoderError(f"{data_dir}: the {split!r} split is empty")
        self.seq_len = seq_len
        self.shards = []
        starts = []
        for i, name in enumerate(info["shards"]):
            path = data_dir / name
            if not path.is_file():
                raise MinicoderError(f"{path}: shard listed in meta.json is missing")
            arr = np.memmap(path, dtype=self.meta["dtype"], mode="r")
            self.shards.append(arr)
            n = (len(arr) - 1) // seq_len
            starts.extend((i, j * seq_len) for j in range(n))
        if not starts:
            raise MinicoderError(f"{data_dir}: the {split!r} split has {info['tokens']} tokens, fewer than seq_len+1={seq_len + 1}")
        self.windows = np.array(starts, dtype=np.int64)  # (shard, offset) per window

    def __len__(self) -> int:
        return len(self.windows)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.shards[s][o : o + self.seq_len + 1] for s, o in self.windows[indices]]
        w = torch.from_numpy(np.stack(rows).astype(np.int64))
        return w[:, :-1], w[:, 1:]


class EpochSampler:
    """Window indices for any global sample position, reproducible from the seed alone."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, i = divmod(start + k, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out[k] = self._perm[i]
        return out

    def epoch_of(self, position: int) -> int:
        return position // self.n


@dataclass
class Datasets:
    """What the training loop trains on: any `train`/`val` with `len()` and `get(indices) -> (inputs, targets)`."""

    train: object
    val: object | None
    tokenizer_dir: Path
    vocab_size: int
    source: str
    val_tokens: int = 0  # with val_bytes: converts validation loss to bits per byte
    val_bytes: int = 0
    tokenizer_fingerprint: str | None = None


def packed_datasets(data_dir: str | Path, seq_len: int) -> Datasets:
    """Pretraining data: windows over the shards of a `minicoder data pack` directory."""
    data_dir = Path(data_dir)
    meta = read_data_meta(data_dir)
    val_info = meta["splits"].get("val", {})
    window = meta.get("fim", {}).get("window")
    if window and seq_len % window and meta["fim"].get("rate"):
        print(f"note: {data_dir} was packed for {window}-token windows; at seq_len {seq_len} some FIM chunks "
              f"straddle windows (repack with --seq-len {seq_len})")
    val = TokenWindows(data_dir, "val", seq_len) if val_info.get("tokens", 0) > seq_len else None
    return Datasets(train=TokenWindows(data_dir, "train", seq_len), val=val, tokenizer_dir=data_dir / "tokenizer",
                    vocab_size=meta["vocab_size"], source=str(data_dir.resolve()), val_tokens=val_info.get("tokens", 0),
                    val_bytes=val_info.get("bytes", 0), tokenizer_fingerprint=meta.get("tokenizer_fingerprint"))
