"""Repository ordering (DeepSeek-Coder, data step 2): put each file after the files it imports.

Python files are parsed for their imports (``import a.b``, ``from a import b``, ``from . import x``,
``from ..mod import y``, also imports inside functions and ``try`` blocks), imports are mapped to files of the
same repository, and the files are sorted topologically. Cycles (``a`` imports ``b`` imports ``a``) are broken
the same way every time: the next file is always the remaining one with the fewest remaining dependencies,
ties going to the smaller path. Without cycles this is an ordinary topological order.

Files in other languages have no parsed dependencies: they follow the Python files, C/C++ headers first
(what the sources include), then in path order.
"""

from __future__ import annotations

import ast
import heapq
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

HEADER_SUFFIXES = (".h", ".hh", ".hpp")


@dataclass(frozen=True)
class Import:
    module: str  # the dotted name after any leading dots; "" for ``from . import x``
    names: tuple[str, ...]  # names after ``from ... import``; () for a plain ``import a.b``
    level: int  # leading dots: 0 for an absolute import


_STATEMENT_LISTS = ("body", "handlers", "orelse", "finalbody", "cases")  # in source order


def _statements(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """All statements, nested ones included; expressions are skipped (imports are statements), which makes
    this several times faster than ast.walk."""
    for node in nodes:
        yield node
        for name in _STATEMENT_LISTS:
            children = getattr(node, name, None)
            if isinstance(children, list):
                yield from _statements(children)


def python_imports(tree: ast.Module) -> list[Import]:
    """Every import statement of a parsed Python file in source order, also inside functions, classes, try blocks."""
    found = []
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, (), 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Import(node.module or "", tuple(alias.name for alias in node.names), node.level))
    return found


def _module_parts(path: str) -> tuple[str, ...]:
    """``pkg/sub/mod.py`` -> (pkg, sub, mod); ``pkg/__init__.py`` -> (pkg,)."""
    pure = PurePosixPath(path)
    parts = pure.parent.parts if pure.stem == "__init__" else pure.parent.parts + (pure.stem,)
    return tuple(p for p in parts if p not in ("", "."))


def _importable_name(path: str, package_dirs: set[str]) -> str:
    """The module name Python would import the file by: relative to the folder above its outermost package.

    ``src/proj/a.py`` with ``src/proj/__init__.py`` is ``proj.a``; a script in a plain folder is just its stem.
    """
    dirs = PurePosixPath(path).parent.parts
    start = len(dirs)
    while start > 0 and "/".join(dirs[:start]) in package_dirs:
        start -= 1
    return ".".join(_module_parts(path)[start:])


def module_index(paths: Iterable[str], package_dirs: set[str]) -> dict[str, str]:
    """Module name -> file path, for the Python files of one repository.

    Each file is known by its importable name and, when different, by its path from the repository root
    (which relative imports resolve against and namespace packages need); importable names win on a clash.
    """
    paths = sorted(paths)
    index: dict[str, str] = {}
    for path in paths:
        index.setdefault(_importable_name(path, package_dirs), path)
    for path in paths:
        index.setdefault(".".join(_module_parts(path)), path)
    index.pop("", None)
    return index


def _longest_known_prefix(dotted: str, index: dict[str, str]) -> str | None:
    """``a.b.c`` -> the file of ``a.b.c``, else of ``a.b``, else of ``a``: the most specific module imported."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        path = index.get(".".join(parts[:end]))
        if path:
            return path
    return None


def _absolute_module(importer: str, imp: Import) -> str | None:
    """The dotted module an import refers to, relative imports resolved against the importer's folder."""
    if imp.level == 0:
        return imp.module
    package = PurePosixPath(importer).parent.parts
    if imp.level - 1 > len(package):
        return None  # more dots than folders: points outside the repository
    base = package[: len(package) - (imp.level - 1)]
    return ".".join(base + tuple(p for p in imp.module.split(".") if p))


def resolve_import(importer: str, imp: Import, index: dict[str, str]) -> set[str]:
    """The files of the repository that one import statement of `importer` depends on."""
    module = _absolute_module(importer, imp)
    if module is None:
        return set()
    found = set()
    unresolved_name = not imp.names
    for name in imp.names:  # ``from pkg import mod``: the name may itself be a submodule
        submodule = index.get(f"{module}.{name}" if module else name)
        if submodule:
            found.add(submodule)
        else:
            unresolved_name = True
    if unresolved_name and module:
        target = _longest_known_prefix(module, index)
        if target:
            found.add(target)
    found.discard(importer)
    return found


def dependency_order(dependencies: dict[str, set[str]]) -> list[str]:
    """Topological order (dependencies first) that breaks cycles deterministically.

    At every step the next node is the remaining one with the fewest remaining dependencies, ties by name.
    A heap with lazy deletion keeps this O(E log N) for large repositories.
    """
    known = {node: (deps & dependencies.keys()) - {node} for node, deps in dependencies.items()}
    remaining = {node: len(deps) for node, deps in known.items()}
    dependents = defaultdict(list)
    for node, deps in known.items():
        for dep in deps:
            dependents[dep].append(node)
    heap = [(count, node) for node, count in remaining.items()]
    heapq.heapify(heap)
    order = []
    while heap:
        count, node = heapq.heappop(heap)
        if remaining.get(node) != count:
            continue  # stale entry: node already placed, or its count has gone down since
        del remaining[node]
        order.append(node)
        for dependent in dependents[node]:
            if dependent in remaining:
                remaining[dependent] -= 1
                heapq.heappush(heap, (remaining[dependent], dependent))
    return order


def order_files(python_files: dict[str, list[Import]], other_paths: Iterable[str] = (),
                package_dirs: set[str] | None = None) -> list[str]:
    """The order of a repository's files in its sample.

    `python_files` maps each Python path to its imports; `package_dirs` are the folders holding an
    ``__init__.py`` (also ones dropped from the corpus, e.g. for being empty), by default those among the keys.
    """
    if package_dirs is None:
        package_dirs = {str(PurePosixPath(p).parent) for p in python_files if PurePosixPath(p).name == "__init__.py"}
    index = module_index(python_files, package_dirs)
    dependencies = {
        path: set().union(*(resolve_import(path, imp, index) for imp in imports))
        for path, imports in python_files.items()
    }
    others = sorted(other_paths, key=lambda p: (not p.endswith(HEADER_SUFFIXES), p))
    return dependency_order(dependencies) + others
