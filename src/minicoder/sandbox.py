"""Run untrusted Python in a separate, limited process.

This module is the only place that runs generated code: the HumanEval evaluator calls `run_python` /
`run_many`, the CodeAct agent keeps a `PersistentSession`. Linux only.

How a run is contained, layer by layer (`isolation_info()` says which layers are active):

1. **Launcher.** The host starts a small Python launcher (`_LAUNCHER`, run with `-I -S -c`) in a new session
   with an empty environment. It stays alive for the whole run as a *child subreaper*: every process the
   program forks, even one that calls `setsid()` or double-forks, is re-parented to the launcher, which reaps
   it. (PID 1 of a container often reaps nothing, so without this each orphan would stay a zombie forever.)
2. **Unprivileged uid.** When the host runs as root, the program runs as a uid of its own, leased per run from
   `UID_BASE .. UID_BASE+UID_COUNT` (numbers with no passwd entry). As root, RLIMIT_NPROC is not enforced and
   the program could write anywhere and signal anything; as its own uid it cannot write into the project or
   another user's files, cannot signal the host, and RLIMIT_NPROC caps its processes *and threads*, so a fork
   bomb stalls at `max_processes`. Because the uid is unique to the run, the launcher ends everything with one
   `kill(-1, SIGKILL)` made as that uid: the kernel delivers it atomically against concurrent forks, so no
   fork-bomb child survives, and it cannot touch other runs. A non-root host cannot switch uid; it falls back
   to killing the program's process group (processes that leave the group are missed there).
3. **Resource limits** (setrlimit in the child before exec): CPU seconds, address space, file size, process
   count, no core dumps; plus a wall-clock timeout and an output cap enforced by the host.
4. **No network.** The launcher enters a new network namespace (`unshare(CLONE_NEWNET)`, or
   `CLONE_NEWUSER|CLONE_NEWNET` when not root) that has only a loopback device, down. Where the kernel refuses,
   the program's startup code replaces `socket.socket` creation with a PermissionError ("socket_guard"): it
   stops ordinary libraries but not code that calls `_socket` directly, so it is weaker than the namespace.
5. **Fresh directory, clean environment.** A new temporary directory owned by the run's uid is the working
   directory, HOME and TMPDIR; it is deleted afterwards, with anything the uid left at the top of /tmp,
   /var/tmp and /dev/shm. The environment holds PATH, HOME, TMPDIR, locale and thread-count variables only.
   Python starts isolated (`-I`: no PYTHON* variables, no user site) and with `-S`; site-packages of the host
   environment are added explicitly when `allow_site_packages` (the default; the agent may want numpy).

The interpreter the program runs on must be executable by the run's uid. The host's own interpreter may not be
(pyenv under a 0700 /root), so `sandbox_python()` tries the host's, then a system `python3.X` of the same
version; `MINICODER_SANDBOX_PYTHON` overrides the choice.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
from collections import Counter
import grp
import json
import os
import pwd
import random
import re
import resource
import selectors
import shutil
import signal
import site
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from minicoder.errors import MinicoderError

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
    "UID_BASE",
    "UID_COUNT",
]

# Uids leased to runs when the host is root. Between systemd-homed (60001-60513) and DynamicUser (61184+);
# regular users end at 60000. Numbers with a passwd or group entry are skipped.
UID_BASE = 61000
UID_COUNT = 128

_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
_MAIN_FILE = "main.py"  # the program's file in the working directory
_TERMINATE_GRACE_S = 3.0  # how long the launcher gets to clean up before the host kills it outright


class SandboxError(MinicoderError):
    """The sandbox itself could not run (no usable interpreter, setup failed); not the program's fault."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, per run (per call in a PersistentSession)
    cpu_s: int = 10  # CPU seconds of the main process
    memory_mb: int = 1024  # address space (RLIMIT_AS) of each process
    file_size_mb: int = 16  # largest file the program may write
    max_processes: int = 64  # processes + threads of the run's uid (enforced when the host is root)
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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------------
# Code that runs in other processes. Kept as strings and passed with `-c`, so neither process imports
# anything from the host and the program's __main__ stays clean.

