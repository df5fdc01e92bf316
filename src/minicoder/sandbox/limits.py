"""The sandbox's public value types: what a run may use (`Limits`), what came of it (`SandboxResult`), and the
error raised when the sandbox itself cannot run (`SandboxError`)."""

from __future__ import annotations

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
