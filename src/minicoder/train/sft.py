"""SFT samples: chat conversations tokenized with the chat template, loss on assistant tokens only.

Batches are padded to their longest sample (right padding, pad targets ignored), not packed: with padding
no sample can attend to another one, which plain causal attention guarantees for free, while packing would
need a block-diagonal mask that the CPU's fused attention kernels do not take. SFT samples are short, so the
padding costs little.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MinicoderError
from ..tokenizer import Tokenizer
from .data import Datasets
from .loop import IGNORE_INDEX


class ChatSamples:
    def __init__(self, path: Path, tokenizer: Tokenizer, seq_len: int):
        self.samples: list[tuple[list[int], list[bool]]] = []
        self.truncated = 0
        self.pad_id = tokenizer.pad_id
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise MinicoderError(f"{path}:{lineno}: not an SFT row ({e}); build data with `minicoder data sft`") from None
                ids, mask = tokenizer.chat_ids(messages)
                if len(ids) > seq_len + 1:
                    self.truncated += 1
                    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
                if any(mask[1:]):  # nothing to learn when truncation cut every reply
                    self.samples.append((ids, mask))
        if not self.samples:
            raise MinicoderError(f"{path}: no usable conversations")

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [self.samples[i] for i in indices]
        width = max(len(ids) for ids, _ in batch) - 1
        x = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            targets = torch.tensor(ids[1:])
            y[row, :n] = torch.where(torch.tensor(mask[1:]), targets, IGNORE_INDEX)
        return x, y


def sft_datasets(data_dir: str | Path, init_dir: str | Path, seq_len: int) -> Datasets:
    data_dir = Path(data_dir)
    train_file, val_file = data_dir / "train.jsonl", data_dir / "val.jsonl"
    if not train_file.is_file():
        raise MinicoderError(f"{data_dir}: no train.jsonl (build SFT data with `minicoder data sft`)")
    tokenizer = Tokenizer(init_dir)
    val = None
    if val_file.is_file() and val_file.stat().st_size:
        try:
            val = ChatSamples(val_file, tokenizer, seq_len)
        except MinicoderError as e:  # validation is optional; training on nothing is not
            print(f"note: no validation loss: {e}")
    return Datasets(train=ChatSamples(train_file, tokenizer, seq_len), val=val, tokenizer_dir=Path(init_dir),
                    vocab_size=tokenizer.vocab_size, source=str(data_dir.resolve()),
                    tokenizer_fingerprint=tokenizer.fingerprint())
