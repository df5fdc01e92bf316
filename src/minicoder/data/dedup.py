"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH, as StarCoder and DeepSeek-Coder do),
of files, repositories, and functions copied across packages (`FunctionDeduplicator`).

Only fixed-size fingerprints are kept (a 16-byte hash per file, a 128-value signature per file or repository),
never the texts, so memory grows slowly with the corpus. The first document seen wins: later copies are dropped.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
JACCARD_THRESHOLD = 0.7
SHINGLE_WORDS = 5
FUNCTION_THRESHOLD = 0.6  # functions: lower than files' (a copied function with a renamed local or two)
MIN_FUNCTION_WORDS = 40
COPIED_SHARE = 0.5  # a file whose functions are, by size, at least this share near-copies is dropped
_HASH_BATCH = 4096  # shingles hashed per numpy step: bounds the (batch x num_perm) temporary to a few MB

_WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    """A hash of the text that ignores trailing whitespace on every line and at the end."""
    normalized = "\n".join(line.rstrip() for line in text.rstrip().splitlines())
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


class ExactDeduplicator:
    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True if an identical text was seen before; otherwise remember this one."""
        key = exact_key(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def word_shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of `size`-word windows of the text (words = runs of letters, digits and '_', as in StarCoder).

    Punctuation and layout do not count, so reformatting a file does not hide a copy.
    """
    words = _WORD.findall(text)
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


class MinHasher:
    """Makes MinHash signatures that all share one set of permutations (so they can be compared and merged)."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 1):
        # crc32 is a deterministic, fast (C) 32-bit hash: datasketch mixes it before permuting.
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)

    def of_text(self, text: str) -> MinHash | None:
        """The signature of the text's word shingles, or None for a text without words."""
        shingles = list(word_shingles(text))
        if not shingles:
            return None
        minhash = self._template.copy()  # copying skips regenerating the permutations (10x faster)
        for start in range(0, len(shingles), _HASH_BATCH):
            minhash.update_batch(shingles[start:start + _HASH_BATCH])
        return minhash

    def union(self, minhashes: list[MinHash]) -> MinHash:
        """The signature of the union of the sets: a repository from its files, without hashing them again."""
        merged = self._template.copy()
        for minhash in minhashes:
            merged.merge(minhash)
        return merged


class NearDeduplicator:
    """MinHash-LSH index: a document is a near-duplicate if an earlier one has estimated Jaccard >= threshold.

    LSH only proposes candidates (some below the threshold collide by chance); each is confirmed against its
    stored signature so a file is dropped only for a real estimated similarity.
    """

    def __init__(self, threshold: float = JACCARD_THRESHOLD, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._signatures)

    def is_duplicate(self, minhash: MinHash) -> bool:
        """True if a near-duplicate was indexed before; otherwise index this one."""
        if self.seen(minhash):
            return True
        self.add(minhash)
        return False

    def seen(self, minhash: MinHash) -> bool:
        """True if a near-duplicate was indexed before (indexes nothing)."""
        return any(np.mean(self._signatures[key] == minhash.hashvalues) >= self.threshold
                   for key in self._lsh.query(minhash))

    def add(self, minhash: MinHash) -> None:
        key = len(self._signatures)
        self._lsh.insert(key, minhash, check_duplication=False)
        self._signatures.append(minhash.hashvalues.copy())


def outer_functions(tree: ast.AST):
    """Functions and methods not nested inside another function (a nested one is part of its parent's text)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif not isinstance(node, ast.Lambda):
            yield from outer_functions(node)


def normalized_function(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function as `ast.unparse` writes it, docstring dropped: comments, layout, quotes and docstring edits
    do not hide a copy."""
    body = node.body[1:] if (node.body and isinstance(node.body[0], ast.Expr)
                             and isinstance(node.body[0].value, ast.Constant)
                             and isinstance(node.body[0].value.value, str)) else node.body
    bare = copy.copy(node)  # shallow: the tree itself is not changed
    bare.body, bare.decorator_list = body or [ast.Pass()], []
    return ast.unparse(bare)


class FunctionDeduplicator:
    """Near-duplicate functions across files and packages (vendored helpers, backports, copied utilities) that
    file-level MinHash misses because the rest of each file differs. A file is dropped when, by size, at least
    `share` of its functions are near-copies (MinHash of 5-word shingles of the normalised function, Jaccard >=
    `threshold`) of functions in files kept earlier; otherwise its functions are indexed. Functions shorter than
    `min_words` are left out: small idioms every codebase shares are not copies."""

    def __init__(self, hasher: MinHasher, threshold: float = FUNCTION_THRESHOLD, share: float = COPIED_SHARE,
                 min_words: int = MIN_FUNCTION_WORDS, num_perm: int = NUM_PERM):
        self.hasher, self.share, self.min_words = hasher, share, min_words
        self._index = NearDeduplicator(threshold, num_perm)

    def mostly_copied(self, tree: ast.AST) -> bool:
        """True if the file's functions are mostly near-copies of earlier ones; otherwise index its new functions."""
        found = []
        for node in outer_functions(tree):
            code = normalized_function(node)
            words = len(_WORD.findall(code))
            if words >= self.min_words:
                found.append((words, self.hasher.of_text(code)))
        total = sum(words for words, _ in found)
        seen = [self._index.seen(minhash) for _, minhash in found]
        if total and sum(words for (words, _), copy in zip(found, seen) if copy) >= self.share * total:
            return True
        for (_, minhash), copy in zip(found, seen):
            if not copy:
                self._index.add(minhash)
        return False
