"""Run untrusted Python in a separate, limited process: the only place generated code runs.

The HumanEval evaluator calls `run_python` / `run_many`; the CodeAct agent keeps a `PersistentSession`. Linux only.
How a run is contained, layer by layer (`isolation_info()` measures which layers are active on this host):

1. **Namespaces** (launcher.py): mount, PID, IPC, UTS and network namespaces (inside a user namespace when the
   host is not root). The run sees its own root (rootfs.py): one tmpfs of `Limits.disk_mb` holding its directory,
   /tmp, /var/tmp and /dev/shm, plus read-only binds of /usr, /lib* and the Python install; no host files, sockets,
   processes or SysV IPC. Its init is PID 1 of the namespace: when the program ends, or the host says stop, or
   the host dies (the launcher's lifeline pipe reaches EOF), init and with it every process of the run are killed.
2. **Unprivileged uid** (uids.py): when the host is root, the program runs as a uid of its own, leased per run.
3. **cgroups** (cgroups.py): memory (all processes, tmpfs and memfd pages together) and process count per run.
4. **rlimits**: CPU seconds, address space, file size, process count, no core dumps; plus a wall-clock timeout and
   an output cap enforced by the host (process.py).
5. **Clean environment** (boot.py): Python starts isolated (`-I -S -B`), with PATH, HOME, TMPDIR, locale and
   thread-count variables only; site-packages are added when `allow_site_packages` (the default).

Where the kernel refuses a layer the run still happens, with the weaker fallback named in `isolation_info()`:
no mount namespace -> a host work directory and sweeps of every world-writable directory and the SysV IPC objects
of the run's uid (hostclean.py); no network namespace -> a socket guard in the program's startup code; no cgroups
-> per-process rlimits only, with a warning.

Results a harness must be able to trust (a test verdict) do not come from the program's stdout: with
`report_pipe=True` the program's environment names a pipe (`MINICODER_REPORT_FD`) whose bytes come back as
`SandboxResult.report`.

The interpreter the program runs on must be executable by the run's uid; `sandbox_python()` picks one and
`MINICODER_SANDBOX_PYTHON` overrides the choice.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from . import cgroups
from .limits import Limits, SandboxError, SandboxResult
from .process import REPORT_FD_VARIABLE, Process, sandbox_python, use_namespaces
from .session import PersistentSession
from .uids import (
    UID_BASE,
    UID_COUNT,
    busiest_sandbox_uid,
    is_root,
    is_sandbox_uid,
    lease_is_free,
    process_table,
    processes_of_uid,
    sandbox_processes,
)

__all__ = [
    "Limits",
    "SandboxResult",
    "SandboxError",
    "run_python",
    "run_many",
    "PersistentSession",
    "isolation_info",
    "processes_of_uid",
    "sandbox_processes",
    "sandbox_python",
    "stray_processes",
    "busiest_sandbox_uid",
    "use_namespaces",
    "REPORT_FD_VARIABLE",
    "UID_BASE",
    "UID_COUNT",
]


def run_python(
    code: str,
    *,
    stdin: str = "",
    limits: Limits = Limits(),
    files: dict[str, str | bytes] | None = None,
    allow_site_packages: bool = True,
    python_path: list[str] | tuple[str, ...] = (),
    report_pipe: bool = False,
) -> SandboxResult:
    """Run `code` as a script (`__name__ == "__main__"`) in a fresh sandbox and return what happened.

    `files` are written into the working directory first (relative paths; `main.py` is the program);
    `python_path` adds directories to sys.path and PYTHONPATH (bound read-only into the run);
    `report_pipe` gives the program a pipe for a harness's verdict (see the module docstring).
    Raises SandboxError only when the sandbox itself cannot start; the program's failures are results."""
    return Process(
        code,
        limits=limits,
        stdin=stdin,
        files=files,
        allow_site_packages=allow_site_packages,
        python_path=python_path,
        report_pipe=report_pipe,
    ).run()


def run_many(
    programs: list[str],
    limits: Limits = Limits(),
    workers: int | None = None,
    *,
    allow_site_packages: bool = True,
    files: dict[str, str | bytes] | None = None,
    report_pipe: bool = False,
    stdins: list[str] | None = None,
) -> list[SandboxResult]:
    """Run several programs in parallel, each in its own sandbox; results in the order of `programs`.
    `files` and `report_pipe` are as in run_python, for every program; `stdins` gives each program its stdin."""
    workers = workers or os.cpu_count() or 1
    if stdins is not None and len(stdins) != len(programs):
        raise ValueError(f"stdins: {len(stdins)} given for {len(programs)} programs")

    def one(index: int) -> SandboxResult:
        return run_python(programs[index], limits=limits, allow_site_packages=allow_site_packages, files=files,
                          report_pipe=report_pipe, stdin=stdins[index] if stdins is not None else "")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(programs))))


def stray_processes() -> list[int]:
    """Processes of runs that no longer exist: a sandbox uid whose lease is free, or a task in a run cgroup of a
    host process that is gone. Live runs of other host processes (an evaluation beside the tests) do not count."""
    strays = set(cgroups.stale_tasks())
    for pid, (owner, _) in process_table().items():
        if is_sandbox_uid(owner) and (not is_root() or lease_is_free(owner)):
            strays.add(pid)
    return sorted(strays)


_PROBE = """
import json, os
print(json.dumps({"uid": os.getuid(), "pid": os.getpid(), "host_file": os.path.exists(HOST_FILE),
                  "processes": len([p for p in os.listdir("/proc") if p.isdigit()])}))
"""


def isolation_info() -> dict[str, object]:
    """Which containment layers are active on this machine, measured by running one tiny program."""
    import json

    probe = Process(_PROBE.replace("HOST_FILE", repr(os.path.abspath(__file__))), limits=Limits(timeout_s=10),
                    allow_site_packages=False)
    namespaces = []
    try:
        why = probe.pump(probe.started + probe.limits.timeout_s)
        namespaces = list(probe.namespaces)
        result = probe.result(why)
    finally:
        probe.cleanup()
    seen = json.loads(result.stdout) if result.ok else {}
    uid_drop = bool(seen) and seen["uid"] != os.getuid() and is_sandbox_uid(seen["uid"])
    private_fs = bool(seen) and not seen["host_file"]
    return {
        "python": sandbox_python(),
        "uid_drop": uid_drop,
        "uid_range": f"{UID_BASE}-{UID_BASE + UID_COUNT - 1}" if is_root() else None,
        "namespaces": namespaces,
        "filesystem": "private root: tmpfs + read-only Python install" if private_fs else
                      "host filesystem, swept after each run",
        "network_isolation": result.network_isolation,
        "resource_limits": cgroups.describe(),
        "process_cleanup": "PID namespace" if "pid" in namespaces else
                           ("kill(-1) as the run's uid + subreaper" if uid_drop else "process group + subreaper"),
        "rlimit_nproc_enforced": uid_drop,
        "works": result.ok,
    }
