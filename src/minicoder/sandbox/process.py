"""One launch, seen from the host: start the launcher for a run, collect its output, end it, clean up.

`Process` owns every resource of one run or session worker: the uid lease, the cgroups, the pipes (stdout, stderr,
the launcher's status pipe, the lifeline, a session's request/reply pipes, a harness's report pipe), and, in the
fallback without a mount namespace, the host work directory. `cleanup()` releases all of it, whatever happened.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import selectors
import signal
import site
import struct
import subprocess
import sys
import tempfile
import time

from . import cgroups, hostclean
from .limits import Limits, SandboxError, SandboxResult, classify, rlimits
from .interpreter import MIN_PATH, hidden_site_dirs, install_paths, sandbox_python
from .uids import UidLease, processes_of_uid, threads_of_uid

MAIN_FILE = "main.py"  # the program's file in the working directory
REPORT_FD_VARIABLE = "MINICODER_REPORT_FD"  # names the report pipe's fd in the program's environment
_HERE = os.path.dirname(os.path.abspath(__file__))
_LAUNCHER = os.path.join(_HERE, "launcher.py")
_BOOT_COMMAND = "exec(compile(__import__('sys').argv[1], '<minicoder-sandbox>', 'exec'))"
_TERMINATE_GRACE_S = 3.0  # how long the launcher gets to clean up before the host kills it outright
_MAX_REPORT_BYTES = 1 << 16
_SETUP_TIMEOUT_S = 30.0  # building the run's namespaces and root, before Limits.timeout_s starts counting


@functools.lru_cache(maxsize=None)
def _boot_source() -> str:
    with open(os.path.join(_HERE, "boot.py"), encoding="utf-8") as f:
        return f.read()


def use_namespaces() -> bool:
    """Whether runs get mount/PID/IPC namespaces here (probed once: the kernel or a container may refuse)."""
    return _namespaces_work(os.environ.get("MINICODER_SANDBOX_NO_NAMESPACES") == "1")


@functools.lru_cache(maxsize=None)
def _namespaces_work(disabled: bool) -> bool:
    if disabled:
        return False
    try:
        probe = Process(None, limits=Limits(timeout_s=10), interpreter=sys.executable, probe=True)
        probe.pump(time.monotonic() + 10)
        namespaces = probe.namespaces
        probe.cleanup()
    except SandboxError:
        return False
    return "mount" in namespaces and "pid" in namespaces


def check_files(files: dict[str, str | bytes]) -> None:
    for name in files:
        norm = os.path.normpath(name)
        if norm == MAIN_FILE:
            raise ValueError(f"files: {MAIN_FILE!r} is reserved for the program itself")
        if os.path.isabs(norm) or norm == "." or norm == ".." or norm.startswith(".." + os.sep):
            raise ValueError(f"files: {name!r} must be a relative path inside the working directory")


def _environment(python_path: list[str]) -> dict[str, str]:
    env = {
        "PATH": MIN_PATH,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",  # for Pythons the program starts itself (ours has -I -B)
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        # One thread per numerical library: threads count against max_processes and memory.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }  # HOME and TMPDIR are set by the launcher, which knows the run's directory
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


class Process:
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
        report_pipe: bool = False,
        probe: bool = False,
    ):
        self.limits = limits
        self.lease = UidLease()
        self.uid = self.lease.uid
        self.group: cgroups.RunGroup | None = None
        self.host_workdir: str | None = None  # fallback only
        self.proc: subprocess.Popen | None = None
        self.network = "none"  # what the launcher reports
        self.namespaces: list[str] = []
        self.error: str | None = None  # the launcher could not start the program
        self.exit_event: dict | None = None
        self.selector = selectors.DefaultSelector()
        self.buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
        self.reply = bytearray()  # session replies, length-prefixed JSON
        self.report: bytearray | None = bytearray() if report_pipe else None
        self.req_w: int | None = None  # session requests go here
        self.lifeline_w: int | None = None  # never written; its EOF tells the launcher the host is gone
        self.output_bytes = 0  # counted since the last take_output (per call in a session)
        self.truncated = False
        self.sweep_host = not probe  # a probe never runs anything as the uid
        self.started = time.monotonic()
        self.program_started: float | None = None  # when init reported the run's setup done
        try:
            self._start(code, stdin, dict(files or {}), allow_site_packages, list(python_path), interpreter,
                        worker, probe)
        except BaseException:
            self.cleanup()
            raise

    @property
    def launcher_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _start(self, code, stdin, files, allow_site_packages, python_path, interpreter, worker, probe):
        check_files(files)
        if code is not None:
            files[MAIN_FILE] = code
        namespaces = not probe and use_namespaces()
        if not probe:
            self.group = cgroups.RunGroup(self.limits.memory_mb, self.limits.max_processes)
        if not namespaces and not probe:
            hostclean.remove_stale_workdirs()
            if self.uid is not None:
                hostclean.prefetch_world_writable_dirs()
            self.host_workdir = hostclean.make_fallback_workdir()

        # Our ends are registered (or kept) right away, so cleanup closes them whatever fails later.
        status_r, status_w = os.pipe()
        self._watch(status_r, "status")
        lifeline_r, self.lifeline_w = os.pipe()
        child_fds: list[int] = []
        env = _environment(python_path)
        if worker:
            req_r, self.req_w = os.pipe()
            os.set_blocking(self.req_w, False)  # a worker that stops reading must not block the host
            resp_r, resp_w = os.pipe()
            self._watch(resp_r, "reply")
            child_fds += [req_r, resp_w]
        if self.report is not None:
            report_r, report_w = os.pipe()
            self._watch(report_r, "report")
            child_fds.append(report_w)
            env[REPORT_FD_VARIABLE] = str(report_w)
        site_dirs = site.getsitepackages() if allow_site_packages else []
        python = interpreter or sandbox_python()
        # RLIMIT_NPROC counts every process and thread of the uid; without a uid of its own, that includes ours.
        nproc_extra = threads_of_uid(os.getuid()) if self.uid is None else 0
        binds = sorted(set(install_paths(python) + site_dirs + python_path))
        boot = {"site_dirs": site_dirs, "paths": python_path, "worker": child_fds[:2] if worker else None,
                "cpu_s": self.limits.cpu_s}
        config = {
            "status_fd": status_w,
            "lifeline_fd": lifeline_r,
            "child_fds": child_fds,
            "uid": self.uid,
            "probe": probe,
            "namespaces": namespaces or probe,
            "isolate_network": not self.limits.network,
            "no_netns": os.environ.get("MINICODER_SANDBOX_NO_NETNS") == "1",  # to test the fallback
            "cgroup_procs": self.group.procs_files if self.group else [],
            "binds": binds,
            "hide": hidden_site_dirs(binds, site_dirs),
            "disk_mb": self.limits.disk_mb,
            "workdir": self.host_workdir,
            "files": {os.path.normpath(name): base64.b64encode(data.encode() if isinstance(data, str) else data)
                      .decode() for name, data in files.items()},
            "rlimits": rlimits(self.limits, nproc_extra, session=worker),
            # -I isolated, -S site added by boot, -B no .pyc, -u unbuffered (output before a kill is kept)
            "argv": [python, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOT_COMMAND, _boot_source(),
                     json.dumps(boot)],
            "env": env,
        }
        with tempfile.TemporaryFile() as config_file, tempfile.TemporaryFile() as stdin_file:
            # Files, not pipes: no deadlock on large input, and (unlinked) nothing left if we are killed.
            config_file.write(json.dumps(config).encode())
            config_file.seek(0)
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
            self.started = time.monotonic()
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", _LAUNCHER, str(config_file.fileno())],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=[config_file.fileno(), status_w, lifeline_r, *child_fds],
                    env={},
                    cwd="/",
                    start_new_session=True,  # its own process group and session, away from our terminal
                )
            finally:
                for fd in [status_w, lifeline_r, *child_fds]:  # the launcher has its copies
                    os.close(fd)
        self._watch(self.proc.stdout.fileno(), "stdout")
        self._watch(self.proc.stderr.fileno(), "stderr")

    # -- reading ------------------------------------------------------------------------------------

    def _watch(self, fd: int, name: str) -> None:
        os.set_blocking(fd, False)
        self.selector.register(fd, selectors.EVENT_READ, name)

    def _unwatch(self, fd: int, name: str) -> None:
        self.selector.unregister(fd)
        if name not in ("stdout", "stderr"):  # those belong to the Popen object
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
            elif name == "report":
                self.report += data[: max(_MAX_REPORT_BYTES - len(self.report), 0)]
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
                self.network, self.namespaces = event["network"], event["namespaces"]
                self.program_started = time.monotonic()
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

    def pump(self, deadline: float, until_reply: bool = False, stop_on_overflow: bool = True,
             until_started: bool = False) -> str:
        """Read until the run ends ("exited"), a reply arrives, the program starts, the deadline passes or output
        overflows."""
        while True:
            if until_started and self.program_started is not None:
                return "started"
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
        """Kill the whole run: the launcher has init do it, we check it happened."""
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
        for name in ("req_w", "lifeline_w"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)
        if self.host_workdir is not None:
            hostclean.rmtree(self.host_workdir)
            self.host_workdir = None
        if self.uid is not None and self.sweep_host and "mount" not in self.namespaces:  # else they die with it
            hostclean.remove_files_of_uid(self.uid)
            hostclean.remove_ipc_of_uid(self.uid)
        if self.group is not None:
            self.group.remove()
        self.lease.release()

    # -- the whole run, for run_python --------------------------------------------------------------

    def run(self) -> SandboxResult:
        try:
            why = self.pump(self.started + _SETUP_TIMEOUT_S, until_started=True)
            if why == "started":  # the program's time counts from here, not from our start-up work
                why = self.pump(self.program_started + self.limits.timeout_s)
            if why != "exited":
                self.terminate()
            return self.result(why)
        finally:
            self.cleanup()

    def result(self, why: str) -> SandboxResult:
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
            oom = self.group.oom_kills() if self.group is not None else 0
            status = classify(returncode, stderr, self.limits, event.get("cpu_s", 0.0), event.get("maxrss_kb", 0),
                               oom)
        return SandboxResult(
            status=status,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=time.monotonic() - self.started,
            truncated=truncated,
            network_isolation=self.network,
            report=bytes(self.report) if self.report is not None else None,
        )
