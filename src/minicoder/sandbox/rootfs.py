"""The filesystem a run sees, built by the run's init process inside its new mount namespace.

Runs as root (of the host or of a user namespace) in the launcher's child, with only the standard library, before
the program starts. The new root is one tmpfs of `disk_mb` (so the run's directory, /tmp, /var/tmp and /dev/shm
share one size limit and vanish with the namespace); into it go read-only binds of the system directories the
interpreter needs (/usr, /lib*, the Python install, site-packages, the caller's python_path), a few device nodes,
a fresh /proc of the run's own PID namespace, and a minimal /etc. Nothing else of the host is visible: not the
project, not /root, not the host's /tmp or its unix sockets, not other processes.
"""

import ctypes
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # merged-/usr symlinks or dirs
DEVICES = ("null", "zero", "full", "random", "urandom")
WORKDIR = "/sandbox"  # the run's own directory, as the program sees it
# Where the new root is assembled: any directory works in our own namespace, as long as it does not hide a path
# that is bound into it (a venv under /tmp, say).
MOUNT_POINTS = ("/mnt", "/media", "/srv", "/opt", "/boot", "/home", "/run", "/var/tmp", "/tmp")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")


def _bind_readonly(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    # Keep the flags the host mount has (a user namespace may not clear them), and add read-only.
    host = os.statvfs(source).f_flag
    kept = MS_NOSUID | (host & (MS_NODEV | MS_NOEXEC))
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)


def _covered(path: str, bound: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound)


def _mount_point(binds: list[str]) -> str:
    for candidate in MOUNT_POINTS:
        if os.path.isdir(candidate) and not os.path.islink(candidate) and not any(
            b == candidate or b.startswith(candidate + "/") for b in binds
        ):
            return candidate
    raise OSError(f"no directory to assemble the sandbox root in (tried {', '.join(MOUNT_POINTS)})")


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _etc(root: str, uid: int | None) -> None:
    os.mkdir(root + "/etc", 0o755)
    user = uid if uid is not None else 0
    _write(root + "/etc/passwd", f"root:x:0:0::/root:/bin/sh\nsandbox:x:{user}:{user}::{WORKDIR}:/bin/sh\n")
    _write(root + "/etc/group", f"root:x:0:\nsandbox:x:{user}:\n")
    _write(root + "/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")
    try:  # the dynamic loader's cache: library paths only, and programs start faster with it
        with open("/etc/ld.so.cache", "rb") as src, open(root + "/etc/ld.so.cache", "wb") as dst:
            dst.write(src.read())
    except OSError:
        pass


def _dev(root: str) -> None:
    os.mkdir(root + "/dev", 0o755)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(root + "/dev/" + name, "w").close()
            mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)


def build(binds: list[str], hide: list[str], disk_mb: int, uid: int | None) -> str:
    """Make the new root and switch to it; returns the run's directory (empty, owned by the run's uid)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    root = _mount_point(binds)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=755")
    bound: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind_readonly(path, root + path)
            bound.append(path)
    for path in binds:
        if os.path.exists(path) and not _covered(path, bound):
            _bind_readonly(path, root + path)
            bound.append(path)
    for path in hide:  # site-packages the run may not see, inside a bound install
        if os.path.isdir(root + path):
            mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    _etc(root, uid)
    _dev(root)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):  # world-writable, but the run's alone
        os.makedirs(root + path, exist_ok=True)
        os.chmod(root + path, 0o1777)
    os.mkdir(root + "/proc", 0o555)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")  # its own processes only
    os.mkdir(root + WORKDIR, 0o700)
    if uid is not None:
        os.chown(root + WORKDIR, uid, uid)
    os.chdir(root)
    os.mkdir(".oldroot")
    _check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b".oldroot"), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.oldroot", MNT_DETACH), "umount the host root")
    os.rmdir("/.oldroot")
    return WORKDIR
