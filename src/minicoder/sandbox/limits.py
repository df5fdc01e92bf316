"""What a run may use (`Limits`, and the rlimits that enforce part of it), what came of it (`SandboxResult`, and
how its status is told), and the error raised when the sandbox itself cannot run (`SandboxError`)."""

from __future__ import annotations

import re
import resource
import signal
from dataclasses import dataclass

from minicoder.errors import MinicoderError


class SandboxError(MinicoderError):
    """The sandbox itself could not run (no usable interpreter, setup failed); not the program's fault."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, per run (per call in a PersistentSession)
    cpu_s: int = 10  # CPU seconds of the main process
    memory_mb: int = 1024  # all processes of the run together (cgroup), and each one's address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the program may write
    disk_mb: int = 64  # everything the run writes (its directory, /tmp, /dev/shm: one size-limited tmpfs)
    max_processes: int = 64  # processes + threads of the run (cgroup pids, and RLIMIT_NPROC of its uid)
    max_output_bytes: int = 1_000_000  # stdout + stderr together; the run is killed beyond it
    network: bool = False  # True: no network isolation at all


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" | "timeout" | "memory" | "cpu" | "output_limit" | "killed"
    returncode: int | None  # exit status; negative = killed by that signal; None when unknown
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool  # output was cut at Limits.max_output_bytes
    network_isolation: str  # "namespace" | "socket_guard" | "none"
    state_lost: bool = False  # PersistentSession only: the worker was restarted, its globals are gone
    report: bytes | None = None  # what a harness wrote to the report pipe (run_python(report_pipe=True)), else None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def rlimits(limits: Limits, nproc_extra: int, session: bool) -> list[list[int]]:
    """[resource, soft, hard] for the program, set by the launcher before it drops to the run's uid."""
    mb = 1024 * 1024
    # A session's CPU limit is set per call by the worker itself; the wall-clock timeout backs it up.
    cpu = [resource.RLIM_INFINITY] * 2 if session else [limits.cpu_s, limits.cpu_s + 1]
    nproc = limits.max_processes + nproc_extra
    return [
        [resource.RLIMIT_CPU, *cpu],  # soft: SIGXCPU; hard: SIGKILL
        [resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb],
        [resource.RLIMIT_FSIZE, limits.file_size_mb * mb, limits.file_size_mb * mb],
        [resource.RLIMIT_NPROC, nproc, nproc],
        [resource.RLIMIT_CORE, 0, 0],
    ]


# The last line of a traceback (numpy's is `numpy...._ArrayMemoryError: ...`), ENOMEM, a C++ allocation failure.
_MEMORY_MESSAGE = re.compile(r"^[\w.]*MemoryError\b|Cannot allocate memory|std::bad_alloc", re.M)


def classify(returncode: int | None, stderr: str, limits: Limits, cpu_s: float, maxrss_kb: int, oom: int) -> str:
    """The status of a run that ended on its own (not by timeout or the output cap)."""
    if returncode == 0:
        return "ok"
    if oom:
        return "memory"  # the kernel killed a process of the run at the run's memory limit
    if returncode is None:
        return "killed"
    if _MEMORY_MESSAGE.search(stderr[-4000:]):
        return "memory"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_s >= limits.cpu_s):
        return "cpu"
    if returncode < 0:
        if maxrss_kb * 1024 >= 0.9 * limits.memory_mb * 1024 * 1024:
            return "memory"  # killed while at its memory limit (allocation failure inside C code)
        return "killed"
    return "error"
