"""The launcher: the process the host starts for each run, as the host's user, with `python -I -S launcher.py FD`.

It reads its JSON config from the file descriptor FD (an unlinked temporary file: a killed host leaves nothing on
disk), joins the run's cgroups, enters new mount, PID, IPC, UTS and network namespaces (with a user namespace
around them when not root), and forks the run's *init*: PID 1 of the new PID namespace. Init builds the run's
filesystem (rootfs.py), forks the program under the run's uid with its rlimits, reaps every process of the run, and
reports the program's exit status on the status pipe, which the program cannot write to (it is closed in the
program before exec). When init exits, the kernel kills whatever is left in the namespace, at once, fork bombs
included.

The launcher stays outside, waiting for init. It ends the run (init kills everything) on SIGTERM from the host, and
also when its *lifeline* pipe from the host reaches EOF: that happens when the host process dies, however it dies,
which PR_SET_PDEATHSIG cannot promise (it follows the host *thread* that started the launcher).

Where the kernel refuses the namespaces, the same code runs without them ("fallback"): init is then a child
subreaper, the program works in a host directory, and everything of the run is killed with one kill(-1) made as
the run's uid (or, without a uid of its own, by killing init's descendants until none is left).
"""

import base64
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_STOP_GRACE_S = 1.0  # init gets this long to kill the run and report, then the launcher kills init

libc = ctypes.CDLL(None, use_errno=True)


def report(cfg: dict, **event) -> None:
    os.write(cfg["status_fd"], (json.dumps(event) + "\n").encode())


def enter_namespaces(cfg: dict) -> tuple[list[str], str]:
    """Unshare what the kernel allows; returns (namespaces entered, network isolation)."""
    root = os.geteuid() == 0
    user = 0 if root else CLONE_NEWUSER  # unprivileged: a user namespace makes us root inside it
    net = CLONE_NEWNET if cfg["isolate_network"] and not cfg["no_netns"] else 0
    network = "none" if not cfg["isolate_network"] else "socket_guard"
    attempts = []
    if cfg["namespaces"]:
        attempts.append((["mount", "pid", "ipc", "uts"], CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS))
    attempts.append(([], 0))
    uid, gid = os.getuid(), os.getgid()
    for names, flags in attempts:
        if not flags | net:
            return names, network
        if libc.unshare(flags | net | user) == 0:
            if user:
                _map_user(uid, gid)
            return names, "namespace" if net else network
    return [], network


def _map_user(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    for name, host_id in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(f"0 {host_id} 1")


def write_files(workdir: str, files: dict[str, str], uid) -> None:
    for name, data in files.items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
    if uid is not None:  # the program owns its directory, so it can write there and nowhere else
        for top, dirs, names in os.walk(workdir):
            for name in [*dirs, *names]:
                os.chown(os.path.join(top, name), uid, uid)
        os.chown(workdir, uid, uid)


class Init:
    """The run's init: sets up the filesystem, starts the program, reaps everything, reports."""

    def __init__(self, cfg: dict, namespaces: list[str], network: str):
        self.cfg, self.namespaces, self.network = cfg, namespaces, network
        self.uid = cfg["uid"]
        self.program = None
        self.pending_kill = False

    def kill_all(self) -> None:
        if self.program is None:
            self.pending_kill = True
        else:
            kill_run(self.namespaces, self.uid)

    def run(self) -> None:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, lambda *_: self.kill_all())
        if "pid" not in self.namespaces:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the program come to us
        try:
            if "mount" in self.namespaces:
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                import rootfs  # noqa: E402 (a sibling file; the launcher runs as a script, not from the package)

                workdir = rootfs.build(cfg["binds"], cfg["hide"], cfg["disk_mb"], self.uid)
                socket.sethostname("sandbox")
            else:
                workdir = cfg["workdir"]
            if not cfg["probe"]:
                write_files(workdir, cfg["files"], self.uid)
        except BaseException as exc:
            report(cfg, event="error", error="sandbox setup failed: %s: %s" % (type(exc).__name__, exc))
            os._exit(1)
        report(cfg, event="start", network=self.network, namespaces=self.namespaces, workdir=workdir)
        if cfg["probe"]:
            os._exit(0)
        self.program = os.fork()
        if self.program == 0:
            self.exec_program(workdir)
        for fd in cfg["child_fds"]:  # the program holds its own copies; ours would keep the host from seeing EOF
            os.close(fd)
        _to_devnull()
        if self.pending_kill:
            self.kill_all()
        exit_event = dict(event="exit", wait_status=None, cpu_s=0.0, maxrss_kb=0)
        while True:  # reap everything; ECHILD means no process of the run is left
            try:
                child, wait_status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if child == self.program:
                exit_event.update(wait_status=wait_status, cpu_s=usage.ru_utime + usage.ru_stime,
                                  maxrss_kb=usage.ru_maxrss)
                self.kill_all()  # background processes do not outlive the program
        report(cfg, **exit_event)
        os._exit(0)

    def exec_program(self, workdir: str) -> None:
        cfg, uid = self.cfg, self.uid
        try:
            os.close(cfg["status_fd"])  # the program must not hold (or forge) our reports
            for res, soft, hard in cfg["rlimits"]:
                resource.setrlimit(res, (soft, hard))  # as root still, so hard limits can be set
            # No capabilities after exec, even as root of a user namespace (the unprivileged case), where they
            # would let the program undo its read-only binds.
            for cap in range(64):
                libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # set-uid binaries cannot give root back
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
            os.chdir(workdir)
            env = dict(cfg["env"], HOME=workdir, TMPDIR="/tmp" if "mount" in self.namespaces else workdir)
            os.execve(cfg["argv"][0], cfg["argv"] + [json.dumps({"cwd": workdir, "network": self.network})], env)
        except BaseException as exc:
            try:
                os.write(2, ("sandbox: could not start the program: %s: %s\n" % (type(exc).__name__, exc)).encode())
            finally:
                os._exit(127)


