"""Writing a file all-or-nothing, and giving what was written through private temporary
files the permissions of any file the user creates.

A reader (or a crash) never sees a half-written file: it is written under a temporary
name beside its target and renamed over it as the last step. Temporary files are
private (``tempfile`` makes them 0600 and directories 0700), so what is renamed into
place is first given the user's usual permissions (``0666`` / ``0777`` less the umask).
This module imports nothing of jaxpost, so any module may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_shareable(path: Path) -> None:
    """Gives ``path`` (and, for a directory, everything in it) the permissions of any file
    the user creates: temporary files and directories are private (0600 and 0700)."""
    umask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once the body has written it, it replaces
    ``path`` with the user's usual file permissions.

    The rename is the last step, so a reader never sees a half-written file. On error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        make_shareable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
