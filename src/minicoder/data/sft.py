"""Instruction data for SFT: mined from the local code corpus, plus the user's own chat JSONL.

Mining needs no download. Every function or method with a docstring in the corpus yields:
  - "implement": the signature and docstring as an instruction -> the function as the answer;
  - one of "docstring" (write the docstring for this code), "explain" (what does this code do), or
    "fim" (fill in the marked line), picked by a seeded RNG per function.
Generated exercises (`--exercises N`, verified in the sandbox) add "exercise" pairs: the request -> the function.
Pairs are deduplicated, decontaminated against HumanEval with the corpus builder's `Decontaminator`, and split
into train/val by repository. User JSONL rows are OpenAI `messages` conversations, validated line by line.

Output (DIR): train.jsonl, val.jsonl (one {"messages": [...], "kind": ..., "repo": ...} per line), meta.json.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from ..errors import MinicoderError
from .decontam import Decontaminator
from .io import atomic_output_dir
from .pack import choose_validation_repos, read_documents

MAX_FUNCTION_LINES = 40  # keep answers within a small model's context
MIN_DOCSTRING_CHARS = 20
ROLES = ("system", "user", "assistant")


def split_repository_sample(text: str, paths: list[str]) -> Iterator[tuple[str, str]]:
    """Undo the corpus builder's concatenation: (path, source) for each `# path` header in order."""
    lines = text.splitlines(keepends=True)
    headers = {f"# {p}": p for p in paths}
    current, body = None, []
    for line in lines:
        name = headers.get(line.rstrip("\n"))
        if name is not None:
            if current:
                yield current, "".join(body)
            current, body = name, []
        else:
            body.append(line)
    if current:
        yield current, "".join(body)


def documented_functions(source: str) -> Iterator[dict]:
    """Functions/methods with a real docstring and a body beyond it, small enough to be an answer."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    source_lines = source.splitlines()  # once per file: slicing it per function keeps mining linear
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_DOCSTRING_CHARS or len(node.body) < 2:
            continue
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        lines = textwrap.dedent("\n".join(source_lines[first - 1 : node.end_lineno])).splitlines()
        doc_node = node.body[0]
        start, end = doc_node.lineno - first, doc_node.end_lineno - first
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        yield {"name": node.name, "code": "\n".join(lines), "doc": doc,
               "without_doc": "\n".join(lines[:start] + lines[end + 1 :]),
               "signature": f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"}


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def make_pairs(fn: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, user, assistant) conversations for one documented function."""
    pairs = [("implement", f"Write a Python function `{fn['signature']}` that does the following:\n{fn['doc']}", fence(fn["code"]))]
    kind = rng.choice(["docstring", "explain", "fim"])
    if kind == "docstring":
        pairs.append((kind, f"Write a docstring for this function:\n{fence(fn['without_doc'])}", fn["doc"]))
    elif kind == "explain":
        summary = fn["doc"].split("\n\n")[0].replace("\n", " ")
        pairs.append((kind, f"Explain what this code does:\n{fence(fn['without_doc'])}", f"`{fn['name']}`: {summary}"))
    else:
        lines = fn["code"].splitlines()
        candidates = [i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.strip().startswith(('"""', "'''", "#"))]
        if candidates:
            i = rng.choice(candidates)
            masked = "\n".join(lines[:i] + ["<FILL>"] + lines[i + 1 :])
            pairs.append((kind, f"Fill in the line marked <FILL> in this code. Answer with that line only.\n{fence(masked)}", lines[i]))
    return pairs


def mine_corpus(corpus_dir: Path, seed: int, counts: Counter, progress: bool = True) -> Iterator[dict]:
    for doc in tqdm(read_documents(corpus_dir), desc="mine", unit="repo", disable=not progress):
        files = split_repository_sample(doc["text"], doc["paths"]) if doc["paths"] else [("?", doc["text"])]
        for path, source in files:
            if not path.endswith(".py") and path != "?":
                continue
            for fn in documented_functions(source):
                rng = random.Random(f"{seed}:{doc['repo']}:{path}:{fn['name']}:{len(fn['code'])}")
                for kind, user, assistant in make_pairs(fn, rng):
                    counts[f"mined_{kind}"] += 1
                    yield {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                           "kind": kind, "repo": doc["repo"]}


