"""Packing: corpus documents -> FIM -> token ids -> flat uint16 shards, split by repository.

Output (DIR):
  train-00000.bin ...   flat token arrays (uint16 while the vocabulary fits, else uint32), documents
  val-00000.bin  ...    back to back, each `BOS ... EOS`
  tokenizer/            a copy of the tokenizer, so the data directory is self-describing
  meta.json             tokenizer fingerprint, dtype, per-split tokens / documents / repositories / bytes, FIM settings

The validation split holds whole repositories (never one repository on both sides) and is never
FIM-transformed, so its loss and bits per byte compare across runs and tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import MinicoderError
from ..tokenizer import Tokenizer
from .fim import MODES, assemble, fim_pieces
from .io import atomic_output_dir

SHARD_TOKENS = 1 << 28  # 256M tokens (512 MB of uint16) per shard file
BATCH_DOCS = 64  # documents tokenized together (tokenizers encodes a batch on all cores)


def read_documents(corpus_dir: Path) -> Iterator[dict]:
    shards = sorted((corpus_dir / "docs").glob("shard-*.jsonl"))
    if not shards:
        raise MinicoderError(f"{corpus_dir / 'docs'}: no shard-*.jsonl documents (build a corpus with `minicoder data corpus`)")
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    doc = json.loads(line)
                    yield {"repo": str(doc.get("repo", f"{shard.name}:{lineno}")), "text": doc["text"],
                           "paths": list(doc.get("paths", []))}
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise MinicoderError(f"{shard}:{lineno}: not a corpus document ({e})") from None


def choose_validation_repos(repos: set[str], val_fraction: float, seed: int) -> set[str]:
    """A deterministic, seed-dependent choice of whole repositories for validation (at least one when there are two)."""
    if val_fraction <= 0 or len(repos) < 2:
        return set()
    ranked = sorted(repos, key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
    n_val = min(len(repos) - 1, max(1, math.ceil(val_fraction * len(repos))))
    return set(ranked[:n_val])


class ShardWriter:
    def __init__(self, out: Path, split: str, dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.files: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self.repos: set[str] = set()
        self._f = None
        self._in_shard = 0

    def write(self, ids: list[int], repo: str, n_bytes: int):
        if self._f is None or self._in_shard >= SHARD_TOKENS:
            self._roll()
        np.asarray(ids, dtype=self.dtype).tofile(self._f)
        self._in_shard += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        self.bytes += n_bytes
        self.repos.add(repo)

    def _roll(self):
        if self._f:
            self._f.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._f = open(self.out / name, "wb")
        self._in_shard = 0

    def close(self) -> dict:
        if self._f:
            self._f.close()
        return {"shards": self.files, "tokens": self.tokens, "documents": self.documents,
                "repositories": len(self.repos), "bytes": self.bytes}


def pack(corpus_dir, tokenizer_dir, out_dir, *, fim_rate: float = 0.5, fim_mode: str = "psm",
         val_fraction: float = 0.05, seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if not corpus_dir.is_dir():
        raise MinicoderError(f"{corpus_dir}: corpus directory does not exist")
    if fim_mode not in MODES:
        raise MinicoderError(f"--fim-mode must be one of {MODES}, got {fim_mode!r}")
    if not 0 <= fim_rate <= 1:
        raise MinicoderError(f"--fim-rate must be in [0, 1], got {fim_rate}")
    if not 0 <= val_fraction < 1:
        raise MinicoderError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = Tokenizer(tokenizer_dir)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    start = time.time()

    repos = {doc["repo"] for doc in read_documents(corpus_dir)}  # names only: small even for big corpora
    if not repos:
        raise MinicoderError(f"{corpus_dir}: the corpus has no documents")
    val_repos = choose_validation_repos(repos, val_fraction, seed)

    with atomic_output_dir(out_dir, force=force) as tmp:
        writers = {"train": ShardWriter(tmp, "train", dtype), "val": ShardWriter(tmp, "val", dtype)}
        fim_documents = 0

        def flush(batch: list[dict]):
            nonlocal fim_documents
            pieces_per_doc = []
            for doc in batch:
                # One RNG per document, seeded by its repository: the FIM choice does not depend on order.
                rng = random.Random(f"{seed}:{doc['repo']}:{len(doc['text'])}")
                rate = 0.0 if doc["repo"] in val_repos else fim_rate
                pieces_per_doc.append(fim_pieces(doc["text"], rng, rate))
            flat = tok.encode_batch([p for pieces in pieces_per_doc for p in pieces])
            i = 0
            for doc, pieces in zip(batch, pieces_per_doc):
                ids = assemble(flat[i : i + len(pieces)], tok, fim_mode)
                i += len(pieces)
                fim_documents += len(pieces) == 3
                split = "val" if doc["repo"] in val_repos else "train"
                writers[split].write(ids, doc["repo"], len(doc["text"].encode("utf-8")))

        batch: list[dict] = []
        for doc in tqdm(read_documents(corpus_dir), desc="pack", unit="doc", disable=not progress):
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        splits = {name: w.close() for name, w in writers.items()}
        shutil.copytree(tok.path, tmp / "tokenizer", ignore=shutil.ignore_patterns("meta.json"))
        meta = {
            "corpus": str(corpus_dir.resolve()),
            "tokenizer": str(tok.path.resolve()),
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "fim": {"rate": fim_rate, "mode": fim_mode, "documents": fim_documents, "applied_to": "train only"},
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": splits,
            "seconds": round(time.time() - start, 1),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
