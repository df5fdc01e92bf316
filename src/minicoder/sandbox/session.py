"""PersistentSession: one long-lived sandboxed worker whose globals persist across calls (the CodeAct agent's
interpreter). The worker is a Process in worker mode; requests and replies travel on two private pipes."""

from __future__ import annotations

import atexit
import json
import os
import struct
import threading
import time
import weakref

from .limits import Limits, SandboxError, SandboxResult
from .process import Process as _Process

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
            result = process.result(why)
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


