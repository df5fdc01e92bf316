"""Cutting repository documents into pieces a training window holds: files, then chunks of files.

A corpus document is one repository sample: its files back to back, each under a path header. For
fill-in-the-middle the pieces must be shorter than the training window, or prefix, suffix and middle
never meet in one window (the FIM paper's section 3.2 failure). `file_spans` recovers the files (each
keeps its header line); `chunk_spans` cuts a file at line boundaries into chunks of at most `max_tokens`
tokens, preferring the start of a top-level statement (a `def`, a `class`, an import block), so a chunk
is usually whole functions. The spans are character offsets that tile the text exactly: joining the
pieces gives the document back.
"""

from __future__ import annotations

import bisect
import re

_TOP_LEVEL = re.compile(r"[^\s#)\]}]")  # a line starting in column 0 with code (not a comment or a closing bracket)


def header_lines(paths: list[str]) -> dict[str, str]:
    """The header line each comment syntax writes for these paths (see corpus.path_header) -> path."""
    forms = {}
    for p in paths:
        for line in (f"# {p}", f"// {p}", f"<!-- {p} -->"):
            forms[line] = p
    return forms


def file_spans(text: str, paths: list[str]) -> list[tuple[int, int]]:
    """(start, end) character spans of the files of a repository document, in order, tiling `text`."""
    headers = header_lines(paths) if paths else {}
    starts = [0]
    pos = 0
    for line in text.splitlines(keepends=True):
        if pos and line.rstrip("\n") in headers:
            starts.append(pos)
        pos += len(line)
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)]) if b > a]


def line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text) if m.end() < len(text)]


def chunk_spans(text: str, token_starts: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Cut `text` (one file) into spans of at most ~max_tokens tokens at line boundaries.

    `token_starts` are the character offsets where the file's tokens start (from the tokenizer's offsets).
    A single line longer than the budget becomes a chunk of its own (the packer leaves oversized ones as
    plain text). Breaks go at the last top-level statement past half the budget that keeps the chunk within
    it, else at the last line that does.
    """
    if not text:
        return []
    lines = line_starts(text)

    def tokens_between(a: int, b: int) -> int:
        return bisect.bisect_left(token_starts, b) - bisect.bisect_left(token_starts, a)

    spans = []
    start_line = 0
    while start_line < len(lines):
        start = lines[start_line]
        if tokens_between(start, len(text)) <= max_tokens:
            spans.append((start, len(text)))
            break
        best_any = best_top = None
        for j in range(start_line + 1, len(lines)):
            used = tokens_between(start, lines[j])
            if used > max_tokens:
                break
            best_any = j
            if used >= max_tokens // 2 and _TOP_LEVEL.match(text, lines[j]):
                best_top = j  # not too early: half-empty chunks would waste the window
        end_line = best_top or best_any or start_line + 1
        end = lines[end_line] if end_line < len(lines) else len(text)
        spans.append((start, end))
        start_line = end_line
    return spans
