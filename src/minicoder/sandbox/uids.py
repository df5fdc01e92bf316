"""Sandbox uids and the process table: which uid a run gets, and which processes belong to runs.

When the host runs as root, each run (or session) leases a uid of its own from `UID_BASE .. UID_BASE+UID_COUNT`
(numbers with no passwd or group entry), held with an flock on a per-uid lock file, across threads and host
processes. A uid that still has processes (left by a host killed mid-run) is skipped."""

from __future__ import annotations

import fcntl
import functools
import grp
import os
import pwd
import random
import stat
import tempfile
import time
from collections import Counter

from .limits import SandboxError

# Between systemd-homed (60001-60513) and DynamicUser (61184+); regular users end at 60000.
UID_BASE = 61000
UID_COUNT = 128


def is_root() -> bool:
    return os.geteuid() == 0


def is_sandbox_uid(uid: int) -> bool:
    return UID_BASE <= uid < UID_BASE + UID_COUNT


def process_table() -> dict[int, tuple[int, int]]:
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
    return [pid for pid, (owner, _) in process_table().items() if owner == uid]


def sandbox_processes() -> list[int]:
    """Pids running under any sandbox uid: after every run has ended this should be empty."""
    return [pid for pid, (owner, _) in process_table().items() if is_sandbox_uid(owner)]


def busiest_sandbox_uid() -> int:
    """The process count of the sandbox uid with the most processes (one run's share, whatever else runs)."""
    counts = Counter(owner for owner, _ in process_table().values() if is_sandbox_uid(owner))
    return max(counts.values(), default=0)


def lease_is_free(uid: int) -> bool:
    """No run holds `uid` right now (probes the lock without keeping it)."""
    with open(os.path.join(lock_dir(), f"{uid}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # closing the file drops the lock again


def threads_of_uid(uid: int) -> int:
    return sum(threads for owner, threads in process_table().values() if owner == uid)


class UidLease:
    """A sandbox uid used by one run (or session) at a time; `uid` is None when the host is not root."""

    def __init__(self, wait_s: float = 30.0):
        self.uid: int | None = None
        self._lock_file = None
        if not is_root():
            return  # cannot switch uid; runs use the host's uid
        deadline = time.monotonic() + wait_s
        while self.uid is None:
            busy = {owner for owner, _ in process_table().values()}
            start = random.randrange(UID_COUNT)  # spread concurrent callers over the range
            for i in range(UID_COUNT):
                uid = UID_BASE + (start + i) % UID_COUNT
                if uid in busy or not _uid_unassigned(uid):
                    continue
                f = open(os.path.join(lock_dir(), f"{uid}.lock"), "a")
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
def lock_dir() -> str:
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
