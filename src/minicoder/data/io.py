"""Atomic outputs: a stage writes into a temporary directory beside its target and renames it at the end,
so a failed or interrupted run never leaves a half-written output and never destroys the previous one.

Every directory that is being written, replaced or deleted carries a hidden name with the writer's PID
(``.NAME.tmp-PID`` being built, ``.NAME.old-PID`` the copy being replaced, ``.NAME.del-PID`` being deleted),
so a run killed with SIGKILL at any moment leaves only complete directories under real names, and the next
run can tell its leftovers from a live writer's: `clean_stale_temps` removes those of dead PIDs and puts back
an ``old`` copy whose replacement never arrived.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import MinicoderError

_HIDDEN_WORK_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a rename into it) durable, not just the files' bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def work_dir(target: Path, kind: str) -> Path:
    """The hidden sibling of `target` this process uses while building (tmp), replacing (old) or deleting (del) it."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C library,
    kernel or file system does not offer it. The standard library has no binding for it, hence ctypes."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` at `out`.

    An existing `out` is swapped with `tmp` in one atomic step where Linux offers it; elsewhere it is renamed to
    its hidden ``old`` name and deleted only once the new one is in place: a kill between those two renames
    leaves the previous `out` whole under that name, and `clean_stale_temps` renames it back.
    """
    fsync_tree(tmp)
    if out.exists() and _exchange(tmp, out):
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous `out`
    elif out.exists():
        old = work_dir(out, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is ever left under its real name: rename, then delete."""
    doomed = work_dir(path, "del")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def clean_stale_temps(folder: Path, target_name: str) -> tuple[int, int]:
    """Tidy the hidden work directories of dead processes for targets named like `target_name` (a regex) in `folder`.

    ``tmp`` and ``del`` leftovers are deleted; an ``old`` copy is renamed back when its target is missing (the
    writer died between its two renames), deleted otherwise. Work directories of live PIDs are left alone, so
    a concurrent writer is never disturbed. Returns (directories removed, bytes freed) and says so on stderr.
    """
    if not folder.is_dir():
        return 0, 0
    name_pattern = re.compile(target_name)
    removed = freed = 0
    for entry in sorted(folder.iterdir()):
        found = _HIDDEN_WORK_DIR.match(entry.name)
        if (not found or not name_pattern.fullmatch(found["name"]) or entry.is_symlink()
                or _pid_alive(int(found["pid"]))):
            continue
        target = folder / found["name"]
        if entry.is_file():  # a small file written by atomic_write_text
            if found["kind"] == "tmp":
                entry.unlink(missing_ok=True)
            continue
        if found["kind"] == "old" and not target.exists():
            os.rename(entry, target)
            print(f"restored {target} from a run killed while replacing it", file=sys.stderr)
            continue
        freed += _tree_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    if removed:
        print(f"removed {removed} temporary director{'y' if removed == 1 else 'ies'} left in {folder} by killed runs "
              f"({freed / 1e6:.1f} MB)", file=sys.stderr)
    return removed, freed


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that a kill leaves the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False):
    """Yield a fresh temporary directory; on success it replaces `out`, on any error it is removed.

    An existing `out` is refused unless `force`, and even then it is only replaced once the new one is complete.
    Work directories that killed runs left beside `out` are tidied first.
    """
    out = Path(out)
    clean_stale_temps(out.parent, re.escape(out.name))
    if out.exists() and not force:
        raise MinicoderError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_dir(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
