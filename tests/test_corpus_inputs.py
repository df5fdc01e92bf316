"""`data corpus` on hostile or unlucky input: names that are not UTF-8 or hold newlines, lone surrogates in rows,
a 1,100-deep folder tree, a JSONL row far past any file limit. Each gives a corpus and a count, never a traceback."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from conftest import run_cli
from minicoder.data.corpus import build_corpus, path_header
from test_corpus import make_project, python_module, read_docs, write


def corpus(sources: list[Path], out: Path, **kwargs) -> tuple[dict, list[dict]]:
    meta = build_corpus([str(s) for s in sources], out, decontaminate=False, progress=False, **kwargs)
    return meta, read_docs(out)


def test_non_utf8_file_and_folder_names_are_kept_with_escaped_paths(tmp_path):
    root = tmp_path / "src"
    write(root, "plain/ok.py", python_module("ok"))
    raw = os.fsencode(root) + b"/caf\xe9"  # a Latin-1 folder name, as a zip from an old system leaves it
    os.makedirs(raw)
    with open(raw + b"/r\xe9sum\xe9.py", "w") as f:
        f.write(python_module("latin"))
    proc = run_cli("data", "corpus", str(root), "--out", str(tmp_path / "out"), "--no-decontam", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Escaped 1 unprintable file name" in proc.stdout
    docs = {d["repo"]: d for d in read_docs(tmp_path / "out")}
    assert docs["src/caf\\xe9"]["paths"] == ["caf\\xe9/r\\xe9sum\\xe9.py"]
    assert docs["src/caf\\xe9"]["text"].startswith("# caf\\xe9/r\\xe9sum\\xe9.py\n")
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"]["escaped_names"] == 1


def test_newline_in_a_file_name_cannot_break_out_of_the_path_header(tmp_path):
    project = make_project(tmp_path / "proj")
    write(project, "evil\nimport os; os.system('rm -rf ~')\n#.py", python_module("evil"))
    write(project, "notes-->x.md", "Some notes about the project and how it is built.\n")
    _, docs = corpus([project], tmp_path / "out")
    text = docs[0]["text"]
    assert "# evil\\x0aimport os; os.system('rm -rf ~')\\x0a#.py\n" in text
    assert "import os; os.system" not in text.replace("# evil\\x0aimport os; os.system", "")
    markdown_header = next(line for line in text.splitlines() if line.startswith("<!--"))
    assert markdown_header == "<!-- notes--\\>x.md -->" and markdown_header.count("-->") == 1


def test_path_header_escapes_every_line_break():
    for separator in ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"):
        header = path_header(f"a{separator}b.py", "python")
        assert len(header.splitlines()) == 1 and header.startswith("# a\\"), repr(header)


def test_lone_surrogates_in_jsonl_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"repo": "a/b", "path": "x\\ud800.py", "content": ' + json.dumps(python_module("x")) + '}\n'
        '{"repo": "c\\udcff", "path": "y.py", "content": "def g():\\n    return \\"\\ud800\\"\\n"}\n'
        '{"repo": "e/f", "path": "z.py", "content": ' + json.dumps(python_module("z")) + '}\n', encoding="utf-8")
    meta, docs = corpus([rows], tmp_path / "out")
    assert {d["repo"]: d["paths"] for d in docs} == {"a/b": ["x\\ud800.py"], "e/f": ["z.py"]}
    assert meta["counts"]["dropped"] == {"not_utf8": 1}  # the row whose text holds a lone surrogate
    assert meta["counts"]["escaped_names"] == 1


def make_deep_tree(root: Path, depth: int) -> None:
    """`depth` nested folders with a Python file at the bottom, made through directory descriptors."""
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    out = os.open("bottom.py", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
    os.write(out, python_module("bottom").encode())
    os.close(out)
    os.close(fd)


def remove_deep_tree(root: Path) -> None:
    """Bottom-up without recursion (shutil.rmtree recurses once per level)."""
    fds = [os.open(root, os.O_RDONLY)]
    while "d" in os.listdir(fds[-1]):
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    for name in os.listdir(fds[-1]):
        os.unlink(name, dir_fd=fds[-1])
    for parent, child in zip(reversed(fds[:-1]), reversed(fds[1:])):
        os.close(child)
        os.rmdir("d", dir_fd=parent)
    os.close(fds[0])


def test_a_1100_deep_folder_tree_is_walked(tmp_path):
    project = make_project(tmp_path / "deep")
    write(project, "top.py", python_module("top"))
    make_deep_tree(project, 1100)
    try:
        _, docs = corpus([project], tmp_path / "out")
    finally:
        remove_deep_tree(project)
    paths = docs[0]["paths"]
    assert sorted(paths) == sorted(["top.py", "d/" * 1100 + "bottom.py"])


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_huge_jsonl_row_is_skipped_without_being_read_whole(suffix, tmp_path):
    rows = tmp_path / f"rows{suffix}"
    with (gzip.open if suffix.endswith(".gz") else open)(rows, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"repo": "a/b", "path": "small.py", "content": python_module("small")}) + "\n")
        f.write('{"repo": "a/b", "path": "huge.py", "content": "' + "x = 1\\n" * 4_000_000 + '"}\n')  # 28 MB
        f.write(json.dumps({"repo": "c/d", "path": "after.py", "content": python_module("after")}) + "\n")
    tracemalloc.start()
    try:
        meta, docs = corpus([rows], tmp_path / "out", max_file_bytes=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Reading the row whole costs at least its 28 MB; the rest of the corpus pipeline peaks near 8 MB.
    assert peak < 14_000_000, f"peak {peak:,} bytes: the 28 MB row was read whole"
    assert meta["counts"]["dropped"] == {"too_large": 1}
    assert sorted(p for d in docs for p in d["paths"]) == ["after.py", "small.py"]
