"""`minicoder serve --repo DIR`: a BM25 index over a local repository's code, for fill-in-the-middle context.

    index = RepoIndex("~/src/myproject", count_tokens=lambda s: len(tok.encode(s)))
    index.snippets(prefix, exclude_path="app/main.py", budget=512)  # -> [(path, text), ...]

Files are cut into chunks of a few lines (split at blank lines where possible) and indexed with `bm25s`
(sparse-matrix BM25, fast enough to rebuild a repository of thousands of files in a second). The query is
the last complete lines before the cursor, as Tabby's retrieval does; the current file's own chunks are
left out (its text is already in the prompt). The index is rebuilt when a file is added, removed or
changed, checked every `refresh_seconds` by a watcher thread (`watch()`), so a query never waits on the
file system. Snippets come back in a stable order
(path, line), so successive requests from one file share a prompt prefix and hit the prefix cache.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import language_of
from ..errors import MinicoderError

log = logging.getLogger("minicoder.server")

SKIP_DIRS = {"node_modules", "__pycache__", "venv", "build", "dist", "target", "site-packages"}
MAX_FILE_BYTES = 1 << 20
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def code_terms(text: str) -> list[str]:
    """BM25 terms of code: each identifier, plus its snake_case / camelCase parts (`parse_json` and
    `parseJson` both give `parse`, `json`), lower-cased."""
    terms = []
    for word in _WORD.findall(text):
        lower = word.lower()
        terms.append(lower)
        parts = [p.lower() for p in _PART.findall(word)]
        if len(parts) > 1:
            terms += parts
    return terms


@dataclass(frozen=True)
class Chunk:
    path: str  # relative to the repository root, with "/"
    start_line: int  # 1-based
    text: str


def chunk_file(path: str, text: str, max_lines: int) -> list[Chunk]:
    """Chunks of at most `max_lines` lines, cut at a blank line in the second half of a window when there is one."""
    lines = text.splitlines(keepends=True)
    chunks, start = [], 0
    while start < len(lines):
        end = min(start + max_lines, len(lines))
        if end < len(lines):
            blank = next((i for i in range(end - 1, start + max_lines // 2, -1) if not lines[i].strip()), None)
            end = blank + 1 if blank is not None else end
        body = "".join(lines[start:end])
        if body.strip():
            chunks.append(Chunk(path, start + 1, body))
        start = end
    return chunks


class RepoIndex:
    def __init__(self, root: str | Path, count_tokens: Callable[[str], int], *, chunk_lines: int = 24,
                 top_k: int = 8, refresh_seconds: float = 2.0):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise MinicoderError(f"--repo {root}: not a directory")
        self.count_tokens = count_tokens
        self.chunk_lines, self.top_k, self.refresh_seconds = chunk_lines, top_k, refresh_seconds
        self._lock = threading.Lock()
        self._signature: tuple = ()
        self._checked = 0.0
        self._chunks: list[Chunk] = []
        self._retriever = None
        self.builds = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.refresh(force=True)

    def watch(self):
        """Re-check the files every refresh_seconds in a daemon thread, until close()."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="repo-index", daemon=True)
            self._watcher.start()

    def close(self):
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except Exception:  # a file vanishing mid-read must not end the watcher
                log.exception("refreshing the repository index of %s failed", self.root)

    # --- the index ---------------------------------------------------------------------------------
    def files(self) -> list[str]:
        """Source files (known languages), relative paths: `git ls-files` (tracked and untracked, not
        ignored) in a git work tree, else a walk that skips hidden and build directories."""
        try:
            out = subprocess.run(["git", "-C", str(self.root), "ls-files", "-co", "--exclude-standard", "-z"],
                                 capture_output=True, timeout=30)
            listed = [p for p in out.stdout.decode("utf-8", "replace").split("\0") if p] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            listed = None
        if listed is None:
            listed = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
                rel = Path(dirpath).relative_to(self.root)
                listed += [(rel / f).as_posix() for f in sorted(filenames) if not f.startswith(".")]
        return [p for p in listed if language_of(p)]

    def _stat_all(self) -> tuple:
        signature = []
        for rel in self.files():
            try:
                st = (self.root / rel).stat()
            except OSError:
                continue
            if st.st_size <= MAX_FILE_BYTES:
                signature.append((rel, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the index if a file changed (checked at most every refresh_seconds). True if rebuilt."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return False
        self._checked = now
        signature = self._stat_all()
        if not force and signature == self._signature:
            return False
        self._build(signature, progress=force)  # the first build, at start-up, shows its progress
        return True

    def _build(self, signature: tuple, progress: bool = False):
        import bm25s

        started = time.perf_counter()
        chunks = []
        for rel, _, _ in signature:
            try:
                text = (self.root / rel).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            chunks += chunk_file(rel, text, self.chunk_lines)
        corpus = [code_terms(c.text) for c in chunks]
        keep = [i for i, terms in enumerate(corpus) if terms]
        retriever = None
        if keep:
            retriever = bm25s.BM25()
            retriever.index([corpus[i] for i in keep], show_progress=progress)
        with self._lock:  # queries see the old index or the new one, never half of each
            self._chunks, self._retriever = [chunks[i] for i in keep], retriever
        self._signature = signature
        self.builds += 1
        log.info("repository index of %s: %d files, %d chunks, built in %.2f s", self.root, len(signature),
                 len(self._chunks), time.perf_counter() - started)

    # --- queries -----------------------------------------------------------------------------------
    def relative(self, path: str | None) -> str | None:
        """A client's file path (absolute, or relative to the repository) as an index path."""
        if not path:
            return None
        p = Path(path)
        if p.is_absolute():
            try:
                return p.resolve().relative_to(self.root).as_posix()
            except ValueError:
                return None
        return p.as_posix().removeprefix("./")

    def snippets(self, prefix: str, exclude_path: str | None = None, budget: int = 512,
                 query_lines: int = 12) -> list[tuple[str, str]]:
        """The most relevant chunks of other files for code ending in `prefix`, at most `budget` tokens
        in all, ordered by (path, line)."""
        complete = prefix[: prefix.rfind("\n") + 1]  # the line being typed changes every keystroke
        query = [t for t in code_terms("".join(complete.splitlines(keepends=True)[-query_lines:]))]
        with self._lock:
            retriever, chunks = self._retriever, self._chunks
        if retriever is None or not query or budget <= 0:
            return []
        known = [t for t in query if t in retriever.vocab_dict]
        if not known:
            return []
        exclude = self.relative(exclude_path)
        k = min(len(chunks), self.top_k + 8)  # a few spare for the excluded file's own chunks
        ids, scores = retriever.retrieve([known], k=k, show_progress=False)
        picked, used = [], 0
        for i, score in zip(ids[0].tolist(), scores[0].tolist()):
            chunk = chunks[i]
            if score <= 0 or chunk.path == exclude:
                continue
            cost = self.count_tokens(chunk.text) + 8  # + the path header
            if used + cost > budget:
                continue
            picked.append(chunk)
            used += cost
            if len(picked) == self.top_k:
                break
        picked.sort(key=lambda c: (c.path, c.start_line))
        return [(c.path, c.text) for c in picked]
