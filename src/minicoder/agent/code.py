"""Finding the Python in a model's reply: what small models really write, not only tidy fences.

`extract_code(reply)` returns the code to run, or None when the reply is a final answer. In order:

1. CodeAct's own tags, `<execute> ... </execute>` (an unclosed tag runs to the end);
2. fenced blocks (``` or ~~~, language python/py/python3/ipython or none; a fence may open after text on its
   line and close at the end of a code line); an unclosed fence runs to the end of the reply; blocks in
   other languages (```text, ```bash, ```output) are not run; several Python blocks run as one cell, in order;
3. no fence at all: the reply from its first line on which the rest parses as Python and holds a statement
   (an assignment, import, def, loop, or a call such as `print(x)`) -- prose before it is dropped, and prose
   that happens to parse ("Yes", "2.1447") is not code.
"""

from __future__ import annotations

import ast
import re
import textwrap

PYTHON_LANGUAGES = {"", "python", "py", "python3", "ipython", "pycon"}
_EXECUTE = re.compile(r"<execute>(.*?)(?:</execute>|\Z)", re.S)
_OPEN = re.compile(r"(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+.-]*)[ \t]*$")


def extract_code(reply: str) -> str | None:
    tagged = [block for block in _EXECUTE.findall(reply) if block.strip()]
    if tagged:
        return _join(tagged)
    blocks = _fenced_blocks(reply)
    if blocks is not None:
        code = [body for lang, body in blocks if lang.lower() in PYTHON_LANGUAGES and body.strip()]
        return _join(code) if code else None
    return _bare_code(reply)


def _join(blocks: list[str]) -> str:
    return "\n\n".join(textwrap.dedent(block).strip("\n") for block in blocks)


def _fenced_blocks(reply: str) -> list[tuple[str, str]] | None:
    """(language, body) of each fenced block; None when the reply has no fence."""
    blocks: list[tuple[str, str]] = []
    lines = reply.splitlines()
    i = 0
    found = False
    while i < len(lines):
        match = _OPEN.search(lines[i])
        if match is None:
            i += 1
            continue
        found = True
        fence, lang = match["fence"], match["lang"]
        body: list[str] = []
        i += 1
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(fence[0] * 3) and set(stripped) == {fence[0]}:  # a closing fence line
                i += 1
                break
            if line.rstrip().endswith(fence[0] * 3):  # `print(x)```: the fence closes at the end of a line
                body.append(line.rstrip().rstrip(fence[0]))
                i += 1
                break
            body.append(line)
            i += 1
        blocks.append((lang, "\n".join(body)))
    return blocks if found else None


def _bare_code(reply: str) -> str | None:
    lines = reply.strip("\n").splitlines()
    for start in range(len(lines)):
        candidate = "\n".join(lines[start:])
        try:
            tree = ast.parse(textwrap.dedent(candidate))
        except SyntaxError:
            continue
        if any(_is_statement(node) for node in tree.body):
            return textwrap.dedent(candidate).strip("\n")
        return None  # it parses but is only names / numbers / strings: an answer, not code
    return None


def _is_statement(node: ast.stmt) -> bool:
    if isinstance(node, ast.Expr):
        return isinstance(node.value, (ast.Call, ast.Await))
    return True