def kill_run(namespaces: list[str], uid) -> None:
    """End every process of the run but the caller. PID 1 of a namespace reaches everything else in it with
    kill(-1); without one, a kill(-1) made as the run's own uid reaches all of its processes atomically; without
    either, the caller's descendants (init and the launcher are subreapers: orphans stay theirs)."""
    if "pid" in namespaces:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass  # nothing left to kill
    elif uid is not None:
        try:
            killer = os.fork()
        except OSError:  # the run's cgroup is at its process limit (a fork bomb): no helper process can start
            _kill_descendants()  # init is their subreaper: every process of the run is its descendant
            return
        if killer == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # never signals the caller itself
            finally:
                os._exit(0)
    else:
        _kill_descendants()


def _kill_descendants() -> None:
    """SIGKILL every descendant of this process (init is their subreaper, so orphans that left the program's
    session are still ours), again until none is left alive: a fork bomb forks between two passes."""
    me = os.getpid()
    for _ in range(100):
        children: dict[int, list[int]] = {}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, ValueError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(name))
        alive, stack = [], [me]
        while stack:
            for pid in children.get(stack.pop(), []):
                alive.append(pid)
                stack.append(pid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        cfg = json.load(f)
    os.set_inheritable(cfg["status_fd"], False)
    os.set_inheritable(cfg["lifeline_fd"], False)
    for path in cfg["cgroup_procs"]:  # before forking: everything of the run is born inside the groups
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    namespaces, network = enter_namespaces(cfg)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stop = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # the host's "stop now"
    init = os.fork()  # PID 1 of the new PID namespace, when there is one
    if init == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (wake_r, wake_w, cfg["lifeline_fd"]):
            os.close(fd)
        try:
            Init(cfg, namespaces, network).run()
        finally:
            os._exit(1)  # never back into the launcher's loop (e.g. the host closed the status pipe)
    for fd in cfg["child_fds"]:
        os.close(fd)
    _to_devnull()
    lifeline, stopping_since = cfg["lifeline_fd"], None
    while True:
        try:
            done, _, _ = os.wait4(init, os.WNOHANG)[:3]
        except ChildProcessError:
            break
        if done:
            break
        if stop and stopping_since is None:
            stopping_since = time.monotonic()
            _signal(init, signal.SIGTERM)  # init kills the run and reports how the program ended
        elif stopping_since is not None and time.monotonic() - stopping_since > _STOP_GRACE_S:
            _signal(init, signal.SIGKILL)  # with a PID namespace, the kernel ends all of it with init
        watched = [wake_r] + ([lifeline] if lifeline is not None else [])
        ready, _, _ = select.select(watched, [], [], 0.25 if stopping_since else None)
        if lifeline in ready and not os.read(lifeline, 1):
            stop.append(True)  # EOF: the host is gone
            os.close(lifeline)
            lifeline = None
        if wake_r in ready:
            os.read(wake_r, 512)
    if "pid" not in namespaces:  # init was killed, or died: what it left came to us
        kill_run(namespaces, cfg["uid"])
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


if __name__ == "__main__":
    main()