def validate_messages(row, where: str) -> list[dict]:
    """The `messages` of one user JSONL row, or a MinicoderError that says what is wrong and where."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise MinicoderError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise MinicoderError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise MinicoderError(f"{where}: messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise MinicoderError(f"{where}: messages[{i}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise MinicoderError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def read_user_messages(path: Path, skip_bad: bool, counts: Counter) -> Iterator[dict]:
    if not path.is_file():
        raise MinicoderError(f"{path}: messages file does not exist")
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise MinicoderError(f"{path}:{lineno + 1}: not UTF-8 ({e.reason})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinicoderError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                messages = validate_messages(row, f"{path}:{lineno}")
            except MinicoderError:
                if not skip_bad:
                    raise
                counts["user_skipped"] += 1
                continue
            counts["user_rows"] += 1
            yield {"messages": messages, "kind": "user", "repo": f"{path.name}:{lineno}"}


def exercise_rows(n: int, seed: int, counts: Counter, progress: bool = True) -> Iterator[dict]:
    """Generated exercises whose reference solutions passed their tests in the sandbox, as chat pairs."""
    from .exercises import generate, verify

    exercises = generate(n, seed)
    for i, (ex, ok) in enumerate(zip(exercises, verify(exercises, progress=progress))):
        if not ok:
            counts["exercise_failed_tests"] += 1
            continue
        yield {"messages": [{"role": "user", "content": ex.instruction()}, {"role": "assistant", "content": fence(ex.code())}],
               "kind": "exercise", "repo": f"exercises/{i // 8}"}


def build_sft_data(out_dir, corpus_dir=None, messages_files=(), *, seed: int = 0, val_fraction: float = 0.05,
                   max_pairs: int | None = None, decontaminate: bool = True, skip_bad: bool = False,
                   exercises: int = 0, force: bool = False, progress: bool = True) -> dict:
    if not corpus_dir and not messages_files and not exercises:
        raise MinicoderError("give --corpus DIR, --messages FILE and/or --exercises N")
    if corpus_dir and not Path(corpus_dir).is_dir():
        raise MinicoderError(f"{corpus_dir}: corpus directory does not exist")
    start = time.time()
    counts: Counter = Counter()
    decontam = Decontaminator.from_humaneval() if decontaminate else None
    seen: set[bytes] = set()

    def all_rows() -> Iterator[dict]:
        if corpus_dir:
            yield from mine_corpus(Path(corpus_dir), seed, counts, progress)
        for f in messages_files:
            yield from read_user_messages(Path(f), skip_bad, counts)
        if exercises:
            yield from exercise_rows(exercises, seed, counts, progress)

    rows = []
    for row in all_rows():
        key = hashlib.sha1(json.dumps(row["messages"], sort_keys=True).encode()).digest()
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        if decontam and decontam.contaminated("\n".join(m["content"] for m in row["messages"])):
            counts["decontaminated"] += 1
            continue
        rows.append(row)
    if max_pairs and len(rows) > max_pairs:
        rows = random.Random(seed).sample(rows, max_pairs)
    if not rows:
        raise MinicoderError("no SFT conversations: the corpus has no documented functions and no --messages rows were given")
    val_repos = choose_validation_repos({r["repo"] for r in rows}, val_fraction, seed)
    with atomic_output_dir(out_dir, force=force) as tmp:
        split_counts = Counter()
        with open(tmp / "train.jsonl", "w") as tr, open(tmp / "val.jsonl", "w") as va:
            for row in rows:
                split = "val" if row["repo"] in val_repos else "train"
                split_counts[split] += 1
                (va if split == "val" else tr).write(json.dumps(row, ensure_ascii=False) + "\n")
        meta = {"corpus": str(corpus_dir) if corpus_dir else None, "messages_files": [str(f) for f in messages_files],
                "seed": seed, "kinds": dict(Counter(r["kind"] for r in rows)), "counts": dict(counts),
                "train": split_counts["train"], "val": split_counts["val"], "seconds": round(time.time() - start, 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