# Runs as the host's user (root or not) with `-I -S`; argv[1] is a JSON config. See the module docstring.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys

cfg = json.loads(sys.argv[1])
status_fd, uid = cfg["status_fd"], cfg["uid"]
os.set_inheritable(status_fd, False)  # the program must not hold (or forge) our reports

def report(**event):
    os.write(status_fd, (json.dumps(event) + "\n").encode())

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the program come to us, and we reap them
if cfg["die_with_parent"]:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # host gone: clean up like a timeout

network = "none"
if cfg["isolate_network"]:
    network = "socket_guard"
    if not cfg["no_netns"]:
        # Root may create a network namespace directly; anyone else needs a user namespace around it.
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        if libc.unshare(flags) == 0:
            network = "namespace"
report(event="start", network=network)

pid = None
pending_kill = False

def kill_all():
    # End every process of the run. With a uid of its own, one kill(-1) made as that uid reaches all of
    # them at once, fork-bomb children included, and nothing else; otherwise kill the program's group.
    global pending_kill
    if pid is None:
        pending_kill = True
        return
    if uid is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        return
    if os.fork() == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # never signals the caller itself
        finally:
            os._exit(0)

signal.signal(signal.SIGTERM, lambda *_: kill_all())  # the host's "stop now"

pid = os.fork()
if pid == 0:
    try:
        if uid is None:
            os.setpgid(0, 0)  # a group of its own, for kill_all
        for res, soft, hard in cfg["rlimits"]:
            resource.setrlimit(res, (soft, hard))  # as root still, so hard limits can be set
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # set-uid binaries cannot give root back
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        os.chdir(cfg["cwd"])
        os.execve(cfg["argv"][0], cfg["argv"] + [network], cfg["env"])
    except BaseException as exc:
        report(event="error", error="%s: %s" % (type(exc).__name__, exc))
    os._exit(127)

# The program holds its own copies now; ours would keep the host from seeing EOF.
for fd in cfg["child_fds"]:
    os.close(fd)
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)
if pending_kill:
    kill_all()

exit_event = dict(event="exit", wait_status=None, cpu_s=0.0, maxrss_kb=0)
while True:  # reap everything; ECHILD means no process of the run is left
    try:
        child, wait_status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        break
    if child == pid:
        exit_event.update(wait_status=wait_status, cpu_s=usage.ru_utime + usage.ru_stime,
                          maxrss_kb=usage.ru_maxrss)
        kill_all()  # background processes do not outlive the program
