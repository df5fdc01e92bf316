"""The user's Python functions as tools the agent's code can call inside the sandbox.

The sandbox is another process (another uid when the host is root), so a function object cannot be handed
over; what crosses is code that defines it again there, run as the session's setup (and run again when a
crashed session restarts). Three ways, each with its limits:

* a function object, `Tool.from_function(derivative)` (what `CodeActAgent(tools=[derivative])` does):
  its **source** is sent (`inspect.getsource`, decorators dropped). Modules it uses as globals (`math`,
  `np`) are imported again by name; plain constants (numbers, strings, tuples...) are copied by value.
  Refused with a clear error: lambdas, builtins, closures, functions typed at the interactive prompt
  (no source), and functions that use other globals of their module (helpers, classes) -- for those,
  use one of the two forms below.
* `"package.module:function"`: the sandbox **imports** it. The directory it was found in goes on the
  sandbox's sys.path, so that directory must be readable by the sandbox's unprivileged uid (not under
  /root on a root host); the module's top-level code runs in the sandbox, under its limits.
* `"path/to/file.py:function"`: the file is **copied** into the sandbox's working directory and imported
  from there (the file alone: its own imports must be the standard library or installed packages).

The host imports the module or file too, to read the signature and docstring the model is shown.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MinicoderError


@dataclass(frozen=True)
class Tool:
    name: str
    signature: str  # "(f, x, h=1e-05)"
    doc: str
    setup: str  # sandbox code that defines `name`
    python_path: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_function(cls, func: Callable) -> "Tool":
        name = getattr(func, "__name__", None)
        if not inspect.isfunction(func) or name == "<lambda>":
            raise MinicoderError(f"tool {func!r}: only functions written with `def` can be sent by source; "
                                 "for anything else pass 'module:function'")
        closure = inspect.getclosurevars(func)
        if closure.nonlocals:
            raise MinicoderError(f"tool {name}: it is a closure over {', '.join(sorted(closure.nonlocals))}, "
                                 "which cannot be sent to the sandbox; define it at module level")
        try:
            source = textwrap.dedent(inspect.getsource(func))
        except (OSError, TypeError):
            raise MinicoderError(f"tool {name}: its source is not available (defined at the interactive prompt?); "
                                 "put it in a file and pass 'path/to/file.py:function'") from None
        definition = _without_decorators(source, name)
        preamble = [_global_line(func, var, value) for var, value in sorted(closure.globals.items())]
        return cls(name, _signature(func), inspect.getdoc(func) or "", "\n".join([*preamble, definition]))

    @classmethod
    def from_spec(cls, spec: str) -> "Tool":
        """"package.module:function" or "path/to/file.py:function"."""
        target, _, name = spec.rpartition(":")
        if not target or not name.isidentifier():
            raise MinicoderError(f"--tools {spec!r}: expected module:function or path/to/file.py:function")
        if target.endswith(".py") or os.sep in target:
            return cls._from_file(spec, Path(target), name)
        return cls._from_module(spec, target, name)

    @classmethod
    def _from_file(cls, spec: str, path: Path, name: str) -> "Tool":
        if not path.is_file():
            raise MinicoderError(f"--tools {spec!r}: {path} is not a file")
        module_name = path.stem
        if not module_name.isidentifier() or module_name == "main":  # the sandbox's own main.py
            raise MinicoderError(f"--tools {spec!r}: {path.name} is not an importable module name")
        loaded = importlib.util.module_from_spec(
            importlib.util.spec_from_file_location(f"_minicoder_tool_{module_name}", path))
        func = _attribute(spec, _exec_module(spec, loaded, path), name)
        return cls(name, _signature(func), inspect.getdoc(func) or "", f"from {module_name} import {name}",
                   files={f"{module_name}.py": path.read_text(encoding="utf-8")})

    @classmethod
    def _from_module(cls, spec: str, module_name: str, name: str) -> "Tool":
        if os.getcwd() not in sys.path:  # as `python -m` does: modules in the current directory import
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise MinicoderError(f"--tools {spec!r}: cannot import {module_name} ({e})") from None
        func = _attribute(spec, module, name)
        root = _import_root(module)
        if root is not None and os.geteuid() == 0 and not _readable_by_others(root):
            raise MinicoderError(f"--tools {spec!r}: {root} is not readable by the sandbox's unprivileged user; "
                                 f"pass the file instead ({getattr(module, '__file__', module_name)}:{name})")
        return cls(name, _signature(func), inspect.getdoc(func) or "", f"from {module_name} import {name}",
                   python_path=(str(root),) if root is not None else ())

    def describe(self) -> str:
        """The stub the model is shown: signature and docstring, body elided (as langgraph-codeact does)."""
        doc = f'"""{self.doc}\n"""' if "\n" in self.doc else f'"""{self.doc or "(no description)"}"""'
        doc = textwrap.indent(doc, "    ")
        return f"def {self.name}{self.signature}:\n{doc}\n    ..."


def as_tools(items: Iterable[Callable | str | Tool]) -> list[Tool]:
    tools = []
    for item in items:
        tool = item if isinstance(item, Tool) else Tool.from_spec(item) if isinstance(item, str) \
            else Tool.from_function(item)
        if any(t.name == tool.name for t in tools):
            raise MinicoderError(f"two tools are named {tool.name}")
        tools.append(tool)
    return tools


def _signature(func: Callable) -> str:
    try:
        return str(inspect.signature(func))
    except (TypeError, ValueError):
        return "(...)"


def _without_decorators(source: str, name: str) -> str:
    """The `def` itself: decorators (a LangChain @tool, say) would not exist in the sandbox."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name)
    return "\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno])


def _global_line(func: Callable, var: str, value) -> str:
    if isinstance(value, types.ModuleType):
        return f"import {value.__name__} as {var}" if value.__name__ != var else f"import {var}"
    if isinstance(value, (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)):
        try:
            if ast.literal_eval(repr(value)) == value:
                return f"{var} = {value!r}"
        except (ValueError, SyntaxError):
            pass
    module = getattr(value, "__module__", None)
    if module not in (None, "__main__", func.__module__) and "." not in getattr(value, "__qualname__", "."):
        return f"from {module} import {value.__qualname__} as {var}"  # imported from elsewhere: import it again
    raise MinicoderError(f"tool {func.__name__}: it uses the global {var!r} of its module, which cannot be sent by "
                         "source; import it inside the function, or pass the tool as 'path/to/file.py:function'")


def _attribute(spec: str, module, name: str) -> Callable:
    func = getattr(module, name, None)
    if not callable(func):
        raise MinicoderError(f"--tools {spec!r}: {module.__name__} has no function {name}")
    return func


def _exec_module(spec: str, module, path: Path):
    try:
        module.__spec__.loader.exec_module(module)
    except Exception as e:
        raise MinicoderError(f"--tools {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def _import_root(module) -> Path | None:
    """The sys.path entry the module was imported from (None: built in)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    root = Path(file).resolve().parent
    depth = module.__name__.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    for _ in range(depth):
        root = root.parent
    return root


def _readable_by_others(path: Path) -> bool:
    """Others may list `path` (r+x) and pass through each directory above it (x)."""
    if os.stat(path).st_mode & 0o005 != 0o005:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in path.parents)
