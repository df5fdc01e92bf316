"""Sources: turn what the user names on the command line into a stream of repositories of files.

A source is one of
  - ``stdlib``: the running Python's standard library (each top-level package or module = one repository),
  - ``site-packages``: the running interpreter's purelib, split the same way,
  - a folder: each top-level subfolder is one repository and the folder's own top-level files are one more,
    unless the folder is itself a project (``.git``, ``pyproject.toml``, ``__init__.py``, ...): then it is one,
  - a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file of rows (``content`` or ``text``; optional ``repo`` and ``path``),
  - ``hf:<folder>``: a Hugging Face dataset saved with ``save_to_disk`` (rows as above).

Everything is lazy: a repository's files are read only when the consumer iterates over them, so memory stays
bounded by one repository however large the source is. Hostile input is contained here: folders are walked
without recursion (any depth), a JSONL row longer than the row limit is skipped without being read whole, and
names that are not printable UTF-8 (undecodable bytes, lone surrogates, newlines and other control characters)
are escaped (``caf\\xe9.py``) so a path header can never break out of its comment.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import MinicoderError

# Extension -> language. Python is first class (syntax check, import ordering); the rest get generic filters.
# JSON is left out on purpose: in repositories it is mostly data (fixtures, vocabularies, lock files), not code,
# and it has no comment syntax for the path header.
EXTENSION_LANGUAGE = {
    ".py": "python",
    ".c": "c", ".h": "c",
    ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
    ".js": "javascript", ".mjs": "javascript",
    ".ts": "typescript",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".sh": "shell", ".bash": "shell",
    ".md": "markdown",
    ".toml": "toml",
    ".yaml": "yaml", ".yml": "yaml",
}

# Language names as datasets spell them (the-stack `lang`, `language` columns) -> our names.
_LANGUAGE_ALIASES = {"c++": "cpp", "bash": "shell", "js": "javascript", "ts": "typescript"}
_LANGUAGE_EXTENSION = {lang: ext for ext, lang in reversed(list(EXTENSION_LANGUAGE.items()))}

# Directories never walked into, in any source: caches, VCS data, installed copies of other code.
_ALWAYS_SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages", "dist-packages"}
# The standard library's own test suites are about half of it and full of deliberately odd code (bad syntax,
# bad encodings, huge data tables), so they are left out. idlelib is kept: it is an ordinary application.
_STDLIB_SKIPPED_DIRS = _ALWAYS_SKIPPED_DIRS | {"test", "tests", "idle_test"}
# A folder holding any of these is one project, not a folder of projects.
_PROJECT_MARKERS = (".git", ".hg", "pyproject.toml", "setup.py", "setup.cfg", "__init__.py",
                    "package.json", "Cargo.toml", "go.mod", "pom.xml")

ROW_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_ROW_TEXT_FIELDS = ("content", "text")
_ROW_REPO_FIELDS = ("repo", "repo_name", "max_stars_repo_name", "repository_name")
_ROW_PATH_FIELDS = ("path", "max_stars_repo_path", "file_path")
_ROW_LANGUAGE_FIELDS = ("lang", "language")
DEFAULT_MAX_ROW_BYTES = 8 * 2**20  # a JSONL line longer than this is skipped (counted `too_large`), never read whole
_SKIP_CHUNK = 2**20


def printable_name(name: str) -> tuple[str, bool]:
    """(name, False) when it is printable UTF-8, else (an escaped copy, True).

    Undecodable bytes of a file name (surrogateescape, U+DC80..U+DCFF) become ``\\xNN``, other lone surrogates
    ``\\udNNN``, and control, format and line/paragraph-separator characters their ``\\x``/``\\u`` escapes.
    """
    out, escaped = [], False
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
            continue
        escaped = True
    return ("".join(out), True) if escaped else (name, False)


def language_of(path: str) -> str | None:
    """The language of a file from its extension, or None when we do not train on that kind of file."""
    return EXTENSION_LANGUAGE.get(PurePosixPath(path).suffix.lower())


@dataclass(frozen=True)
class SourceFile:
    """One file of a repository; its bytes are read only when asked for."""

    path: str  # inside the repository, '/'-separated; also the path header of the sample
    size: int  # in bytes, known before reading so oversized files are never read
    read_bytes: Callable[[], bytes | None]  # None: a dataset row without text (counted as `bad_row`)
    name_escaped: bool = False  # the path was not printable UTF-8 and holds escapes (see printable_name)


@dataclass(frozen=True)
class Repository:
    name: str  # e.g. "stdlib/json", "site-packages/numpy", "myprojects/foo", "owner/name"
    files: Iterable[SourceFile]  # lazily produced; only files with a known language


class Source:
    """A named producer of repositories."""

    def __init__(self, spec: str, location: Path, repositories: Callable[[], Iterator[Repository]]):
        self.spec = spec  # as the user wrote it
        self.location = location  # the folder or file it reads
        self._repositories = repositories

    def repositories(self) -> Iterator[Repository]:
        return self._repositories()


def open_source(spec: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Source:
    """Check a source argument and return it, ready to stream; raise MinicoderError naming the path if unusable.

    `max_row_bytes` bounds one JSONL line: longer rows are skipped as `too_large` without being read whole."""
    if spec == "stdlib":
        return _package_dir_source(spec, Path(sysconfig.get_paths()["stdlib"]), _STDLIB_SKIPPED_DIRS)
    if spec == "site-packages":
        return _package_dir_source(spec, Path(sysconfig.get_paths()["purelib"]), _ALWAYS_SKIPPED_DIRS)
    if spec.startswith("hf:"):
        return _hf_source(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, path.resolve(), lambda: _folder_repositories(path.resolve()))
    if path.is_file():
        if path.name.endswith(ROW_FILE_SUFFIXES):
            stem = path.name.split(".")[0]  # rows without a repository are named <stem>/<row number>
            return Source(spec, path.resolve(), lambda: _row_repositories(_read_row_file(path, max_row_bytes), stem))
        raise MinicoderError(f"{path}: unknown source format (expected a folder, {', '.join(ROW_FILE_SUFFIXES)}, "
                             "'stdlib', 'site-packages' or 'hf:<folder>')")
    raise MinicoderError(f"{path}: source folder or file does not exist")


# --- folders -------------------------------------------------------------------------------------------------


def _is_skipped_dir(entry: Path, skipped: set[str]) -> bool:
    name = entry.name
    return (name.startswith(".") or name in skipped or name.endswith((".dist-info", ".egg-info"))
            # a virtual environment inside a project; os.path.exists, unlike Path.exists, is False for a too-long path
            or os.path.exists(entry / "pyvenv.cfg"))


def _source_file(path: Path, base: Path) -> SourceFile:
    try:
        size = path.stat().st_size
    except OSError:  # vanished or unreadable: reading it fails too, and is counted as `unreadable`
        size = 0
    name, escaped = printable_name(path.relative_to(base).as_posix())
    return SourceFile(name, size, path.read_bytes, escaped)


def _walk_files(start: Path, base: Path, skipped: set[str]) -> Iterator[SourceFile]:
    """Files under `start` with a known language, paths relative to `base`, in os.walk's top-down sorted order.

    An explicit stack instead of os.walk, which recurses once per level (a 1,000-deep tree overflows Python's
    stack). Symbolic links are not followed: they point outside the repository or duplicate files inside it.
    A folder that cannot be listed (permissions, a path past the system's length limit) is skipped.
    """
    stack = [start]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if not _is_skipped_dir(Path(entry.path), skipped):
                        subdirs.append(Path(entry.path))
                elif language_of(entry.name) and entry.is_file(follow_symlinks=False):
                    yield _source_file(Path(entry.path), base)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _top_level_file(path: Path, base: Path) -> list[SourceFile]:
    return [_source_file(path, base)] if language_of(path.name) and path.is_file() and not path.is_symlink() else []


def _package_dir_source(spec: str, root: Path, skipped: set[str]) -> Source:
    if not root.is_dir():
        raise MinicoderError(f"{root}: {spec} folder does not exist")
    return Source(spec, root, lambda: _package_dir_repositories(root, spec, skipped))


def _package_dir_repositories(root: Path, prefix: str, skipped: set[str]) -> Iterator[Repository]:
    """stdlib / site-packages: each top-level package folder or module file is one repository.

    Paths keep the package folder (``json/decoder.py``) so absolute imports map back to files.
    """
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            if not entry.is_symlink() and not _is_skipped_dir(entry, skipped):
                yield Repository(printable_name(f"{prefix}/{entry.name}")[0], _walk_files(entry, root, skipped))
        elif files := _top_level_file(entry, root):
            yield Repository(printable_name(f"{prefix}/{Path(entry.name).stem}")[0], files)


def _is_project(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in _PROJECT_MARKERS)


def _folder_repositories(folder: Path) -> Iterator[Repository]:
    if _is_project(folder):
        # A package folder keeps its own name in paths (``pkg/mod.py``) so ``import pkg.mod`` resolves.
        base = folder.parent if (folder / "__init__.py").exists() else folder
        yield Repository(printable_name(folder.name)[0], _walk_files(folder, base, _ALWAYS_SKIPPED_DIRS))
        return
    entries = sorted(folder.iterdir())
    top_files = [f for entry in entries if not entry.is_dir() for f in _top_level_file(entry, folder)]
    if top_files:
        yield Repository(printable_name(folder.name)[0], top_files)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and not _is_skipped_dir(entry, _ALWAYS_SKIPPED_DIRS):
            # Paths start with the subfolder's name: right for a folder of packages, harmless for projects.
            yield Repository(printable_name(f"{folder.name}/{entry.name}")[0],
                             _walk_files(entry, folder, _ALWAYS_SKIPPED_DIRS))


# --- rows: jsonl / parquet / Hugging Face datasets -------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    repo: str | None
    path: str | None
    language: str | None
    content: str | None  # None: the row had no text field or was not valid JSON (counted as `bad_row`)
    skipped_bytes: int = 0  # > 0: a JSONL line past the row limit, skipped unread (counted as `too_large`)


def _first_field(record: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = record.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _row_from_record(record) -> Row:
    if not isinstance(record, dict):
        return Row(None, None, None, None)
    content = next((record[f] for f in _ROW_TEXT_FIELDS if isinstance(record.get(f), str)), None)
    return Row(_first_field(record, _ROW_REPO_FIELDS), _first_field(record, _ROW_PATH_FIELDS),
               _first_field(record, _ROW_LANGUAGE_FIELDS), content)


def _bounded_lines(f, limit: int) -> Iterator[bytes | int]:
    """The lines of a binary file, or for a line longer than `limit` bytes its length, read past in chunks."""
    while line := f.readline(limit + 1):
        if len(line) <= limit:
            yield line
            continue
        length = len(line)
        while not line.endswith(b"\n") and (line := f.readline(_SKIP_CHUNK)):
            length += len(line)
        yield length


def _read_jsonl(path: Path, max_row_bytes: int) -> Iterator[Row]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line in _bounded_lines(f, max_row_bytes):
            if isinstance(line, int):
                yield Row(None, None, None, None, skipped_bytes=line)
                continue
            if not line.strip():
                continue
            try:
                # Invalid UTF-8 survives as surrogates, and fails as `not_utf8` like a file's bytes would.
                record = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except (json.JSONDecodeError, RecursionError):  # RecursionError: a row of 100,000 nested brackets
                record = None
            yield _row_from_record(record)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # a project dependency, imported here so other sources do not pay for it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise MinicoderError(f"{path}: not a readable parquet file ({e})") from None
    wanted = set(_ROW_TEXT_FIELDS + _ROW_REPO_FIELDS + _ROW_PATH_FIELDS + _ROW_LANGUAGE_FIELDS)
    columns = [name for name in parquet.schema_arrow.names if name in wanted]
    for batch in parquet.iter_batches(batch_size=256, columns=columns):  # streamed: bounded memory
        for record in batch.to_pylist():
            yield _row_from_record(record)


def _read_row_file(path: Path, max_row_bytes: int) -> Iterator[Row]:
    return _read_parquet(path) if path.name.endswith(".parquet") else _read_jsonl(path, max_row_bytes)


def _hf_source(spec: str) -> Source:
    path = Path(spec[len("hf:"):]).expanduser()
    try:
        import datasets
    except ImportError:
        raise MinicoderError(f"{spec}: reading a Hugging Face dataset needs the `datasets` package "
                             "(pip install datasets)") from None
    if not path.is_dir():
        raise MinicoderError(f"{path}: Hugging Face dataset folder does not exist")

    def rows() -> Iterator[Row]:
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for a folder it cannot read
            raise MinicoderError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for split in splits:
            for record in split:
                yield _row_from_record(record)

    return Source(spec, path.resolve(), lambda: _row_repositories(rows(), path.name))


def _row_path(row: Row, index: int) -> str:
    """The row's path, or a made-up one whose extension carries its language (Python when nothing says)."""
    if row.path:
        return row.path
    language = (row.language or "python").lower()
    extension = _LANGUAGE_EXTENSION.get(_LANGUAGE_ALIASES.get(language, language), ".txt")
    return f"row-{index}{extension}"


def _unique_path(path: str, taken: set[str]) -> str:
    """Rows of one repository may repeat a path; later ones get ``name~2.py`` so each path names one file."""
    candidate, n = path, 1
    while candidate in taken:
        n += 1
        pure = PurePosixPath(path)
        candidate = str(pure.with_name(f"{pure.stem}~{n}{pure.suffix}"))
    taken.add(candidate)
    return candidate


def _row_file(path: str, row: Row) -> SourceFile:
    name, escaped = printable_name(path)
    if row.skipped_bytes:
        return SourceFile(name, row.skipped_bytes, lambda: None, escaped)
    # Lone surrogates survive encoding here and then fail UTF-8 decoding: counted as `not_utf8`, as for files.
    data = row.content.encode("utf-8", errors="surrogatepass") if row.content is not None else None
    return SourceFile(name, len(data) if data is not None else 0, (lambda: data), escaped)


def _row_repositories(rows: Iterator[Row], stem: str) -> Iterator[Repository]:
    """Consecutive rows with the same repository name form one repository; a row without one is its own.

    Rows are streamed, so a repository whose rows are not consecutive becomes several samples of that name.
    """
    indexed = enumerate(rows)
    for key, group in itertools.groupby(indexed, key=lambda item: item[1].repo or f"{stem}/{item[0]}"):
        yield Repository(printable_name(key)[0], _row_files(group))


def _row_files(group: Iterator[tuple[int, Row]]) -> Iterator[SourceFile]:
    taken: set[str] = set()
    for index, row in group:
        path = _row_path(row, index)
        if language_of(path):
            yield _row_file(_unique_path(path, taken), row)
