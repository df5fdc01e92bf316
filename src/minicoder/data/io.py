"""Atomic outputs: a stage writes into a temporary directory beside its target and renames it at the end,
so a failed or interrupted run never leaves a half-written output and never destroys the previous one."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import MinicoderError


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False):
    """Yield a fresh temporary directory; on success it replaces `out`, on any error it is removed.

    An existing `out` is refused unless `force`, and even then it is only replaced once the new one is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise MinicoderError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
