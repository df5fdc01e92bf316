"""What a run may leave on the host, and how it is removed.

With a mount and IPC namespace (the normal case) a run writes only into its own tmpfs and namespace, which the
kernel frees with its last process, so there is nothing to clean. These sweeps are the fallback where the kernel
refuses namespaces: the run's uid may then write into every world-writable directory of the host (/tmp, /var/tmp,
/dev/shm, /run/lock, ...) and create SysV IPC objects, and a later run (or user) could read them. Its uid is
unique to the run, so everything it owns is its leftovers.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import stat
import sys
import tempfile
import threading

WORKDIR_PREFIX = "minicoder-sandbox-"  # fallback work dirs: minicoder-sandbox-<host pid>-<random>
_SKIP = ("/proc", "/sys")  # kernel views, nothing a uid can create files in
_MAX_DIRS_SCANNED = 200_000


def rmtree(path: str) -> None:
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


_scan_lock = threading.Lock()


def prefetch_world_writable_dirs() -> None:
    """Start the one-time scan in the background, so that it overlaps the first run instead of following it."""
    if _scan.cache_info().currsize == 0:
        threading.Thread(target=world_writable_dirs, daemon=True, name="minicoder-sandbox-scan").start()


def world_writable_dirs() -> tuple[str, ...]:
    """Every directory an unprivileged uid could create files in, found once per host process.

    Walks from / through directories others may enter (o+x), the only way another uid can reach anything, and
    keeps those others may write (o+w). Sticky or not: a run's uid owns what it created there either way."""
    with _scan_lock:  # one scan, however many runs end at once
        return _scan()


@functools.lru_cache(maxsize=None)
def _scan() -> tuple[str, ...]:
    found, stack, scanned = [], ["/"], 0
    while stack and scanned < _MAX_DIRS_SCANNED:
        path = stack.pop()
        scanned += 1
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or entry.path in _SKIP or not st.st_mode & stat.S_IXOTH:
                continue
            if st.st_mode & stat.S_IWOTH:
                found.append(entry.path)
            stack.append(entry.path)
    return tuple(sorted(found))


def remove_files_of_uid(uid: int) -> None:
    """Remove what the run's uid left in world-writable directories (the fallback has no private /tmp)."""
    for directory in world_writable_dirs():
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


_IPC_RMID = 0
_IPC_TABLES = (("shm", "shmid"), ("msg", "msqid"), ("sem", "semid"))  # /proc/sysvipc/<table>, its id column


def remove_ipc_of_uid(uid: int) -> None:
    """Remove SysV shared memory, message queues and semaphores the run's uid created (no IPC namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for table, id_name in _IPC_TABLES:
        try:
            with open(f"/proc/sysvipc/{table}") as f:
                header, *rows = [line.split() for line in f]
        except OSError:
            continue
        id_col, uid_col = header.index(id_name), header.index("uid")
        for row in rows:
            if int(row[uid_col]) != uid:
                continue
            if table == "sem":
                libc.semctl(int(row[id_col]), 0, _IPC_RMID)
            else:
                getattr(libc, f"{table}ctl")(int(row[id_col]), _IPC_RMID, None)


def make_fallback_workdir() -> str:
    return tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")


def remove_stale_workdirs() -> None:
    """Remove fallback work dirs whose host process is gone (it was killed before it could)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        parts = name[len(WORKDIR_PREFIX):].split("-", 1)
        if not name.startswith(WORKDIR_PREFIX) or len(parts) != 2 or not parts[0].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[0]}"):
            rmtree(os.path.join(tmp, name))
