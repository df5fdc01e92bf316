"""Which interpreter runs the program, and which parts of its install the run gets to see.

The interpreter must be executable by the run's uid. With a private root the host's own is bound in where the uid
can reach it; without one, a 0700 directory on the way (pyenv under /root) keeps the uid out, so `sandbox_python()`
tries the host's, then a system `python3.X` of the same version; `MINICODER_SANDBOX_PYTHON` overrides the choice.
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import sys

from .limits import Limits, SandboxError
from .uids import is_root

MIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def install_paths(interpreter: str) -> list[str]:
    """What of the Python install the interpreter needs, bound read-only into the run (/usr always is)."""
    prefixes = {os.path.dirname(os.path.dirname(p)) for p in (interpreter, os.path.realpath(interpreter))}
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        prefixes |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = []
    for prefix in sorted(prefixes):
        if prefix in ("/", ""):
            continue
        # Not the whole prefix: a Python in ~/bin would otherwise show the home directory.
        paths += [os.path.join(prefix, name) for name in ("bin", "lib", "lib64", "pyvenv.cfg")]
    return [p for p in paths if os.path.exists(p)]


def hidden_site_dirs(binds: list[str], allowed: list[str]) -> list[str]:
    """site-packages inside the bound install that the run may not see (allow_site_packages=False): covered by an
    empty read-only tmpfs, since a bind cannot leave out a subdirectory."""
    version = "python%d.%d" % sys.version_info[:2]
    candidates = set(site.getsitepackages())
    for bind in binds:
        for lib in ("lib", "lib64"):
            for name in ("site-packages", "dist-packages"):
                candidates.add(os.path.join(bind if bind.endswith(lib) else os.path.join(bind, lib), version, name))
    return sorted(c for c in candidates if os.path.isdir(c) and c not in allowed and
                  any(c.startswith(b.rstrip("/") + "/") for b in binds))



def _host_version() -> str:
    return "%d.%d" % sys.version_info[:2]


def sandbox_python() -> str:
    """The interpreter programs run on: one the sandbox uid can execute, of the host's Python version."""
    override = os.environ.get("MINICODER_SANDBOX_PYTHON")
    if override:
        return override
    if not is_root():
        return sys.executable  # same uid as the host: whatever runs us runs the program
    # With a private root the host's interpreter is bound in where the uid can reach it; without one, a 0700
    # directory on the way (pyenv under /root) may keep the uid out.
    from .process import use_namespaces

    return _pick_python(use_namespaces())


@functools.lru_cache(maxsize=None)
def _pick_python(namespaces: bool) -> str:
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable)]

    candidates += [shutil.which(f"python{_host_version()}", path=MIN_PATH) or ""]
    candidates += [shutil.which("python3", path=MIN_PATH) or ""]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            from .process import Process  # a probe run; process.py imports this module

            probe = Process(
                "import sys; print('%d.%d' % sys.version_info[:2])",
                limits=Limits(timeout_s=10, disk_mb=8),
                interpreter=candidate,
                allow_site_packages=False,
            ).run()
        except SandboxError as exc:  # typically: permission denied on the way to it
            tried.append(f"{candidate}: {exc}")
            continue
        if probe.status == "ok" and probe.stdout.strip() == _host_version():
            return candidate
        tried.append(f"{candidate}: {probe.status} {probe.stdout.strip()} {probe.stderr.strip()[-200:]}")
    raise SandboxError(
        "no Python interpreter that the sandbox uid can run (the host's may sit in a private directory); "
        "set MINICODER_SANDBOX_PYTHON to one. Tried: " + "; ".join(tried)
    )
