"""Per-run cgroups: one memory and process budget for everything a run starts.

RLIMIT_AS and RLIMIT_NPROC are per process (and per uid); a run that forks three children, or keeps its memory in
a memfd, gets around them. A cgroup counts every page (anonymous, tmpfs, memfd) and every task of the run together.
Each run gets a group of its own under the host process's own group (so the host's limits still apply on top):
cgroup v2 when the host's group can delegate `memory` and `pids`, else the v1 `memory` and `pids` hierarchies
(this is what many VMs and older Docker hosts offer). Where neither is writable (not root, a read-only
/sys/fs/cgroup) runs fall back to rlimits alone, with one warning, and `isolation_info()` says so.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import time
import warnings

_GROUP_DIR = "minicoder-sandbox"  # below the host's own group; one child per run: run-<host pid>-<n>
_counter = itertools.count()


def _own_paths() -> dict[str, str]:
    """Controller ("" for v2) -> this process's group path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _mounts() -> dict[str, str]:
    """Controller ("" for v2) -> mount point, from /proc/self/mountinfo."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("", fields[4])
            elif fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options:
                        mounts.setdefault(controller, fields[4])
    return mounts


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


@functools.lru_cache(maxsize=None)
def layout() -> tuple[str, dict[str, str]] | tuple[None, str]:
    """("v2" | "v1", {controller: parent dir for run groups}), or (None, why not)."""
    try:
        own, mounts = _own_paths(), _mounts()
    except OSError as exc:
        return None, f"cannot read /proc/self/cgroup ({exc})"
    if "" in mounts and "" in own:
        base = os.path.join(mounts[""], own[""].lstrip("/"))
        parent = os.path.join(base, _GROUP_DIR)
        try:
            with open(os.path.join(mounts[""], own[""].lstrip("/"), "cgroup.controllers")) as f:
                offered = f.read().split()
            if {"memory", "pids"} <= set(offered) and _writable_dir(base):
                _make_parent("v2", parent)
                return "v2", {"": parent}
        except OSError:
            pass  # the usual reason: our group holds processes, so it cannot delegate ("no internal processes")
    parents = {}
    for controller in ("memory", "pids"):
        if controller in mounts and controller in own:
            base = os.path.join(mounts[controller], own[controller].lstrip("/"))
            if _writable_dir(base):
                parents[controller] = os.path.join(base, _GROUP_DIR)
    if set(parents) == {"memory", "pids"}:
        try:
            for parent in parents.values():
                _make_parent("v1", parent)
        except OSError as exc:
            return None, f"cannot create {parent} ({exc})"
        return "v1", parents
    return None, "no writable cgroup with the memory and pids controllers"


def _make_parent(version: str, parent: str) -> None:
    os.makedirs(parent, exist_ok=True)
    if version == "v2":  # children get the controllers only if the parent hands them down
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write("+memory +pids")


def describe() -> str:
    """What runs are limited by, for isolation_info()."""
    version, detail = layout()
    return f"cgroup {version} (memory, pids)" if version else f"rlimits only: {detail}"


@functools.lru_cache(maxsize=None)
def warn_if_unavailable() -> None:
    version, detail = layout()
    if version is None:
        warnings.warn(
            f"sandbox: {detail}; memory and process limits are per process (rlimits), not per run", stacklevel=3
        )


class RunGroup:
    """The cgroup(s) of one run: created with its limits, joined by the launcher, removed after the run."""

    def __init__(self, memory_mb: int, max_processes: int):
        self.dirs: list[str] = []
        version, parents = layout()
        if version is None:
            warn_if_unavailable()
            return
        remove_stale(parents)
        name = f"run-{os.getpid()}-{next(_counter)}"
        try:
            for controller, parent in parents.items():
                path = os.path.join(parent, name)
                for attempt in range(5):
                    try:
                        os.mkdir(path)
                        break
                    except FileNotFoundError:  # another host process, exiting, removed the empty parent
                        if attempt == 4:
                            raise
                        _make_parent(version, parent)
                self.dirs.append(path)
                self._limit(version, controller, path, memory_mb << 20, max_processes)
        except OSError:
            self.remove()
            raise
        self.version = version

    @staticmethod
    def _limit(version: str, controller: str, path: str, memory: int, tasks: int) -> None:
        def write(name: str, value: int) -> None:
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))

        if version == "v2":
            write("memory.max", memory)
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                write("memory.swap.max", 0)  # swap would let it hold more than the limit
            write("pids.max", tasks)
        elif controller == "memory":
            write("memory.limit_in_bytes", memory)
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                write("memory.memsw.limit_in_bytes", memory)  # memory + swap: no escape into swap
        else:
            write("pids.max", tasks)

    @property
    def procs_files(self) -> list[str]:
        """Where the launcher writes its pid to join (its children inherit the groups)."""
        return [os.path.join(path, "cgroup.procs") for path in self.dirs]

    def oom_kills(self) -> int:
        """Processes the kernel killed for going over the run's memory limit."""
        for path in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    with open(os.path.join(path, name)) as f:
                        for line in f:
                            key, _, value = line.partition(" ")
                            if key == "oom_kill":
                                return int(value)
                except OSError:
                    continue
        return 0

    def remove(self) -> None:
        """rmdir the groups; the run's processes are gone, but the kernel may take a moment to let go."""
        for path in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        self.dirs = []


def _run_groups(parents: dict[str, str]) -> list[tuple[str, int | None]]:
    """(path, host pid from its name, or None when the name is not ours) of every run group there is now."""
    found = []
    for parent in parents.values():
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            parts = name.split("-")
            host = int(parts[1]) if len(parts) == 3 and parts[0] == "run" and parts[1].isdigit() else None
            found.append((os.path.join(parent, name), host))
    return found


def remove_stale(parents: dict[str, str]) -> None:
    """Remove the empty run groups of host processes that died before they could (a killed evaluation)."""
    for path, host in _run_groups(parents):
        if host is not None and not _pid_alive(host):
            try:
                os.rmdir(path)
            except OSError:
                pass  # still has processes; a later start tries again


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def groups_in_use() -> list[str]:
    """Run groups that exist now (of any host process): for leak checks."""
    version, parents = layout()
    return [path for path, _ in _run_groups(parents)] if version else []


@atexit.register
def _remove_parents() -> None:
    """Leave no empty minicoder-sandbox group in the host's cgroup once this host is done (rmdir keeps it when a
    run of another host process still uses it)."""
    version, parents = layout() if layout.cache_info().currsize else (None, None)
    if version is None:
        return
    remove_stale(parents)
    for parent in parents.values():
        try:
            os.rmdir(parent)
        except OSError:
            pass


def stale_tasks() -> list[int]:
    """Pids inside run groups that no live run owns (of this host, or of a host that is gone): leaked processes.
    The runs of other live host processes (an evaluation beside the tests) do not count."""
    version, parents = layout()
    if version is None:
        return []
    pids = set()
    for path, host in _run_groups(parents):
        if host is not None and host != os.getpid() and _pid_alive(host):
            continue
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids.update(int(line) for line in f if line.strip())
        except OSError:
            pass
    return sorted(pids)
