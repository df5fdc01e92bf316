"""Packing: corpus documents -> FIM chunks -> token ids -> flat uint16 shards, split by repository.

Output (DIR):
  train-00000.bin ...   flat token arrays (uint16 while the vocabulary fits, else uint32): pieces back to back,
  val-00000.bin  ...    each `BOS ... EOS`
  tokenizer/            a copy of the tokenizer, so the data directory is self-describing
  meta.json             tokenizer fingerprint, dtype, per-split tokens / documents / repositories / bytes, FIM settings

Training documents are cut into files and files into chunks shorter than the training window
(`chunking.py`); half the chunks (`--fim-rate`) are FIM-transformed (`fim.py`), and consecutive untouched
chunks of a document are joined back into plain text. The train split is written in blocks of `window`
tokens, the windows the trainer cuts at the same length, and `AlignedWriter` places every FIM chunk inside
one block (plain text may run across blocks as usual), so prefix, suffix and middle are always trained on
together. The validation split holds whole repositories and is never FIM-transformed or cut, so its loss
and bits per byte compare across runs and tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import MinicoderError
from ..tokenizer import Tokenizer
from .chunking import chunk_spans, file_spans
from .fim import FimSettings, assemble, fim_decision
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
    """Token ids of one split into shard files; a new shard starts only at a multiple of `block` tokens, so
    the trainer's windows (cut from each shard's start) line up with the packer's blocks."""

    def __init__(self, out: Path, split: str, dtype, block: int = 1):
        self.out, self.split, self.dtype = out, split, dtype
        self.shard_tokens = max(block, SHARD_TOKENS // block * block)
        self.files: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self.repos: set[str] = set()
        self._f = None
        self._in_shard = 0

    def write(self, ids: list[int]):
        while ids:
            if self._f is None or self._in_shard >= self.shard_tokens:
                self._roll()
            take = ids[: self.shard_tokens - self._in_shard]
            np.asarray(take, dtype=self.dtype).tofile(self._f)
            self._in_shard += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def add_document(self, repo: str, n_bytes: int):
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


class AlignedWriter:
    """Writes the train split in blocks of `block` tokens, each FIM chunk inside one block, without padding.

    Each block starts with waiting FIM chunks (first fit, oldest first) and is topped up from the stream of
    plain text, which runs on from block to block as in ordinary packing. FIM chunks therefore start their
    window as an infilling prompt starts the model's context. A FIM chunk longer than a block, or one still
    waiting when there is no plain text left to fill a block, is added to the plain stream as the plain
    chunk it was (counted as demoted).
    """

    MAX_WAITING = 64

    def __init__(self, writer: ShardWriter, block: int, tok: Tokenizer):
        self.writer, self.block, self.tok = writer, block, tok
        self.waiting: deque[tuple[list[int], str]] = deque()
        self.plain_stream: deque[int] = deque()
        self.counts: Counter = Counter()

    def _demote(self, text: str):
        self.counts["fim_demoted"] += 1
        self.plain_stream.extend([self.tok.bos_id, *self.tok.encode(text), self.tok.eos_id])

    def _write_blocks(self, final: bool = False):
        while self.waiting or self.plain_stream:
            if not final and len(self.plain_stream) < self.block and len(self.waiting) <= self.MAX_WAITING:
                return  # not enough plain text yet to top up a block
            out: list[int] = []
            while True:
                for i, (ids, _) in enumerate(self.waiting):
                    if len(ids) <= self.block - len(out):
                        out += ids
                        del self.waiting[i]
                        self.counts["fim_placed"] += 1
                        break
                else:
                    take = min(self.block - len(out), len(self.plain_stream))
                    out += [self.plain_stream.popleft() for _ in range(take)]
                    if len(out) == self.block or not self.waiting:
                        break
                    self._demote(self.waiting.popleft()[1])  # nothing else can fill this block
            self.writer.write(out)

    def plain(self, ids: list[int]):
        self.plain_stream.extend(ids)
        self._write_blocks()

    def fim(self, ids: list[int], text: str):
        if len(ids) > self.block:
            self._demote(text)
        else:
            self.waiting.append((ids, text))
        self._write_blocks()

    def close(self):
        self._write_blocks(final=True)


def train_segments(text: str, paths: list[str], token_starts, rng: random.Random, settings: FimSettings,
                   chunk_tokens: int) -> list[tuple[list[str], str, str]]:
    """A training document as (pieces, mode, text) segments: FIM chunks and runs of untouched chunks.

    `token_starts(file_text)` gives the character offsets of a file's tokens (for cutting by token count).
    """
    segments, plain = [], []
    for a, b in file_spans(text, paths):
        file_text = text[a:b]
        for c, d in chunk_spans(file_text, token_starts(file_text), chunk_tokens):
            chunk = file_text[c:d]
            pieces, mode = fim_decision(chunk, rng, settings)
            if mode == "plain":
                plain.append(chunk)
                continue
            if plain:
                joined = "".join(plain)
                segments.append(([joined], "plain", joined))
                plain = []
            segments.append((pieces, mode, chunk))
    if plain:
        joined = "".join(plain)
        segments.append(([joined], "plain", joined))
    return segments


def pack(corpus_dir, tokenizer_dir, out_dir, *, fim: FimSettings = FimSettings(), window: int = 512,
         chunk_tokens: int | None = None, val_fraction: float = 0.05, seed: int = 0, force: bool = False,
         progress: bool = True) -> dict:
    """`window`: the training sequence length the FIM chunks are aligned to; `chunk_tokens`: the longest
    chunk (default three quarters of the window, so a chunk often fits what is left of a block)."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if not corpus_dir.is_dir():
        raise MinicoderError(f"{corpus_dir}: corpus directory does not exist")
    try:
        fim.validate()
    except ValueError as e:
        raise MinicoderError(str(e)) from None
    if window < 16:
        raise MinicoderError(f"--seq-len must be at least 16, got {window}")
    chunk_tokens = chunk_tokens or window * 3 // 4
    if not 8 <= chunk_tokens <= window - 8:
        raise MinicoderError(f"--fim-chunk-tokens must be between 8 and seq_len - 8 = {window - 8}, got {chunk_tokens}")
    if not 0 <= val_fraction < 1:
        raise MinicoderError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = Tokenizer(tokenizer_dir)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    start = time.time()

    repos = {doc["repo"] for doc in read_documents(corpus_dir)}  # names only: small even for big corpora
    if not repos:
        raise MinicoderError(f"{corpus_dir}: the corpus has no documents")
    val_repos = choose_validation_repos(repos, val_fraction, seed)

    starts_of: dict[str, list[int]] = {}  # file text -> where its tokens start, for the current batch

    def token_starts(text: str) -> list[int]:
        return starts_of.get(text) or [s for s, _ in tok.tok.encode(text, add_special_tokens=False).offsets]

    with atomic_output_dir(out_dir, force=force) as tmp:
        val = ShardWriter(tmp, "val", dtype)
        train_writer = ShardWriter(tmp, "train", dtype, block=window)
        train = AlignedWriter(train_writer, window, tok)
        modes: Counter = Counter()

        def flush(batch: list[dict]):
            val_docs = [d for d in batch if d["repo"] in val_repos]
            for doc, ids in zip(val_docs, tok.encode_batch([d["text"] for d in val_docs])):
                val.write([tok.bos_id, *ids, tok.eos_id])
                val.add_document(doc["repo"], len(doc["text"].encode("utf-8")))
            files = [d["text"][a:b] for d in batch if d["repo"] not in val_repos for a, b in file_spans(d["text"], d["paths"])]
            starts_of.clear()
            starts_of.update((t, [s for s, _ in e.offsets]) for t, e in
                             zip(files, tok.tok.encode_batch(files, add_special_tokens=False)))
            segments = []
            for doc in batch:
                if doc["repo"] in val_repos:
                    continue
                # One RNG per document, seeded by its repository: the FIM choices do not depend on order.
                rng = random.Random(f"{seed}:{doc['repo']}:{len(doc['text'])}")
                segments += train_segments(doc["text"], doc["paths"], token_starts, rng, fim, chunk_tokens)
                train_writer.add_document(doc["repo"], len(doc["text"].encode("utf-8")))
            flat = tok.encode_batch([p for pieces, _, _ in segments for p in pieces])
            i = 0
            for pieces, mode, text in segments:
                ids = assemble(flat[i : i + len(pieces)], tok, mode)
                i += len(pieces)
                modes[mode] += 1
                if mode == "plain":
                    train.plain(ids)
                else:
                    train.fim(ids, text)

        batch: list[dict] = []
        for doc in tqdm(read_documents(corpus_dir), desc="pack", unit="doc", disable=not progress):
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        train.close()
        splits = {"train": train_writer.close(), "val": val.close()}
        shutil.copytree(tok.path, tmp / "tokenizer", ignore=shutil.ignore_patterns("meta.json"))
        meta = {
            "corpus": str(corpus_dir.resolve()),
            "tokenizer": str(tok.path.resolve()),
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "fim": {"rate": fim.rate, "spm_rate": fim.spm_rate, "line_rate": fim.line_rate, "window": window,
                    "chunk_tokens": chunk_tokens, "psm_chunks": modes["psm"], "spm_chunks": modes["spm"],
                    "plain_runs": modes["plain"], "placed": train.counts["fim_placed"],
                    "demoted_to_plain": train.counts["fim_demoted"], "applied_to": "train only"},
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": splits,
            "seconds": round(time.time() - start, 1),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