report(**exit_event)
"""

# Runs as the sandbox uid, in the sandbox interpreter, compiled under the name _BOOT_FILE so tracebacks
# can leave its frames out: argv[1] is this code, argv[2] a JSON config, argv[3] the network mode.
# Everything lives inside one function, deleted from __main__ before the program runs.
_BOOT_FILE = "<minicoder-sandbox>"
_BOOT_COMMAND = f"exec(compile(__import__('sys').argv[1], {_BOOT_FILE!r}, 'exec'))"
_BOOT = r"""
def _minicoder_boot():
    import json, sys
    cfg, network = json.loads(sys.argv[2]), sys.argv[3]
    import site
    for path in cfg["site_dirs"]:
        site.addsitedir(path)  # also runs the .pth files (editable installs)
    site.setquit(); site.setcopyright(); site.sethelper()  # exit(), quit(), help() as usual
    sys.path[0:0] = [cfg["cwd"]] + cfg["paths"]  # -I leaves the working directory off sys.path
    if network == "socket_guard":
        import socket
        real_init = socket.socket.__init__
        def guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:  # wrapping an existing fd (socketpair) is harmless
                raise PermissionError(13, "network access is disabled in this sandbox")
            real_init(self, family, type, proto, fileno)
        socket.socket.__init__ = guarded_init

    def print_exception(exc):
        import traceback
        try:
            report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
            frames = list(report.stack)
            if frames and frames[0].filename == "<string>":
                del frames[0]  # the -c line
            frames = [f for f in frames if f.filename != "<minicoder-sandbox>"]  # this code
            report.stack = traceback.StackSummary.from_list(frames)
            print("".join(report.format()), end="", file=sys.stderr)
        except BaseException:  # e.g. no memory left to format it
            print(type(exc).__name__, file=sys.stderr)

    main = sys.modules["__main__"].__dict__
    del main["_minicoder_boot"]
    if cfg["worker"] is None:
        path = cfg["main"]
        sys.argv = [path]
        main["__file__"] = path
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        try:
            exec(code, main)
        except SystemExit:
            raise
        except BaseException as exc:
            print_exception(exc)
            sys.exit(1)
        return

    # PersistentSession worker: requests and replies are length-prefixed JSON on two private pipes.
    import io, linecache, os, signal, struct
    req_fd, resp_fd = cfg["worker"]
    sys.argv = [""]

    class CPUTimeExceeded(BaseException):  # not an Exception: `except Exception` must not swallow it
        pass
    CPUTimeExceeded.__qualname__ = "CPUTimeExceeded"  # tracebacks show this, not boot internals

    def on_cpu_timer(signum, frame):
        raise CPUTimeExceeded("CPU time limit of %d s exceeded" % cfg["cpu_s"])
    signal.signal(signal.SIGPROF, on_cpu_timer)

    def read_exact(n):
        data = b""
        while len(data) < n:
            chunk = os.read(req_fd, n - len(data))
            if not chunk:
                raise SystemExit(0)  # host closed the session
            data += chunk
        return data

    cell = 0
    while True:
        request = json.loads(read_exact(struct.unpack(">I", read_exact(4))[0]))
        cell += 1
        filename = "<cell %d>" % cell
        source = request["code"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks
        sys.stdin = io.StringIO(request["stdin"])
        # Per-call CPU budget: a profiling timer counts this process's CPU time from now (RLIMIT_CPU would
        # count the worker's whole life, in whole seconds). Raising in the worker keeps its state.
        signal.setitimer(signal.ITIMER_PROF, cfg["cpu_s"])
        status, returncode = "ok", 0
        try:
            exec(compile(source, filename, "exec"), main)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                returncode = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                returncode = 1
            status = "ok" if returncode == 0 else "error"
        except BaseException as exc:
            print_exception(exc)
            returncode = 1
            status = {MemoryError: "memory", CPUTimeExceeded: "cpu"}.get(type(exc), "error")
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        reply = json.dumps({"status": status, "returncode": returncode}).encode()
        os.write(resp_fd, struct.pack(">I", len(reply)) + reply)

_minicoder_boot()
"""


# --------------------------------------------------------------------------------------------------
# Host-side helpers.


def _is_root() -> bool:
    return os.geteuid() == 0


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (real uid, thread count) of every process, zombies included."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        uid, threads = None, 1
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
                        break  # Threads comes after Uid
        except (OSError, ValueError):
            continue  # exited meanwhile
        if uid is not None:
            table[int(name)] = (uid, threads)
    return table


def processes_of_uid(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (zombies included)."""
    return [pid for pid, (owner, _) in _process_table().items() if owner == uid]


def sandbox_processes() -> list[int]:
    """Pids running under any sandbox uid: after every run has ended this should be empty."""
    return [pid for pid, (owner, _) in _process_table().items() if UID_BASE <= owner < UID_BASE + UID_COUNT]


def busiest_sandbox_uid() -> int:
    """The process count of the sandbox uid with the most processes (one run's share, whatever else runs)."""
    counts = Counter(owner for owner, _ in _process_table().values() if UID_BASE <= owner < UID_BASE + UID_COUNT)
    return max(counts.values(), default=0)


def stray_processes() -> list[int]:
    """Pids under sandbox uids that no run holds right now (another host process's live runs do not count):
    what a finished run would have leaked."""
    if not _is_root():
        return sandbox_processes()
    strays = []
    for pid, (owner, _) in _process_table().items():
        if not UID_BASE <= owner < UID_BASE + UID_COUNT:
            continue
        with open(os.path.join(_lock_dir(), f"{owner}.lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free to take: no run owns this uid
            except BlockingIOError:
                continue
            strays.append(pid)  # closing the file drops the lock again
    return strays


def _threads_of_uid(uid: int) -> int:
    return sum(threads for owner, threads in _process_table().values() if owner == uid)


class _UidLease:
    """A sandbox uid used by one run (or session) at a time, across threads and host processes.

    Each uid has a lock file held with flock while it is in use. A uid that still has processes (left by a
    host that was killed mid-run, or zombies nobody reaped) is skipped: they would count against its
    RLIMIT_NPROC."""

    def __init__(self, wait_s: float = 30.0):
        self.uid: int | None = None
        self._lock_file = None
        if not _is_root():
            return  # cannot switch uid; runs use the host's uid
        lock_dir = _lock_dir()
        deadline = time.monotonic() + wait_s
        while self.uid is None:
            busy = {owner for owner, _ in _process_table().values()}
            start = random.randrange(UID_COUNT)  # spread concurrent callers over the range
            for i in range(UID_COUNT):
                uid = UID_BASE + (start + i) % UID_COUNT
                if uid in busy or not _uid_unassigned(uid):
                    continue
                f = open(os.path.join(lock_dir, f"{uid}.lock"), "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                self.uid, self._lock_file = uid, f
                break
            else:
                if time.monotonic() > deadline:
                    raise SandboxError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")
                time.sleep(0.05)

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # drops the flock
            self._lock_file = None


@functools.lru_cache(maxsize=None)
def _lock_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"minicoder-sandbox-uids-{os.geteuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxError(f"{path} is not a private directory of this user; remove it")
    return path


@functools.lru_cache(maxsize=None)
def _uid_unassigned(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return False
        except KeyError:
            pass
    return True


def _rmtree(path: str) -> None:
    """Delete a tree even if the program removed permissions on parts of it (matters when not root)."""

    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    # `onerror` is deprecated from Python 3.12 on in favour of `onexc` (same call, minus exc_info).
    shutil.rmtree(path, **({"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}))


def _remove_strays(uid: int) -> None:
    """Remove what the run's uid left at the top of the world-writable temp directories."""
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _make_workdir(uid: int | None, files: dict[str, str | bytes] | None) -> str:
    files = files or {}
    for name in files:
        norm = os.path.normpath(name)
        if norm == _MAIN_FILE:
            raise ValueError(f"files: {_MAIN_FILE!r} is reserved for the program itself")
        if os.path.isabs(norm) or norm == "." or norm == ".." or norm.startswith(".." + os.sep):
            raise ValueError(f"files: {name!r} must be a relative path inside the working directory")
    workdir = tempfile.mkdtemp(prefix="minicoder-sandbox-")
    for name, content in files.items():
        path = os.path.join(workdir, os.path.normpath(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    if uid is not None:  # the program owns its directory, so it can write there and nowhere else
        for root, dirs, names in os.walk(workdir):
            for name in [*dirs, *names]:
                os.chown(os.path.join(root, name), uid, uid)
        os.chown(workdir, uid, uid)
    return workdir


def _environment(workdir: str, python_path: list[str]) -> dict[str, str]:
    env = {
        "PATH": _MIN_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",  # for Pythons the program starts itself (ours has -I -B)
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        # One thread per numerical library: threads count against max_processes and memory.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


def _rlimits(limits: Limits, uid: int | None, session: bool) -> list[list[int]]:
    mb = 1024 * 1024
    # A session's CPU limit is set per call by the worker itself; the wall-clock timeout backs it up.
    cpu = [resource.RLIM_INFINITY] * 2 if session else [limits.cpu_s, limits.cpu_s + 1]
    nproc = limits.max_processes
    if uid is None:  # RLIMIT_NPROC counts every process and thread of the uid, and here that is ours
        nproc += _threads_of_uid(os.getuid())
    return [
        [resource.RLIMIT_CPU, *cpu],  # soft: SIGXCPU; hard: SIGKILL
        [resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb],
        [resource.RLIMIT_FSIZE, limits.file_size_mb * mb, limits.file_size_mb * mb],
        [resource.RLIMIT_NPROC, nproc, nproc],
        [resource.RLIMIT_CORE, 0, 0],
    ]


def _host_version() -> str:
    return "%d.%d" % sys.version_info[:2]


@functools.lru_cache(maxsize=None)
def sandbox_python() -> str:
    """The interpreter programs run on: one the sandbox uid can execute, of the host's Python version."""
    override = os.environ.get("MINICODER_SANDBOX_PYTHON")
    if override:
        return override
    if not _is_root():
        return sys.executable  # same uid as the host: whatever runs us runs the program
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable)]
    candidates += [shutil.which(f"python{_host_version()}", path=_MIN_PATH) or ""]
    candidates += [shutil.which("python3", path=_MIN_PATH) or ""]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            probe = _Process(
                "import sys; print('%d.%d' % sys.version_info[:2])",
                limits=Limits(timeout_s=10),
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


# --------------------------------------------------------------------------------------------------
# One launch: the launcher, the program under it, and the host's end of the pipes.


class _Process:
    """Starts the launcher and collects stdout/stderr/status incrementally until the run ends."""

    def __init__(
        self,
        code: str | None,
        *,
        limits: Limits,
        stdin: str = "",
        files: dict[str, str | bytes] | None = None,
        allow_site_packages: bool = True,
        python_path: list[str] | tuple[str, ...] = (),
        interpreter: str | None = None,
        worker: bool = False,
    ):
        self.limits = limits
        self.lease = _UidLease()
        self.uid = self.lease.uid
        self.workdir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.network = "none"  # what the launcher reports
        self.error: str | None = None  # the launcher could not start the program
        self.exit_event: dict | None = None
        self.selector = selectors.DefaultSelector()
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
        self.reply = bytearray()  # session replies, length-prefixed JSON
        self.req_w: int | None = None  # session requests go here
        self.output_bytes = 0  # counted since the last take_output (per call in a session)
        self.truncated = False
        try:
            self._start(code, stdin, files, allow_site_packages, list(python_path), interpreter, worker)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, code, stdin, files, allow_site_packages, python_path, interpreter, worker):
        self.workdir = _make_workdir(self.uid, files)
        main_path = os.path.join(self.workdir, _MAIN_FILE)
        if code is not None:
            with open(main_path, "w", encoding="utf-8") as f:
                f.write(code)
            if self.uid is not None:
                os.chown(main_path, self.uid, self.uid)

        # Our ends are registered (or kept) right away, so cleanup closes them whatever fails later.
        status_r, status_w = os.pipe()
        self._watch(status_r, "status")
        child_fds: list[int] = []
        if worker:
            req_r, self.req_w = os.pipe()
            os.set_blocking(self.req_w, False)  # a worker that stops reading must not block the host
            resp_r, resp_w = os.pipe()
            self._watch(resp_r, "reply")
            child_fds = [req_r, resp_w]
        boot = {
            "site_dirs": site.getsitepackages() if allow_site_packages else [],
            "paths": python_path,
            "cwd": self.workdir,
            "main": main_path,
            "worker": child_fds or None,
            "cpu_s": self.limits.cpu_s,
        }
        python = interpreter or sandbox_python()
        config = {
            "status_fd": status_w,
            "uid": self.uid,
            "die_with_parent": not worker,  # a session may outlive the thread that started it
            "isolate_network": not self.limits.network,
            "no_netns": os.environ.get("MINICODER_SANDBOX_NO_NETNS") == "1",  # to test the fallback
            "rlimits": _rlimits(self.limits, self.uid, session=worker),
            "cwd": self.workdir,
            # -I isolated, -S site added by _BOOT, -B no .pyc, -u unbuffered (output before a kill is kept)
            "argv": [python, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOT_COMMAND, _BOOT, json.dumps(boot)],
            "env": _environment(self.workdir, python_path),
            "child_fds": child_fds,
        }
        stdin_file = tempfile.TemporaryFile()  # a file, not a pipe: no deadlock on large input
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)],
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=[status_w, *child_fds],
                env={},
                cwd="/",
                start_new_session=True,  # its own process group and session, away from our terminal
            )
        finally:
            stdin_file.close()
            for fd in [status_w, *child_fds]:  # the launcher has its copies
                os.close(fd)
        self._watch(self.proc.stdout.fileno(), "stdout")
        self._watch(self.proc.stderr.fileno(), "stderr")

    # -- reading ------------------------------------------------------------------------------------

    def _watch(self, fd: int, name: str) -> None:
        os.set_blocking(fd, False)
        self.selector.register(fd, selectors.EVENT_READ, name)

    def _unwatch(self, fd: int, name: str) -> None:
        self.selector.unregister(fd)
        if name in ("status", "reply"):  # stdout/stderr belong to the Popen object
            os.close(fd)

    def _read(self, fd: int, name: str) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                self._unwatch(fd, name)
                return
            if name in ("stdout", "stderr"):
                room = self.limits.max_output_bytes - self.output_bytes
                if len(data) > room:
                    data, self.truncated = data[: max(room, 0)], True
                self.output_bytes += len(data)
                self.buffers[name] += data
            elif name == "reply":
                self.reply += data
            else:
                self.buffers[name] += data
                self._parse_status()

    def _parse_status(self) -> None:
        """Handle the launcher's complete JSON lines (it stays alive, and the pipe open, in a session)."""
        buffer = self.buffers["status"]
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "start":
                self.network = event["network"]
            elif event.get("event") == "error":
                self.error = event["error"]
            elif event.get("event") == "exit":
                self.exit_event = event

    def _reply_ready(self) -> bool:
        return len(self.reply) >= 4 and len(self.reply) >= 4 + struct.unpack(">I", self.reply[:4])[0]

    @property
    def exited(self) -> bool:
        """Every pipe is at EOF: the launcher and all processes of the run are gone."""
        return not any(key.data != "reply" for key in self.selector.get_map().values())

    def pump(self, deadline: float, until_reply: bool = False, stop_on_overflow: bool = True) -> str:
        """Read until the run ends ("exited"), a reply arrives, the deadline passes or output overflows."""
        while True:
            if until_reply and self._reply_ready():
                for key in list(self.selector.get_map().values()):
                    if key.data in ("stdout", "stderr"):
                        self._read(key.fd, key.data)  # output written before the reply is in the pipe
                return "reply"
            if self.truncated and stop_on_overflow:
                return "output_limit"
            if self.exited:
                return "exited"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in self.selector.select(min(remaining, 0.1)):
                self._read(key.fd, key.data)

    def take_reply(self) -> dict:
        size = struct.unpack(">I", self.reply[:4])[0]
        message = json.loads(self.reply[4 : 4 + size])
        del self.reply[: 4 + size]
        return message

    def take_output(self) -> tuple[str, str]:
        out, err = (bytes(self.buffers[name]).decode("utf-8", errors="replace") for name in ("stdout", "stderr"))
        self.buffers["stdout"].clear()
        self.buffers["stderr"].clear()
        self.output_bytes, self.truncated = 0, False
        return out, err

    # -- ending -------------------------------------------------------------------------------------

    def terminate(self) -> None:
        """Kill the whole run: the launcher does it (it can, as the run's uid), we check it happened."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.pump(time.monotonic() + _TERMINATE_GRACE_S, stop_on_overflow=False)
        if not self.exited:  # launcher stuck or gone: kill what we can find ourselves
            self._force_kill()

    def _force_kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.uid is not None:
            for _ in range(100):
                pids = processes_of_uid(self.uid)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.01)
        self._unwatch_all()

    def _unwatch_all(self) -> None:
        for key in list(self.selector.get_map().values()):
            self._unwatch(key.fd, key.data)

    def cleanup(self) -> None:
        """End the run if needed, release every resource; safe to call twice."""
        if self.selector.get_map() is None:
            return  # already cleaned up (a closed selector has no map)
        if self.proc is not None:
            if not self.exited:
                self.terminate()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.proc = None
        self._unwatch_all()
        self.selector.close()
        if self.req_w is not None:
            os.close(self.req_w)
            self.req_w = None
        if self.workdir is not None:
            _rmtree(self.workdir)
            self.workdir = None
        if self.uid is not None:
            _remove_strays(self.uid)
        self.lease.release()

    # -- the whole run, for run_python --------------------------------------------------------------

    def run(self) -> SandboxResult:
        try:
            why = self.pump(self.started + self.limits.timeout_s)
            if why != "exited":
                self.terminate()
            return self._result(why)
        finally:
            self.cleanup()

    def _result(self, why: str) -> SandboxResult:
        if self.error is not None:
            raise SandboxError(f"could not start the sandboxed program: {self.error}")
        stdout, stderr = self.take_output()
        truncated = why == "output_limit" or self.truncated
        event = self.exit_event or {}
        returncode = None
        if event.get("wait_status") is not None:
            returncode = os.waitstatus_to_exitcode(event["wait_status"])
        if why in ("timeout", "output_limit"):
            status = why
        else:
            status = _classify(returncode, stderr, self.limits, event.get("cpu_s", 0.0), event.get("maxrss_kb", 0))
        return SandboxResult(
            status=status,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=time.monotonic() - self.started,
            truncated=truncated,
            network_isolation=self.network,
        )


# The last line of a traceback (numpy's is `numpy...._ArrayMemoryError: ...`), ENOMEM, a C++ allocation failure.
_MEMORY_MESSAGE = re.compile(r"^[\w.]*MemoryError\b|Cannot allocate memory|std::bad_alloc", re.M)


def _classify(returncode: int | None, stderr: str, limits: Limits, cpu_s: float, maxrss_kb: int) -> str:
    if returncode == 0:
        return "ok"
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


# --------------------------------------------------------------------------------------------------
# Public API.


def run_python(
    code: str,
    *,
    stdin: str = "",
    limits: Limits = Limits(),
    files: dict[str, str | bytes] | None = None,
    allow_site_packages: bool = True,
    python_path: list[str] | tuple[str, ...] = (),
) -> SandboxResult:
    """Run `code` as a script (`__name__ == "__main__"`) in a fresh sandbox and return what happened.

    `files` are written into the working directory first (relative paths; `main.py` is the program);
    `python_path` adds directories to sys.path and PYTHONPATH (they must be readable by the sandbox uid).
    Raises SandboxError only when the sandbox itself cannot start; the program's failures are results."""
    return _Process(
        code,
        limits=limits,
        stdin=stdin,
        files=files,
        allow_site_packages=allow_site_packages,
        python_path=python_path,
    ).run()


def run_many(
    programs: list[str],
    limits: Limits = Limits(),
    workers: int | None = None,
    *,
    allow_site_packages: bool = True,
) -> list[SandboxResult]:
    """Run several programs in parallel, each in its own sandbox; results in the order of `programs`."""
    workers = workers or os.cpu_count() or 1

    def one(code: str) -> SandboxResult:
        return run_python(code, limits=limits, allow_site_packages=allow_site_packages)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))


_open_sessions: "weakref.WeakSet[PersistentSession]" = weakref.WeakSet()


@atexit.register
def _close_open_sessions() -> None:
    for session in list(_open_sessions):
        session.close()


class PersistentSession:
    """One long-lived sandboxed Python worker process; `run(code)` executes in the same globals and returns
    a SandboxResult with what that call printed; `close()`; context manager.

    Each call gets `limits.timeout_s` of wall time and `limits.cpu_s` of CPU time (an exceeded CPU limit
    ends the call with status "cpu" and keeps the state). A timeout, the output cap, or the worker dying
    kills the worker and every process it started; the result then has `state_lost=True`, and the next
    call starts a fresh worker in a fresh working directory (with `files` again) after running `setup`
    again, so tool definitions come back."""

    def __init__(
        self,
        *,
        limits: Limits = Limits(),
        setup: str = "",
        files: dict[str, str | bytes] | None = None,
        allow_site_packages: bool = True,
        python_path: list[str] | tuple[str, ...] = (),
    ):
        self.limits = limits
        self.setup = setup
        self._files = files
        self._allow_site_packages = allow_site_packages
        self._python_path = list(python_path)
        self._process: _Process | None = None
        self._network = "none"
        self._lock = threading.Lock()
        self._closed = False
        _open_sessions.add(self)
        self._start()

    @property
    def network_isolation(self) -> str:
        return self._network

    def _start(self) -> None:
        self._process = _Process(
            None,
            limits=self.limits,
            files=self._files,
            allow_site_packages=self._allow_site_packages,
            python_path=self._python_path,
            worker=True,
        )
        if self.setup:
            result = self._call(self.setup, "")
            if result.status != "ok":
                self._stop()
                raise SandboxError(f"session setup code failed ({result.status}):\n{result.stderr[-2000:]}")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.cleanup()
            self._process = None

    def run(self, code: str, *, stdin: str = "") -> SandboxResult:
        with self._lock:
            if self._closed:
                raise SandboxError("the session is closed")
            if self._process is None:
                self._start()
            return self._call(code, stdin)

    def _call(self, code: str, stdin: str) -> SandboxResult:
        process = self._process
        started = time.monotonic()
        deadline = started + self.limits.timeout_s
        request = json.dumps({"code": code, "stdin": stdin}).encode()
        if _send(process, struct.pack(">I", len(request)) + request, deadline):
            why = process.pump(deadline, until_reply=True)
        else:
            why = process.pump(deadline)  # worker gone or not reading: see how it ends
        self._network = process.network
        if why == "reply":
            reply = process.take_reply()
            truncated = process.truncated
            stdout, stderr = process.take_output()
            return SandboxResult(
                status=reply["status"],
                returncode=reply["returncode"],
                stdout=stdout,
                stderr=stderr,
                duration_s=time.monotonic() - started,
                truncated=truncated,
                network_isolation=process.network,
            )
        # Timeout, output cap, or the worker died: end it all; the next call starts over.
        try:
            if why != "exited":
                process.terminate()
            result = process._result(why)
        finally:
            self._stop()
        result.duration_s = time.monotonic() - started
        result.state_lost = True
        result.stderr += "\n[sandbox] the session worker was stopped; its state is lost\n"
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop()
        _open_sessions.discard(self)

    def __enter__(self) -> "PersistentSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _send(process: _Process, data: bytes, deadline: float) -> bool:
    """Write a request to the worker, reading its output meanwhile; False if it cannot be delivered."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(process.req_w, view) :]
        except BlockingIOError:
            if time.monotonic() >= deadline or process.truncated or process.exited:
                return False
            process.pump(min(deadline, time.monotonic() + 0.05))
        except BrokenPipeError:
            return False
    return True


def isolation_info() -> dict[str, object]:
    """Which containment layers are active on this machine (runs one tiny program to find out)."""
    result = run_python("print('ok')", limits=Limits(timeout_s=10), allow_site_packages=False)
    root = _is_root()
    return {
        "python": sandbox_python(),
        "uid_drop": root,
        "uid_range": f"{UID_BASE}-{UID_BASE + UID_COUNT - 1}" if root else None,
        "network_isolation": result.network_isolation,
        "process_cleanup": "kill(-1) as the run's uid + subreaper" if root else "process group + subreaper",
        "rlimit_nproc_enforced": root,
        "works": result.ok,
    }
